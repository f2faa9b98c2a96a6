"""Measuring and tuning tools behind ``python -m commkit {bench,overlap,tune,monitor,info}``.

Hardware access sits in two small modules (``sysfs_ib`` for InfiniBand port counters, ``nvml`` for
NVLink/PCIe counters through nvidia-ml-py) so that tests replace only those boundaries.
"""
