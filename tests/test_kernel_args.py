"""The launch argument classes (``commkit.backends.kernel_args``) match the ``__global__`` signatures of
``csrc/*.cuh``: same parameter names, same order, same C type class (pointer, int, int64_t)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from commkit.backends import kernel_args as ka

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)", re.S)


def _c_class(c_type: str) -> str:
    """The C type class of one parameter's type, as the annotations name it."""
    if "*" in c_type:
        return "Ptr"
    return {"int": "Int32", "int64_t": "Int64"}[c_type.replace("const", "").strip()]


def _signatures() -> dict[str, tuple[str, tuple[tuple[str, str], ...]]]:
    """kernel name -> (header, ((parameter, C type class), ...)) of every __global__ kernel in csrc/."""
    found = {}
    for header in sorted(CSRC.glob("*.cuh")):
        for name, params in _GLOBAL.findall(header.read_text()):
            parsed = []
            for param in params.split(","):
                m = re.fullmatch(r"\s*(.*?[\s*])(\w+)\s*", param, re.S)
                assert m, f"{header.name} {name}: cannot parse the parameter {param!r}"
                parsed.append((m.group(2), _c_class(m.group(1))))
            found[name] = (f"csrc/{header.name}", tuple(parsed))
    return found


SIGNATURES = _signatures()


def test_every_kernel_has_a_class() -> None:
    assert sorted(cls.KERNEL for cls in ka.ALL) == sorted(SIGNATURES)


@pytest.mark.parametrize("cls", ka.ALL, ids=lambda cls: cls.KERNEL)
def test_fields_match_the_signature(cls: type[ka.KernelArgs]) -> None:
    header, params = SIGNATURES[cls.KERNEL]
    assert header == cls.HEADER
    assert cls.c_types() == params


@pytest.mark.parametrize("cls", ka.ALL, ids=lambda cls: cls.KERNEL)
def test_values_have_the_launch_types(cls: type[ka.KernelArgs]) -> None:
    t = torch.zeros(1)
    kinds = cls.c_types()
    args = cls(*(t if kind == "Ptr" else 7 for _, kind in kinds))
    expected = {"Ptr": torch.Tensor, "Int32": np.int32, "Int64": np.int64}
    values = args.values()
    assert len(values) == len(kinds)
    for value, (name, kind) in zip(values, kinds, strict=True):
        assert type(value) is expected[kind], name
