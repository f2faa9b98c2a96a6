"""``python -m commkit model``: predict dispatch/combine on a cluster from the performance model."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from commkit.model import budget, report
from commkit.model.predict import Model
from commkit.model.presets import PRESETS, get_preset, preset_topology
from commkit.model.throughput import load_profile
from commkit.model.topology import Topology
from commkit.model.traffic import RecordedRouting, SyntheticRouting
from commkit.model.workload import Workload

EXAMPLES = """\
examples:
  python -m commkit model --preset h800-dsv3 --tokens 4096 --hidden 7168 --topk 8 --experts 256 --num-sms 20
  python -m commkit model --preset h800-dsv3 --ep-size 2048 --experts 2048 --json out.json --plot out.png
  python -m commkit model --preset h100-cx7 --nodes 4 --skew 0.5 --compute-us 1500
  python -m commkit model --preset h100-cx7 --profile ~/.cache/commkit/profiles/<key>-kernel.json

bytes: FP8 row = H + 4*ceil(H/128), BF16 row = 2H. "logical" GB/s = bytes of the rows a rank receives
(dispatch) or sends back (combine) over the time, own rows included; internode, the rows a source
sends towards each destination node (once per token and node, own node included), as DeepEP's
published figures count them. Link bytes count only what crosses NVLink or IB.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _key_value(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep or not key:
            raise ValueError
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=NUMBER, got {text!r}") from None


def _role_split(text: str) -> tuple[str, dict[str, float]]:
    key, sep, shares = text.partition(":")
    try:
        if not sep:
            raise ValueError
        split = {}
        for item in shares.split(","):
            role, eq, value = item.partition("=")
            if not eq:
                raise ValueError
            split[role.strip()] = float(value)
        return key.strip(), split
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FAMILY.PHASE:ROLE=SHARE,ROLE=SHARE "
            f"(e.g. internode.dispatch:forwarder=0.5,rdma_sender+nvl_receiver=0.5), got {text!r}"
        ) from None


def _description(presets: dict[str, Any]) -> str:
    lines = textwrap.wrap(
        "Predict commkit's dispatch and combine on a cluster you cannot run on: time per phase, bytes and "
        "utilisation per link class, the resource that bounds each phase, and the smallest SM budget that "
        "reaches a target. Pure Python, no GPU.",
        width=100,
    )
    lines += ["", "presets:"]
    for name, preset in presets.items():
        lines += textwrap.wrap(
            f"{name}: {preset.description}", width=100, initial_indent="  ", subsequent_indent="    "
        )
    return "\n".join(lines)


