"""Hardware probes below the runtime: ``nvml`` (NVLink/PCIe counters and link speeds through
nvidia-ml-py) and ``sysfs_ib`` (InfiniBand ports and their counters from sysfs).

The runtime (``commkit.profiles``, ``commkit.backends.fabric``) and the tools (``monitor``, ``info``)
both read the hardware through these two small modules, so tests replace only those boundaries.
"""
