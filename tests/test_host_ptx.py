"""The host twins of the PTX wrappers: host/ptx_host.h has every wrapper of ptx/ptx.cuh, name for
name and signature for signature (template parameters, return type, parameter types), and nothing
the kernels could call that the GPU build lacks. A new wrapper cannot be forgotten on the host."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE_FN = re.compile(
    r"(template\s*<(?P<tpl>[^>]*)>\s*)?__device__\s+__forceinline__\s+(?P<ret>[\w:<>\s*&]+?)\s+(?P<name>\w+)\s*"
    r"\((?P<params>[^)]*)\)\s*\{",
    re.S,
)
HOST_FN = re.compile(
    r"(template\s*<(?P<tpl>[^>]*)>\s*)?(?:\[\[noreturn\]\]\s+)?inline\s+(?P<ret>[\w:<>\s*&]+?)\s+(?P<name>\w+)\s*"
    r"\((?P<params>[^)]*)\)\s*\{",
    re.S,
)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace(" *", "*").replace(" &", "&").strip()


def _param_types(params: str) -> tuple[str, ...]:
    out = []
    for param in filter(None, (p.strip() for p in params.split(","))):
        param = param.split("=")[0].strip()
        out.append(_normalise(re.sub(r"\b\w+$", "", param)))  # drop the parameter's name
    return tuple(out)


def signatures(text: str, pattern: re.Pattern[str]) -> dict[str, tuple]:
    found = {}
    for m in pattern.finditer(text):
        tpl = _normalise(re.sub(r"\b\w+$", "", m["tpl"].strip())) if m["tpl"] else ""
        found[m["name"]] = (tpl, _normalise(m["ret"]), _param_types(m["params"]))
    return found


def device_wrappers() -> dict[str, tuple]:
    text = (REPO / "ptx" / "ptx.cuh").read_text()
    device_part = text.split('#include "host/ptx_host.h"', 1)[1].split("#endif  // COMMKIT_HOST_EXECUTION")[0]
    return signatures(device_part, DEVICE_FN)


def host_wrappers() -> dict[str, tuple]:
    text = (REPO / "host" / "ptx_host.h").read_text()
    text = re.sub(r"namespace detail \{.*?\}  // namespace detail", "", text, flags=re.S)  # helpers
    return signatures(text, HOST_FN)


def test_every_wrapper_has_its_host_twin() -> None:
    device, host = device_wrappers(), host_wrappers()
    assert len(device) >= 30, sorted(device)  # the parser found the wrappers
    missing = sorted(set(device) - set(host))
    assert not missing, f"wrappers of ptx/ptx.cuh without a host twin in host/ptx_host.h: {missing}"
    extra = sorted(set(host) - set(device))
    assert not extra, f"host/ptx_host.h has functions that ptx/ptx.cuh lacks: {extra}"
    differ = {name: (device[name], host[name]) for name in device if device[name] != host[name]}
    assert not differ, f"signatures differ (device, host): {differ}"


def test_the_check_sees_a_changed_signature() -> None:
    text = (
        (REPO / "ptx" / "ptx.cuh")
        .read_text()
        .replace("int ld_acquire_sys(const int* ptr)", "int ld_acquire_sys(const int* ptr, int order)")
    )
    device_part = text.split('#include "host/ptx_host.h"', 1)[1]
    assert signatures(device_part, DEVICE_FN)["ld_acquire_sys"] != host_wrappers()["ld_acquire_sys"]
