"""``commkit.nn.MoE``: a mixture-of-experts layer with expert parallelism over a ``commkit.Buffer``.

The layer, per token (H hidden, F the experts' intermediate size, E experts, K top-k):

    logits = x @ router.T                                    # float32 [T, E]
    scores = softmax(logits) or sigmoid(logits)              # gating, as DeepSeek-V3 (sigmoid)
    idx    = node-limited top-k of scores + expert_bias      # commkit.routing.node_limited_topk;
                                                             # the bias only selects
    w      = scores[idx] (/ their sum if normalize) * route_scale
    y      = sum_k w_k * SwiGLU_{idx_k}(bf16(x))  (+ shared(x))
    SwiGLU_e(v) = (silu(v @ w_gate[e]) * (v @ w_up[e])) @ w_down[e]

With a ``buffer`` (expert parallelism over its R ranks) rank r holds only experts [r*L, (r+1)*L),
L = E / R, and the layer runs router -> ``Buffer.dispatch`` (the tokens in bf16, or FP8 with
``fp8_dispatch``) -> its experts on the received rows, grouped by expert (``torch.nn.functional.
grouped_mm`` where the installed torch has it for the parameters' dtype and device, else a loop over
experts), each row weighted by its slots' gate weights -> ``Buffer.combine`` (rows back in bf16,
summed in float32). Everything is differentiable (``commkit.autograd``): the input, the router and
the experts get their gradients, the gate weights' through the dispatch. The router, the bias and
the shared expert are replicated on every rank (their gradients are per rank: all-reduce them as
data-parallel parameters); the experts are sharded.

Without a buffer (``buffer=None``) the same layer runs densely in one process with all E experts: a
loop over experts in float32, the oracle the expert-parallel layer is checked against (it rounds the
tokens to bf16, or through FP8 with ``fp8_dispatch``, as the communication does; it does not round
the expert outputs, which the expert-parallel layer sends back in bf16).

Auxiliary-loss-free balancing (DeepSeek-V3): with ``bias_update_rate > 0`` each training forward
adds its tokens per expert to a load counter; ``update_bias()`` (call it once per optimizer step)
sums the counters over the group (``torch.distributed.all_reduce`` on the buffer's group), moves
``expert_bias`` by ``update_rate`` against the sign of (load - mean load) and returns the load.

``state_dict`` names experts by their global index: ``experts.{e}.w_gate`` [H, F], ``.w_up`` [H, F],
``.w_down`` [F, H]; a rank's layer saves its own experts and loads its own from any state dict that
has them (a dense layer's, or the union of all ranks'), ignoring the other ranks' experts.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from commkit import autograd, routing
from commkit.fp8 import cast_from_fp8, cast_to_fp8

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _expert_init(seed: int, e: int, hidden: int, ffn: int) -> tuple[torch.Tensor, ...]:
    """Expert e's (w_gate [H, F], w_up [H, F], w_down [F, H]) from the seed: the same on every rank."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (e + 1))
    return (
        torch.randn(hidden, ffn, generator=gen) * hidden**-0.5,
        torch.randn(hidden, ffn, generator=gen) * hidden**-0.5,
        torch.randn(ffn, hidden, generator=gen) * ffn**-0.5,
    )


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """[N, H] -> [N, H]: (silu(x @ w_gate) * (x @ w_up)) @ w_down."""
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


