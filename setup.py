"""Packaging for commkit.

The device sources live at the top of the repository (``csrc/``, ``ptx/``, and ``host/``: their host
execution) and are shipped inside the installed package as ``commkit/csrc``, ``commkit/ptx`` and
``commkit/host`` so that the JIT finds them after a plain (non-editable) ``pip install .``.
"""

from setuptools import find_packages, setup

DEVICE_SOURCES = ["*.cuh", "*.cu", "*.h", "*.hpp", "*.cpp", "*.md"]

setup(
    packages=find_packages(include=["commkit", "commkit.*"])
    + ["commkit.csrc", "commkit.ptx", "commkit.host", "commkit.host.include"],
    package_dir={"commkit.csrc": "csrc", "commkit.ptx": "ptx", "commkit.host": "host", "commkit.host.include": "host/include"},
    package_data={
        "commkit.csrc": DEVICE_SOURCES,
        "commkit.ptx": DEVICE_SOURCES,
        "commkit.host": DEVICE_SOURCES,
        "commkit.host.include": DEVICE_SOURCES,
    },
    include_package_data=False,
)
