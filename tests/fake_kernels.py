"""CPU stand-ins for the kernel launches of ``commkit.backends.kernels`` (shared by the host tests).

The kernels cannot run without a GPU, so each launch is executed by a small torch function that
follows the kernel's documented contract (inputs, ``meta`` layout, ``send_pos``, row placement); CUDA
streams and events are replaced by no-ops. With the ``fake`` fixture, ``commkit.emulate.EmulatedGroup``
works on ``device="cpu"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from commkit import reference
from commkit.backends import internode_layout as il
from commkit.backends import kernel_args as ka
from commkit.backends import kernels_layout as kl
from commkit.backends import launcher
from commkit.fp8 import cast_to_fp8
from commkit.jit.compiler import KernelSpec


class FakeKernels:
    """A launcher (``commkit.backends.launcher.Launcher``) that runs 'launches' with torch stand-ins on
    CPU tensors; each stand-in gets the launch's ``commkit.backends.kernel_args`` instance and reads
    the arguments by name (tensors as they are, None for a null pointer)."""

    device_type = "cpu"
    num_sms = 132

    def __init__(self) -> None:
        self.launches: list[str] = []
        self.compiled: list[tuple[str, str, tuple, dict]] = []  # (header, kernel, targs, options) per lookup

    # ---------------------------------------------------------------- the Launcher protocol
    def kernel(self, spec: KernelSpec) -> tuple:
        options = (
            {"include_dirs": spec.include_dirs, "defines": spec.defines}
            if spec.include_dirs or spec.defines
            else {}
        )
        self.compiled.append((spec.header, spec.name, spec.template_args, options))
        return spec.name, spec.template_args

    def blocks_per_sm(self, kernel: tuple, num_threads: int) -> int:
        return 1

    def launch(self, kernel: tuple, num_blocks: int, num_threads: int, args: ka.KernelArgs) -> None:
        name, targs = kernel
        assert name == args.KERNEL, (args, name)
        self.launches.append(name)
        getattr(self, name)(targs, num_blocks, args)

    # ---------------------------------------------------------------- kernel contracts
    def layout_kernel(self, targs, blocks, a: ka.LayoutArgs):
        num_ranks, _ = targs
        topk, offsets, num_experts = a.topk_idx, a.token_offsets.tolist(), a.num_experts
        per_rank, per_expert, send_pos = a.num_tokens_per_rank, a.num_tokens_per_expert, a.send_pos
        in_rank = a.is_token_in_rank  # None: dispatch does not read it
        for lr in range(blocks):
            rows = topk[offsets[lr] : offsets[lr + 1]]
            lay = reference.layout_reference(rows, int(num_experts), num_ranks)
            per_rank[lr] = lay.num_tokens_per_rank.to(torch.int32)
            per_expert[lr] = lay.num_tokens_per_expert.to(torch.int32)
            if in_rank is not None:
                in_rank[offsets[lr] : offsets[lr + 1]] = lay.is_token_in_rank
            pos = torch.cumsum(lay.is_token_in_rank.to(torch.int32), 0) - 1
            send_pos[offsets[lr] : offsets[lr + 1]] = torch.where(lay.is_token_in_rank, pos, -1).to(
                torch.int32
            )

    def notify_kernel(self, targs, blocks, a: ka.NotifyArgs):
        (num_ranks,) = targs
        assert blocks == num_ranks and int(a.rank_base) == 0  # virtual ranks: every rank in the launch
        self._agreed(a.status)
        num_local_experts = int(a.num_experts) // num_ranks
        offsets, per_rank, per_expert, meta = (
            a.token_offsets.tolist(),
            a.num_tokens_per_rank,
            a.num_tokens_per_expert,
            a.meta,
        )
        align, max_rows = a.expert_alignment, a.num_max_recv_rows
        for dst in range(num_ranks):
            acc = 0
            for src in range(num_ranks):
                meta[dst, src] = acc
                acc += int(per_rank[src, dst])
                meta[dst, num_ranks + 1 + src] = offsets[src + 1] - offsets[src]
            meta[dst, num_ranks] = acc
            assert int(max_rows) < 0 or acc <= int(max_rows)
            lo = dst * num_local_experts
            counts = per_expert[:, lo : lo + num_local_experts].sum(0)
            meta[dst, 2 * num_ranks + 1 :] = (counts + int(align) - 1) // int(align) * int(align)

    def cached_notify_kernel(self, targs, blocks, a: ka.CachedNotifyArgs):
        self._agreed(a.status)

    def _agreed(self, status: torch.Tensor) -> None:
        """Every rank is in the launch: they agree (csrc/notify.cuh agree_on_call's status)."""
        status.zero_()
        status[:, kl.STATUS_PEER] = -1
        status[:, kl.STATUS_SEQ] = self.call_seq = getattr(self, "call_seq", -1) + 1

    def dispatch_kernel(self, targs, blocks, a: ka.DispatchArgs):
        num_ranks, hidden, num_topk, dtype = targs
        assert blocks == num_ranks * int(a.num_channels) and int(a.num_channels) <= int(a.max_channels)
        scales = a.x_scales if dtype == kl.DTYPE_FP8 else None
        out_scales = a.out_x_scales if dtype != kl.DTYPE_BF16 else None
        outs = (a.out_x, out_scales, a.out_topk_idx, a.out_topk_weights, a.out_src_token)
        self._place_rows(
            num_ranks,
            int(a.num_experts),
            dtype,
            a.token_offsets.tolist(),
            a.x,
            scales,
            a.topk_idx,
            a.topk_weights,
            a.send_pos,
            a.meta,
            a.recv_row_offsets.tolist(),
            outs,
        )

    @staticmethod
    def _place_rows(
        num_ranks, num_experts, dtype, offsets, x, scales, topk, weights, send_pos, meta, recv_rows, outs
    ):
        """Dispatch's contract: row of (src, t) at recv_rows[dst] + meta[dst, src] + send_pos[t, dst]."""
        out_x, out_scales, out_idx, out_w, out_src = outs
        num_local = num_experts // num_ranks
        for dst in range(num_ranks):
            for src in range(num_ranks):
                for t in range(offsets[src], offsets[src + 1]):
                    pos = int(send_pos[t, dst])
                    if pos < 0:
                        continue
                    row = recv_rows[dst] + int(meta[dst, src]) + pos
                    if dtype == kl.DTYPE_BF16_CAST_FP8:
                        q, s = cast_to_fp8(x[t : t + 1])
                        out_x[row], out_scales[row] = q[0], s[0]
                    else:
                        out_x[row] = x[t]
                        if scales is not None:
                            out_scales[row] = scales[t]
                    local = topk[t] - dst * num_local
                    out_idx[row] = torch.where((local >= 0) & (local < num_local) & (topk[t] >= 0), local, -1)
                    out_w[row] = weights[t]
                    out_src[row] = t - offsets[src]

    def _net_layout(self, net: torch.Tensor) -> tuple[int, int]:
        """(num_nodes, gpus_per_node) decoded from the packed NvlinkDomainNet argument."""
        raw = bytes(net.tolist())
        assert len(raw) == il.NVLINK_DOMAIN_NET_BYTES
        num_nodes, gpus_per_node = il.InterLayout.STRUCT.unpack(raw[8:])[:2]
        return num_nodes, gpus_per_node

    def internode_dispatch_kernel(self, targs, blocks, a: ka.InternodeDispatchArgs):
        _, gpus, nodes, hidden, num_topk, dtype, _fwd_warps = targs
        assert self._net_layout(a.net_ptr) == (nodes, gpus)
        num_ranks = nodes * gpus
        assert blocks == num_ranks * int(a.num_channels)
        offsets, x, topk, weights = a.token_offsets.tolist(), a.x, a.topk_idx, a.topk_weights
        send_pos, meta, recv_rows = a.send_pos, a.meta, a.recv_row_offsets.tolist()
        node_pos, fwd_offsets = a.node_send_pos, a.fwd_offsets.view(num_ranks, nodes + 1)
        fwd_mask, fwd_token = a.fwd_mask, a.fwd_token
        outs = (a.out_x, a.out_x_scales, a.out_topk_idx, a.out_topk_weights, a.out_src_token)
        scales = a.x_scales if dtype == kl.DTYPE_FP8 else None
        self._place_rows(
            num_ranks,
            int(a.num_experts),
            dtype,
            offsets,
            x,
            scales,
            topk,
            weights,
            send_pos,
            meta,
            recv_rows,
            outs,
        )
        # The forwarder of (n, g) records, per source node m and node_pos, the GPUs j and the token
        for fwd in range(num_ranks):
            n, g = divmod(fwd, gpus)
            for m in range(nodes):
                src = m * gpus + g
                for t in range(offsets[src], offsets[src + 1]):
                    pos = int(node_pos[t, n])
                    assert (pos >= 0) == bool((send_pos[t, n * gpus : (n + 1) * gpus] >= 0).any())
                    if pos < 0:
                        continue
                    idx = int(fwd_offsets[fwd, m]) + pos
                    assert idx < int(fwd_offsets[fwd, m + 1])
                    mask = sum(1 << j for j in range(gpus) if int(send_pos[t, n * gpus + j]) >= 0)
                    fwd_mask[idx], fwd_token[idx] = mask, t - offsets[src]

    def internode_combine_kernel(self, targs, blocks, a: ka.InternodeCombineArgs):
        _, gpus, nodes, hidden, _fwd_warps = targs
        assert self._net_layout(a.net_ptr) == (nodes, gpus)
        num_ranks = nodes * gpus
        offsets, x, recv_rows = a.token_offsets.tolist(), a.x, a.recv_row_offsets.tolist()
        recv_src, meta, node_pos, out = a.recv_src_token, a.meta, a.node_send_pos, a.out
        fwd_offsets = a.fwd_offsets.view(num_ranks, nodes + 1)
        fwd_mask, fwd_token = a.fwd_mask, a.fwd_token
        partials = {}  # (source rank, token, node) -> bf16 partial, from the forwarders' records
        for fwd in range(num_ranks):
            n, g = divmod(fwd, gpus)
            for m in range(nodes):
                src = m * gpus + g
                lo, hi = int(fwd_offsets[fwd, m]), int(fwd_offsets[fwd, m + 1])
                for k in range(lo, hi):
                    token = int(fwd_token[k])
                    if token == 2**31 - 1:  # the unused tail (sorted after every token)
                        assert (fwd_token[k:hi] == token).all()
                        break
                    acc = torch.zeros(hidden, dtype=torch.float32)
                    for j in range(gpus):
                        if int(fwd_mask[k]) >> j & 1:
                            dst = n * gpus + j
                            # The rows from src at dst are in token order: the one of `token`
                            lo_row = recv_rows[dst] + int(meta[dst, src])
                            hi_row = recv_rows[dst] + int(meta[dst, src + 1])
                            hits = (recv_src[lo_row:hi_row] == token).nonzero()
                            assert len(hits) == 1
                            row = lo_row + int(hits[0])
                            acc = acc + x[row].float()
                    partials[src, token, n] = acc.to(torch.bfloat16)
        for src in range(num_ranks):
            for t in range(offsets[src], offsets[src + 1]):
                acc = torch.zeros(hidden, dtype=torch.float32)
                for m in range(nodes):
                    if int(node_pos[t, m]) >= 0:
                        acc = acc + partials.pop((src, t - offsets[src], m)).float()
                out[t] = acc.to(torch.bfloat16)
        assert not partials  # every partial was summed once

    def combine_kernel(self, targs, blocks, a: ka.CombineArgs):
        num_ranks, _ = targs
        offsets, x, recv_rows = a.token_offsets.tolist(), a.x, a.recv_row_offsets.tolist()
        recv_src, meta, send_pos, out = a.recv_src_token, a.meta, a.send_pos, a.out
        for src in range(num_ranks):
            for t in range(offsets[src], offsets[src + 1]):
                acc = torch.zeros(x.shape[1], dtype=torch.float32)
                for d in range(num_ranks):
                    pos = int(send_pos[t, d])
                    if pos >= 0:
                        row = recv_rows[d] + int(meta[d, src]) + pos
                        assert int(recv_src[row]) == t - offsets[src]
                        acc = acc + x[row].float()
                out[t] = acc.to(torch.bfloat16)


def install_fakes(setattr_: Any, fk: FakeKernels | None = None) -> FakeKernels:
    """Stub the CUDA calls of the one-rank-per-process backends for ``fk``, which the caller makes the
    engines' launcher (``commkit.backends.launcher.use`` or ``set_default``); ``setattr_``:
    monkeypatch.setattr in a test, plain ``setattr`` in a spawned process."""
    import commkit.backends

    fk = fk or FakeKernels()
    props = type("Props", (), {"multi_processor_count": 132})()
    setattr_(torch.cuda, "get_device_properties", lambda device=None: props)
    setattr_(torch.cuda, "synchronize", lambda device=None: None)
    setattr_(torch.cuda, "Stream", lambda device=None: None)
    setattr_(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    setattr_(commkit.backends, "kernels_unavailable_reason", lambda group=None: None)
    return fk


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernels]:
    with launcher.use(install_fakes(monkeypatch.setattr)) as fk:
        yield fk
