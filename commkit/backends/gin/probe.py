"""The struct layouts of the NCCL headers the kernels compile against, from a host program.

``layout_probe.cu`` (shipped beside this module) prints the sizes, alignments and field offsets of
ncclDevComm, ncclDevCommRequirements, GinNet and InterLayout, NCCL's constants and the bytes of the
requirements initializer; :func:`probe_layout` compiles it with nvcc against the same headers, runs it
and caches its output like the cubins. Never a hand-written mirror of the headers.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from commkit.backends.gin.layout import GinLayout
from commkit.jit import nccl as nccl_headers
from commkit.jit.compiler import cache_dir, cache_key, include_root, nvcc_path

PROBE_FILE = Path(__file__).with_name("layout_probe.cu")
PROBE_SOURCE = PROBE_FILE.read_text()


def _parse_probe(out: str) -> GinLayout:
    scalars: dict[str, str] = {}
    sizes: dict[str, tuple[int, int]] = {}
    fields: dict[str, tuple[int, int]] = {}
    for line in out.splitlines():
        key, *values = line.split()
        if key.startswith("sizeof."):
            sizes[key[len("sizeof.") :]] = (int(values[0]), int(values[1]))
        elif "." in key:
            fields[key] = (int(values[0]), int(values[1]))
        else:
            scalars[key] = values[0] if values else ""
    requirements = bytes.fromhex(scalars["requirements_hex"])
    if len(requirements) != sizes["ncclDevCommRequirements"][0]:
        raise RuntimeError("layout probe: requirements bytes do not match sizeof(ncclDevCommRequirements)")
    return GinLayout(
        version_code=int(scalars["version_code"]),
        unique_id_bytes=int(scalars["unique_id_bytes"]),
        win_coll_symmetric=int(scalars["win_coll_symmetric"]),
        win_required_alignment=int(scalars["win_required_alignment"]),
        strong_signals=scalars["strong_signals"] == "1",
        net_slots=int(scalars["net_slots"]),
        sizes=sizes,
        fields=fields,
        requirements_template=requirements,
    )


def probe_layout(
    headers: nccl_headers.NcclHeaders | None = None, *, cache: Path | None = None, root: Path | None = None
) -> GinLayout:
    """The struct layouts of ``headers`` (default: :func:`commkit.jit.nccl.find_headers`), cached on disk.

    The cache key covers the probe source, every header under csrc/, ptx/ and the NCCL include directory,
    and ``nvcc --version``.
    """
    headers = headers or nccl_headers.find_headers()
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found: the GIN layout probe needs the CUDA toolkit (or COMMKIT_NVCC)")
    root = (root or include_root()).resolve()
    options = ("-std=c++17", "-arch=sm_90", "--diag-suppress=177")
    key = cache_key(PROBE_SOURCE, ("gin-layout-probe", *options), root, nvcc, (headers.include_dir,))
    entry = (cache or cache_dir()) / "gin-layout" / f"{key}.json"
    if entry.is_file():
        return _parse_probe(json.loads(entry.read_text())["stdout"])
    entry.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=".probe-") as tmp:
        src, exe = Path(tmp) / "probe.cu", Path(tmp) / "probe"
        src.write_text(PROBE_SOURCE)
        cmd = [nvcc, *options, "-I", str(root), "-I", str(headers.include_dir), "-o", str(exe), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"GIN layout probe: nvcc failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}"
            )
        run = subprocess.run([str(exe)], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"GIN layout probe failed (exit {run.returncode}): {run.stderr}")
        layout = _parse_probe(run.stdout)  # validate before caching
        staged = Path(tmp) / "layout.json"
        staged.write_text(json.dumps({"stdout": run.stdout, "headers": str(headers.include_dir)}))
        os.replace(staged, entry)
    return layout
