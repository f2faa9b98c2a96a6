"""Measuring and tuning tools behind ``python -m commkit {bench,overlap,tune,monitor,info}``.

Hardware access is not here but one layer below, in ``commkit.hw`` (``sysfs_ib``, ``nvml``), which the
runtime reads as well; the tools stand above the runtime and nothing of it imports them.
"""