def register(subparsers: Any) -> None:

    parser = subparsers.add_parser(
        "model",
        help="predict dispatch/combine time, link use and the SM budget on a cluster (no GPU needed)",
        description=_description(PRESETS),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument(
        "--preset", default="h800-dsv3", choices=sorted(PRESETS), help="hardware (default h800-dsv3)"
    )
    cluster.add_argument("--nodes", type=_positive_int, help="nodes in the cluster (default: the preset's)")
    cluster.add_argument(
        "--ep-size",
        type=_positive_int,
        help="GPUs in one EP group: up to one node, or whole nodes (default: the preset's, h800-dsv3: 64)",
    )
    cluster.add_argument(
        "--nvlink-gbps", type=float, help="override: achievable NVLink GB/s per GPU per direction"
    )
    cluster.add_argument("--nic-gbps", type=float, help="override: NIC line rate GB/s per GPU per direction")
    cluster.add_argument(
        "--nic-efficiency", type=float, help="override: fraction of the NIC line rate reached"
    )
    cluster.add_argument("--sms-per-gpu", type=_positive_int, help="override: SMs of one GPU")

    layer = parser.add_argument_group("layer")
    layer.add_argument(
        "--tokens", type=_positive_int, help="tokens per rank (4096; with --layout, the layout's)"
    )
    layer.add_argument("--hidden", type=_positive_int, default=7168, help="hidden size (7168)")
    layer.add_argument("--topk", type=_positive_int, default=8, help="experts per token (8)")
    layer.add_argument(
        "--experts",
        type=_positive_int,
        default=256,
        help="experts, a multiple of the EP size (256)",
    )
    layer.add_argument(
        "--dispatch-dtype",
        choices=("fp8", "bf16"),
        default="fp8",
        help="dispatch rows (fp8); combine is bf16",
    )
    layer.add_argument("--num-sms", type=_positive_int, help="SM budget (default: the preset's)")
    layer.add_argument(
        "--role-split",
        type=_role_split,
        action="append",
        metavar="FAMILY.PHASE:ROLE=SHARE,...",
        help="share of the SM budget per role (roles joined by + share SMs), repeatable",
    )

    routing = parser.add_argument_group("routing")
    routing.add_argument(
        "--skew",
        type=_non_negative_float,
        default=0.0,
        help="Zipf-like expert skew, 0 = uniform (0)",
    )
    routing.add_argument(
        "--max-nodes",
        type=_positive_int,
        default=4,
        help="node-limited routing: nodes a token may reach (default 4, as DeepSeek-V3)",
    )
    routing.add_argument("--no-node-limit", action="store_true", help="plain top-k over all experts")
    routing.add_argument(
        "--layout",
        type=Path,
        help="recorded routing: .npy/.npz/.pt with topk_idx [T, K] (every rank alike) or [R, T, K]",
    )
    routing.add_argument("--seed", type=int, default=0, help="seed of the synthetic routing (0)")

    kernels = parser.add_argument_group("kernel throughput")
    kernels.add_argument(
        "--profile", type=Path, help="tuning profile JSON from `commkit tune` (its per_sm_gbps)"
    )
    kernels.add_argument(
        "--per-sm",
        type=_key_value,
        action="append",
        metavar="KEY=GBPS",
        help="GB/s per SM of a role, for: dispatch, combine, internode, internode.dispatch.forwarder, ... "
        "(repeatable; after --profile)",
    )

    target = parser.add_argument_group("SM budget target")
    target.add_argument(
        "--within-pct",
        type=_non_negative_float,
        default=5.0,
        help="within this %% of the link-bound time (5)",
    )
    target.add_argument("--compute-us", type=float, help="instead: hidden under this much compute time (us)")
    target.add_argument("--sm-step", type=_positive_int, default=2, help="budgets searched in steps of (2)")

    output = parser.add_argument_group("output")
    output.add_argument("--json", type=Path, help="write the prediction as JSON here")
    output.add_argument(
        "--plot", type=Path, help="draw predicted time against num_sms (PNG, needs matplotlib)"
    )
    parser.set_defaults(func=run)


def _load_layout(path: Path) -> list[Any]:
    """topk_idx arrays from a recorded layout file: one [T, K] or [R, T, K], or a list of [T, K]."""

    if not path.exists():
        raise ValueError(f"--layout: no such file {path}")
    if path.suffix in (".npy", ".npz"):
        data: Any = np.load(path)
        if path.suffix == ".npz":
            if "topk_idx" not in data:
                raise ValueError(f"--layout: {path} has no 'topk_idx' array (has {sorted(data.files)})")
            data = data["topk_idx"]
    else:
        import torch  # NOTE: only for a torch-saved layout: the model and its CLI load no torch

        data = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(data, dict):
            if "topk_idx" not in data:
                raise ValueError(f"--layout: {path} holds a dict without 'topk_idx' (keys {sorted(data)})")
            data = data["topk_idx"]
        data = [d.numpy() for d in data] if isinstance(data, (list, tuple)) else data.numpy()
    if isinstance(data, list):
        return data
    if data.ndim == 2:
        return [data]
    if data.ndim == 3:
        return list(data)
    raise ValueError(f"--layout: expected topk_idx [T, K] or [R, T, K], got shape {data.shape}")


# Library field names in error messages -> the flag that sets them
_FLAGS = {
    "role_split": "--role-split",
    "num_sms": "--num-sms",
    "num_topk": "--topk",
    "ep_size": "--ep-size",
    "EP group": "--ep-size",
    "recorded routing": "--layout",
    "topk_idx": "--layout",
}


def _name_flag(message: str) -> str:
    """Prefix a library error with the flag it is about, when the message names a field."""
    if message.startswith("--"):
        return message
    for field_name, flag in _FLAGS.items():
        if field_name in message:
            return f"{flag}: {message}"
    return message


def run(args: argparse.Namespace) -> int:


    try:
        preset = get_preset(args.preset)
        topology = preset_topology(preset, ep_size=args.ep_size, num_nodes=args.nodes)
        overrides = {
            "nvlink_gbps": args.nvlink_gbps,
            "nic_gbps": args.nic_gbps,
            "nic_efficiency": args.nic_efficiency,
            "sms_per_gpu": args.sms_per_gpu,
        }
        overrides = {key: value for key, value in overrides.items() if value is not None}
        if overrides:
            topology = Topology(**{**topology.__dict__, **overrides})
        num_ranks = topology.num_ranks
        if args.experts % num_ranks != 0:
            raise ValueError(
                f"--experts: expected a multiple of the EP size {num_ranks} ({topology.num_nodes} node(s) x "
                f"{topology.gpus_per_node} GPUs), got {args.experts}; change --experts or --ep-size"
            )
        layout = _load_layout(args.layout) if args.layout is not None else None
        num_tokens = args.tokens or (round(float(np.mean([len(idx) for idx in layout]))) if layout else 4096)
        workload = Workload(
            num_tokens=num_tokens,
            hidden=args.hidden,
            num_topk=args.topk,
            num_experts=args.experts,
            num_sms=args.num_sms or preset.default_num_sms,
            dispatch_dtype=args.dispatch_dtype,
            role_split=dict(args.role_split or []),
        )
        if layout is not None:
            routing: Any = RecordedRouting(layout, source=str(args.layout))
        else:
            limit = None if args.no_node_limit or args.max_nodes >= topology.num_nodes else args.max_nodes
            if limit is not None and limit * (args.experts // topology.num_nodes) < args.topk:
                raise ValueError(
                    f"--max-nodes: {limit} nodes of {args.experts // topology.num_nodes} experts cannot hold "
                    f"--topk {args.topk} experts; raise --max-nodes or pass --no-node-limit"
                )
            routing = SyntheticRouting(skew=args.skew, max_nodes=limit, seed=args.seed)
        per_sm = dict(load_profile(args.profile)) if args.profile else {}
        per_sm.update(dict(args.per_sm or []))
        model = Model(topology, workload, routing, per_sm)
        predictions = model.predict()
        budgets = budget.smallest_layer_budget(
            model,
            within_pct=args.within_pct,
            compute_us=args.compute_us,
            sm_step=args.sm_step,
        )
    except ValueError as error:
        print(f"commkit model: error: {_name_flag(str(error))}", file=sys.stderr)
        return 2

    report.print_table(model, predictions, budgets)
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(model, predictions, budgets), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        try:
            report.plot_time_vs_sms(model, str(args.plot), sm_step=args.sm_step)
        except ImportError:
            print("commkit model: error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}")
    return 0
