"""Packaging for commkit.

The device sources live at the top of the repository (``csrc/``, ``ptx/``) and are shipped inside the
installed package as ``commkit/csrc`` and ``commkit/ptx`` so that the JIT loader finds them after a
plain (non-editable) ``pip install .``.
"""

from setuptools import find_packages, setup

DEVICE_SOURCES = ["*.cuh", "*.cu", "*.h", "*.hpp", "*.md"]

setup(
    packages=find_packages(include=["commkit", "commkit.*"]) + ["commkit.csrc", "commkit.ptx"],
    package_dir={"commkit.csrc": "csrc", "commkit.ptx": "ptx"},
    package_data={"commkit.csrc": DEVICE_SOURCES, "commkit.ptx": DEVICE_SOURCES},
    include_package_data=False,
)
