"""Packaging for commkit.

The device sources live at the top of the repository (``csrc/``, ``ptx/``) and are shipped inside the
installed package as ``commkit/csrc`` and ``commkit/ptx`` so that the JIT loader finds them after a
plain (non-editable) ``pip install .``.
"""

from setuptools import setup

DEVICE_SOURCES = ("*.cuh", "*.cu", "*.h", "*.hpp", "*.md")

setup(
    packages=[
        "commkit",
        "commkit.backends",
        "commkit.cli",
        "commkit.csrc",
        "commkit.ptx",
    ],
    package_dir={"commkit.csrc": "csrc", "commkit.ptx": "ptx"},
    package_data={"commkit.csrc": list(DEVICE_SOURCES), "commkit.ptx": list(DEVICE_SOURCES)},
    include_package_data=False,
)