class SwiGLU(nn.Module):
    """A SwiGLU MLP (the shared expert): w_gate [H, F], w_up [H, F], w_down [F, H]."""

    def __init__(self, hidden: int, ffn: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        weights = _expert_init(seed + 104729, -2, hidden, ffn)
        for name, w in zip(EXPERT_WEIGHTS, weights, strict=True):
            setattr(self, name, nn.Parameter(w.to(device=device, dtype=dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x.to(self.w_gate.dtype), self.w_gate, self.w_up, self.w_down)


@functools.cache
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``F.grouped_mm`` (forward and backward) runs here for this dtype (probed once)."""
    grouped_mm = getattr(F, "grouped_mm", None)
    if grouped_mm is None:
        return False
    try:
        a = torch.ones(16, 16, dtype=dtype, device=device_type, requires_grad=True)
        b = torch.ones(2, 16, 16, dtype=dtype, device=device_type, requires_grad=True)
        offs = torch.tensor([8, 16], dtype=torch.int32, device=device_type)
        grouped_mm(a, b, offs=offs).backward(torch.ones(16, 16, dtype=dtype, device=device_type))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class MoE(nn.Module):
    """A MoE layer (see the module docstring); ``forward(x)``: [..., H] -> [..., H] of x's dtype.

    Args:
        hidden: H (a multiple of 8: bf16 rows of 16-byte multiples; of 128 with ``fp8_dispatch``).
        ffn_hidden: F, the routed experts' intermediate size.
        num_experts: E, a multiple of the buffer's ranks.
        num_topk: K experts per token.
        buffer: the ``commkit.Buffer`` of the expert-parallel group, or None: dense, all experts here.
        gating: "softmax" or "sigmoid" (DeepSeek-V3).
        normalize: divide the K gate weights by their sum (None: True for sigmoid, False for softmax).
        route_scale: multiplies the gate weights (DeepSeek-V3's routed scaling factor).
        num_groups: score groups of node-limited routing (None: the buffer's nodes, 1 when dense);
            each holds E / num_groups contiguous experts.
        max_groups: groups a token may reach (None: all).
        bias_update_rate: step of auxiliary-loss-free balancing (0: off; see ``update_bias``).
        shared_ffn_hidden: intermediate size of a shared expert applied to every token (0: none).
        num_sms, fp8_dispatch, num_worst_tokens: passed to ``dispatch``/``combine`` (the SM budget,
            FP8 dispatch via ``cast_to_fp8``, outputs sized for that many rows with no host sync).
        seed: the parameters are drawn from it (expert e the same on every rank and in the dense layer).
        dtype, device: of the parameters (the experts compute in ``dtype``; the router in float32).
    """

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        num_experts: int,
        num_topk: int,
        *,
        buffer: Any = None,
        gating: str = "softmax",
        normalize: bool | None = None,
        route_scale: float = 1.0,
        num_groups: int | None = None,
        max_groups: int | None = None,
        bias_update_rate: float = 0.0,
        shared_ffn_hidden: int = 0,
        num_sms: int | None = None,
        fp8_dispatch: bool = False,
        num_worst_tokens: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.hidden = _check_positive("hidden", hidden)
        self.ffn_hidden = _check_positive("ffn_hidden", ffn_hidden)
        self.num_experts = _check_positive("num_experts", num_experts)
        self.num_topk = _check_positive("num_topk", num_topk)
        if num_topk > num_experts:
            raise ValueError(f"num_topk: expected at most num_experts={num_experts}, got {num_topk}")
        if gating not in ("softmax", "sigmoid"):
            raise ValueError(f"gating: expected 'softmax' or 'sigmoid', got {gating!r}")
        if hidden % 8:
            raise ValueError(
                f"hidden: expected a multiple of 8 (bf16 rows of 16-byte multiples), got {hidden}"
            )
        if fp8_dispatch and hidden % 128:
            raise ValueError(f"hidden: expected a multiple of 128 with fp8_dispatch, got {hidden}")
        if not isinstance(bias_update_rate, int | float) or bias_update_rate < 0:
            raise ValueError(f"bias_update_rate: expected a number >= 0, got {bias_update_rate!r}")
        if (
            isinstance(shared_ffn_hidden, bool)
            or not isinstance(shared_ffn_hidden, int)
            or shared_ffn_hidden < 0
        ):
            raise ValueError(f"shared_ffn_hidden: expected an int >= 0, got {shared_ffn_hidden!r}")
        if num_worst_tokens is not None:
            _check_positive("num_worst_tokens", num_worst_tokens)
        self.buffer = buffer
        self.num_ranks = buffer.num_ranks if buffer is not None else 1
        self.rank = buffer.rank if buffer is not None else 0
        if num_experts % self.num_ranks:
            raise ValueError(
                f"num_experts: expected a multiple of the buffer's {self.num_ranks} ranks, got {num_experts}"
            )
        if num_groups is None:
            num_groups = buffer.num_ranks // buffer.num_ranks_per_node if buffer is not None else 1
        if num_experts % num_groups:
            raise ValueError(f"num_groups: expected a divisor of num_experts={num_experts}, got {num_groups}")
        routing._check_groups(
            num_experts, num_topk, num_groups, num_groups if max_groups is None else max_groups
        )
        self.gating = gating
        self.normalize = gating == "sigmoid" if normalize is None else bool(normalize)
        self.route_scale = float(route_scale)
        self.num_groups, self.max_groups = num_groups, max_groups
        self.bias_update_rate = float(bias_update_rate)
        self.num_sms, self.fp8_dispatch, self.num_worst_tokens = num_sms, fp8_dispatch, num_worst_tokens
        self.num_local = num_experts // self.num_ranks
        self.first_expert = self.rank * self.num_local

        gen = torch.Generator().manual_seed(seed * 1_000_003)
        self.router = nn.Linear(hidden, num_experts, bias=False, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(num_experts, hidden, generator=gen) * hidden**-0.5)
        local = [_expert_init(seed, e, hidden, ffn_hidden) for e in self._local_experts()]
        for i, name in enumerate(EXPERT_WEIGHTS):
            stacked = torch.stack([w[i] for w in local]).to(device=device, dtype=dtype)
            setattr(self, name, nn.Parameter(stacked))  # [L, H, F] / [L, F, H]
        self.shared = (
            SwiGLU(hidden, shared_ffn_hidden, seed=seed, dtype=dtype, device=device)
            if shared_ffn_hidden
            else None
        )
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device))
        self.register_buffer("load", torch.zeros(num_experts, device=device), persistent=False)

    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's experts (sharded: their gradients are complete on this rank)."""
        return [getattr(self, name) for name in EXPERT_WEIGHTS]

    def replicated_parameters(self) -> list[nn.Parameter]:
        """The router and the shared expert: the same on every rank, each rank's gradient covering
        its own tokens (sum or average them over the group, as data-parallel parameters)."""
        return [self.router.weight, *(self.shared.parameters() if self.shared is not None else ())]

    def _local_experts(self) -> range:
        return range(self.first_expert, self.first_expert + self.num_local)

    # -- routing ------------------------------------------------------------------------------------

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_idx [T, K] int64, topk_weights [T, K] float32, differentiable)."""
        logits = F.linear(x.float(), self.router.weight.float())
        scores = logits.softmax(dim=-1) if self.gating == "softmax" else logits.sigmoid()
        bias = self.expert_bias if self.bias_update_rate > 0 else None
        idx, weights = routing.node_limited_topk(
            scores, self.num_topk, self.num_groups, self.max_groups, bias=bias, normalize=self.normalize
        )
        return idx, weights * self.route_scale

    def _count_load(self, topk_idx: torch.Tensor) -> None:
        """Tokens per expert of this forward into ``load`` (on the device: no host sync)."""
        cols = torch.where(topk_idx >= 0, topk_idx, self.num_experts).reshape(-1)
        counts = torch.zeros(self.num_experts + 1, device=topk_idx.device, dtype=self.load.dtype)
        counts.scatter_add_(0, cols, torch.ones_like(cols, dtype=self.load.dtype))
        self.load += counts[: self.num_experts]

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """One balancing step from the loads counted since the last call: returns the load [E] (summed
        over the group), moves ``expert_bias`` (when ``bias_update_rate > 0``) and resets the counter.
        Collective with a buffer: every rank calls it."""
        load = self.load.clone()
        if self.buffer is not None:
            if not dist.is_initialized():
                raise ValueError(
                    "update_bias: expected a torch.distributed process group to sum the loads over "
                    "(the buffer's group), got none (virtual ranks: sum the ranks' `load` yourself)"
                )
            dist.all_reduce(load, group=self.buffer.group)
        if self.bias_update_rate > 0:
            self.expert_bias.copy_(routing.update_expert_bias(self.expert_bias, load, self.bias_update_rate))
        self.load.zero_()
        return load

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise TypeError(f"x: expected a floating-point tensor [..., H], got {_describe(x)}")
        if x.shape[-1] != self.hidden:
            raise ValueError(
                f"x: expected a last dimension of hidden={self.hidden}, got shape {tuple(x.shape)}"
            )
        tokens = x.reshape(-1, self.hidden)
        topk_idx, topk_weights = self.route(tokens)
        if self.training:
            self._count_load(topk_idx)
        # The tokens travel (and are computed on) in bf16, or FP8 with fp8_dispatch
        wire = tokens.to(torch.bfloat16)
        if self.buffer is None:
            y = self._dense(wire, topk_idx, topk_weights)
        else:
            y = self._expert_parallel(wire, topk_idx, topk_weights)
        if self.shared is not None:
            y = y + self.shared(wire).float()
        return y.to(x.dtype).reshape(x.shape)

    def _dense(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The oracle: every expert in one process, float32 sum over the slots."""
        v = x.float()
        if self.fp8_dispatch:  # straight through the quantisation, as the FP8 dispatch's gradient
            v = v + (cast_from_fp8(*cast_to_fp8(x.detach())) - v).detach()
        v = v.to(self.w_gate.dtype)
        y = torch.zeros(x.shape[0], self.hidden, dtype=torch.float32, device=x.device)
        for e in range(self.num_experts):
            rows, slots = (topk_idx == e).nonzero(as_tuple=True)
            if rows.numel():
                out = swiglu(v[rows], self.w_gate[e], self.w_up[e], self.w_down[e]).float()
                y = y.index_add(0, rows, topk_weights[rows, slots, None] * out)
        return y

    def _expert_parallel(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        buf = self.buffer
        out = buf.dispatch(
            x, topk_idx, topk_weights, self.num_experts, num_sms=self.num_sms,
            cast_to_fp8=self.fp8_dispatch, num_worst_tokens=self.num_worst_tokens,
        )  # fmt: skip
        rows = self.local_experts(autograd.received_x(out), out.topk_idx, out.topk_weights)
        return buf.combine(rows.to(torch.bfloat16), out.handle, num_sms=self.num_sms).x.float()

    def local_experts(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """This rank's experts on received rows: x [N, H], topk_idx [N, K] (local index or -1),
        topk_weights [N, K] -> [N, H] float32, row i = sum over its local slots k of
        ``topk_weights[i, k] * SwiGLU_{topk_idx[i, k]}(x[i])``; rows without a local slot are 0.

        The (row, slot) pairs are sorted by expert (stable) into N * K rows of fixed size (pairs of
        unused slots last, as zeros), so the grouped path runs without reading a count back."""
        num_rows, num_topk = topk_idx.shape
        flat = topk_idx.reshape(-1)
        valid = flat >= 0
        key = torch.where(valid, flat, self.num_local)
        order = torch.sort(key, stable=True).indices  # [N*K]
        rows = order // num_topk
        keep = valid[order]
        inp = torch.where(keep[:, None], x[rows].to(self.w_gate.dtype), 0.0)
        counts = torch.zeros(self.num_local + 1, dtype=torch.int64, device=key.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        if _grouped_mm_works(inp.device.type, inp.dtype):
            offs = counts[: self.num_local].cumsum(0).to(torch.int32)
            offs[-1] = num_rows * num_topk  # the unused pairs (zeros) ride in the last group
            h = F.grouped_mm(inp, self.w_gate, offs=offs)
            u = F.grouped_mm(inp, self.w_up, offs=offs)
            out = F.grouped_mm(F.silu(h) * u, self.w_down, offs=offs)
        else:
            # NOTE: the loop needs the group sizes on the host (a read-back on a GPU)
            parts = []
            for e, part in enumerate(inp.split(counts.tolist(), dim=0)):
                if e < self.num_local and part.shape[0]:
                    parts.append(swiglu(part, self.w_gate[e], self.w_up[e], self.w_down[e]))
                else:
                    parts.append(torch.zeros_like(part[:, : self.hidden]))
            out = torch.cat(parts) if parts else inp[:, : self.hidden]
        gate = topk_weights.reshape(-1)[order] * keep
        y = torch.zeros(num_rows, self.hidden, dtype=torch.float32, device=x.device)
        return y.index_add(0, rows, gate[:, None] * out.float())

    # -- state dict: experts by global index -------------------------------------------------------

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in EXPERT_WEIGHTS:
            stacked = destination.pop(prefix + name)
            for i, e in enumerate(self._local_experts()):
                destination[f"{prefix}experts.{e}.{name}"] = stacked[i]

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        added = []
        for name in EXPERT_WEIGHTS:
            keys = [f"{prefix}experts.{e}.{name}" for e in self._local_experts()]
            missing = [k for k in keys if k not in state_dict]
            missing_keys.extend(missing)
            if not missing:
                state_dict[prefix + name] = torch.stack([state_dict[k] for k in keys])  # type: ignore[index]
                added.append(prefix + name)
        own_missing = set(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for key in added:
            del state_dict[key]  # type: ignore[attr-defined]
        # The stacked names are ours when the per-expert keys were missing (reported by those);
        # other ranks' experts are not unexpected.
        stacked_names = {prefix + name for name in EXPERT_WEIGHTS}
        missing_keys[:] = [k for k in missing_keys if k in own_missing or k not in stacked_names]
        unexpected_keys[:] = [k for k in unexpected_keys if not _is_expert_key(k, prefix, self.num_experts)]

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, num_experts={self.num_experts}, "
            f"num_topk={self.num_topk}, experts=[{self.first_expert}, {self.first_expert + self.num_local}), "
            f"gating={self.gating!r}, expert_parallel={self.buffer is not None}"
        )


def _is_expert_key(key: str, prefix: str, num_experts: int) -> bool:
    parts = key[len(prefix) :].split(".") if key.startswith(prefix) else []
    return (
        len(parts) == 3
        and parts[0] == "experts"
        and parts[1].isdigit()
        and int(parts[1]) < num_experts
        and parts[2] in EXPERT_WEIGHTS
    )


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
