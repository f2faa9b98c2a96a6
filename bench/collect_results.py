"""Turn the output folder of bench/gpu_check.sh into ``bench/results/<date>-<gpu>/`` (what gets committed).

    python bench/collect_results.py OUT_DIR [--dest bench/results] [--force]

Reads ``env.txt`` (the check's ``key: value`` lines: date, gpu, driver, commit, ...), which must name
the device, the driver and the commit measured; copies the check's files (summary.txt, env.txt,
log.txt, bench.json/png, overlap.json/png) into ``<dest>/<YYYY-MM-DD>-<gpu>/``, writes ``meta.json``
(device, driver, commit, date and the step lines of summary.txt) and ``table.md``: the rows of
bench.json as a markdown table (the README's performance table takes its rows from there). Prints
the folder. Exit status 2 with a message when the folder lacks what it needs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

FILES = ("summary.txt", "env.txt", "log.txt", "bench.json", "bench.png", "overlap.json", "overlap.png")
REQUIRED = ("date", "gpu", "driver", "commit")


class CollectError(Exception):
    pass


def read_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip() and key.strip() not in env:
            env[key.strip()] = value.strip()
    return env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def bench_table(bench: dict[str, Any]) -> str:
    cols = ["shape", "op", "ranks", "nodes", "dtype", "num_sms", "time ms", "GB/s", "vs copy kernel",
            "vs d2d copy", "vs torch ops", "wrong"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in bench.get("rows", []):
        cells = [
            r.get("shape"), r.get("op"), r.get("ranks"), r.get("nodes"), r.get("dtype"), r.get("num_sms"),
            _fmt((r.get("time_median_s") or 0) * 1e3, 3), _fmt(r.get("gbps"), 0), _fmt(r.get("vs_roofline")),
            _fmt(r.get("vs_d2d")), _fmt(r.get("vs_torch")), r.get("wrong"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    for r in bench.get("skipped", []):
        why = str(r.get("skipped", ""))[:80]
        cells = [r.get("shape"), "skipped", r.get("ranks"), "", r.get("dtype"), r.get("num_sms"), why]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |" + " |" * (len(cols) - len(cells)))
    return "\n".join(lines) + "\n"


def collect(out_dir: Path, dest: Path, force: bool = False) -> Path:
    if not out_dir.is_dir():
        raise CollectError(f"{out_dir} is not a directory")
    env_path = out_dir / "env.txt"
    if not env_path.is_file():
        raise CollectError(f"{env_path} not found: not an output folder of bench/gpu_check.sh")
    env = read_env(env_path)
    missing = [k for k in REQUIRED if not env.get(k) or env[k].startswith("unknown")]
    gpu_ok = env.get("gpu") and "fail" not in env["gpu"].lower() and "not found" not in env["gpu"].lower()
    if missing or not gpu_ok:
        raise CollectError(
            f"{env_path}: the device name, driver, commit and date must be measured; missing or unknown: "
            f"{', '.join(missing) or 'gpu'} (got {', '.join(f'{k}={env.get(k)!r}' for k in REQUIRED)})"
        )
    date = env["date"][:10]
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise CollectError(f"{env_path}: date: expected YYYY-MM-DD..., got {env['date']!r}")
    target = dest / f"{date}-{slug(env['gpu'])}"
    if target.exists() and not force:
        raise CollectError(f"{target} exists (pass --force to replace its files)")
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in FILES:
        if (out_dir / name).is_file():
            shutil.copy2(out_dir / name, target / name)
            copied.append(name)
    summary_path = out_dir / "summary.txt"
    steps = summary_path.read_text().splitlines() if summary_path.is_file() else []
    commit = env["commit"].split()[0]
    meta = {"device": env["gpu"], "driver": env["driver"], "commit": commit, "commit_source": env["commit"],
            "date": env["date"], "files": copied, "summary": steps}  # fmt: skip
    meta.update({k: env[k] for k in ("sms", "nvcc", "torch", "cupy", "nvidia-nccl-cu13") if k in env})
    (target / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if (out_dir / "bench.json").is_file():
        bench = json.loads((out_dir / "bench.json").read_text())
        header = f"{env['gpu']}, driver {env['driver']}, commit {commit[:12]}, {env['date']}\n\n"
        (target / "table.md").write_text(header + bench_table(bench))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="the $OUT folder of bench/gpu_check.sh")
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--force", action="store_true", help="replace the files of an existing folder")
    args = parser.parse_args(argv)
    try:
        target = collect(args.out_dir, args.dest, args.force)
    except (CollectError, OSError, ValueError) as exc:
        print(f"collect_results: {exc}", file=sys.stderr)
        return 2
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
