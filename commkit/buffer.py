"""``commkit.Buffer``: the dispatch/combine API that MoE layers call."""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings

import torch
import torch.distributed as dist

from commkit import autograd, validate
from commkit.backends import BACKENDS
from commkit.backends.base import Backend
from commkit.backends.internode import KNOBS
from commkit.backends.select import select
from commkit.errors import CommError, ConfigError
from commkit.profiles import BufferConfig, cluster_signature, resolve_config
from commkit.types import CombineOutput, DispatchOutput, EventHandle, Handle, Layout

DEFAULT_TIMEOUT_S = 60.0
_buffer_ids = itertools.count(1)  # NOTE: not self.id: ids of collected objects are reused


def _check_timeout(timeout_s: float) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not 0 < timeout_s <= 86400:
        raise ValueError(f"timeout_s: expected a positive number of seconds up to 86400, got {timeout_s!r}")
    return float(timeout_s)


def _ranks_per_node(num_ranks_per_node: int | None, num_ranks: int) -> int:
    """G for a group of R ranks (see ``Buffer``); raises ValueError naming the argument."""
    source = "num_ranks_per_node"
    if num_ranks_per_node is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None:
            return num_ranks
        source = f"num_ranks_per_node (None: $LOCAL_WORLD_SIZE={env!r})"
        try:
            num_ranks_per_node = min(int(env), num_ranks)
        except ValueError:
            raise ValueError(f"{source}: expected a positive integer of ranks per node") from None
    if isinstance(num_ranks_per_node, bool) or not isinstance(num_ranks_per_node, int):
        raise TypeError(f"{source}: expected an int or None, got {type(num_ranks_per_node).__name__}")
    if num_ranks_per_node < 1 or num_ranks % num_ranks_per_node:
        raise ValueError(
            f"{source}: expected a positive divisor of the group's {num_ranks} ranks "
            f"(nodes hold contiguous ranks), got {num_ranks_per_node}"
        )
    return num_ranks_per_node


class Buffer:
    """Expert-parallel dispatch and combine over a process group.

    Args:
        group: the expert-parallel ``torch.distributed`` process group (default: WORLD); R ranks.
        num_sms: SMs given to the communication kernels (a per-call ``num_sms`` overrides it); None
            takes a tuning profile matching this cluster, else the default (see ``buf.config``).
        backend: "auto" (the kernels when CUDA, CuPy and an NCCL group are there, and for a group
            of several nodes also NCCL's GIN device API (NCCL >= 2.28.7 headers) and at most 32
            ranks, 8 per node; else "torch"), "torch" (torch.distributed all-to-all, gloo or NCCL)
            or "kernels". Over several nodes the kernels are the internode ones
            (``commkit.backends.internode_backend``): a token crosses the network once per node.
        timeout_s: how long a rank waits for its peers before raising ``TimeoutError``.
        check_values: read ``topk_idx`` to check its range and compare a handle's routing; None
            checks CPU tensors only (on CUDA tensors the read is a host sync).
        num_ranks_per_node: G, ranks per node; nodes group the group's ranks contiguously (node n
            holds ranks [n*G, (n+1)*G)). None: ``$LOCAL_WORLD_SIZE`` (set by torchrun) if set, at
            most R (a group no larger than a node is taken to sit on one node), else R. G must
            divide R. With more than one node both backends run two-level (``torch``: see
            ``commkit.backends.torch_hier``) and combine sums per node first (see ``combine``);
            ``buf.num_ranks_per_node`` says which G is in use.

    Experts are split evenly and contiguously over ranks: with E experts, rank r hosts experts
    [r*E/R, (r+1)*E/R). See ``dispatch`` and ``combine`` for the exact semantics.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        num_sms: int | None = None,
        backend: str = "auto",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        check_values: bool | None = None,
        num_ranks_per_node: int | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise ValueError(
                "group: expected an initialised torch.distributed process group, got none "
                "(call torch.distributed.init_process_group first, or use commkit.emulate for "
                "virtual ranks on one GPU)"
            )
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if dist.get_rank(group) < 0:
            raise ValueError(
                f"group: expected a process group this process belongs to, got one without it "
                f"(global rank {dist.get_rank()})"
            )
        self.group = group
        self.timeout_s = _check_timeout(timeout_s)
        if num_sms is not None:
            validate.check_int("num_sms", num_sms, 1)
        self.num_ranks_per_node = _ranks_per_node(num_ranks_per_node, dist.get_world_size(group))
        self._setup(
            select(backend, group, timeout_s=self.timeout_s, num_ranks_per_node=self.num_ranks_per_node),
            check_values,
        )
        # NOTE: the backend is chosen first: a profile tuned for one backend must not configure another.
        # NOTE: profiles are keyed by the nodes this buffer runs on (num_ranks_per_node as resolved)
        signature = dataclasses.replace(cluster_signature(group), num_ranks_per_node=self.num_ranks_per_node)
        self.config: BufferConfig = resolve_config(num_sms, signature=signature, backend=self.backend)
        self._apply_profile_knobs()

    @classmethod
    def from_backend(
        cls,
        backend: Backend,
        *,
        num_sms: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        check_values: bool | None = None,
    ) -> Buffer:
        """A Buffer over a backend object that is one rank of its own group, e.g. a virtual rank:
        ``commkit.emulate.EmulatedGroup(8).spawn(lambda rank: work(Buffer.from_backend(rank)))``.
        Profiles are matched with the backend's ranks, all on this node."""
        self = cls.__new__(cls)
        self.group = None
        self.num_ranks_per_node = backend.num_ranks_per_node  # the (virtual) nodes it runs on
        self.timeout_s = _check_timeout(timeout_s)
        if num_sms is not None:
            validate.check_int("num_sms", num_sms, 1)
        self._setup(backend, check_values)
        signature = dataclasses.replace(
            cluster_signature(), num_ranks=backend.num_ranks, num_ranks_per_node=self.num_ranks_per_node
        )
        self.config = resolve_config(num_sms, signature=signature, backend=backend.name)
        self._apply_profile_knobs()
        return self

    def _setup(self, backend: Backend, check_values: bool | None) -> None:
        self.id = next(_buffer_ids)
        self.check_values = check_values
        self._backend = backend
        self._closed = False
        self.rank = backend.rank
        self.num_ranks = backend.num_ranks

    @property
    def device_type(self) -> str:
        """Where the tensors passed to this buffer live: "cpu" (gloo) or "cuda"."""
        return self._backend.device_type

    @property
    def backend(self) -> str:
        """Name of the backend in use: "torch" or "kernels"."""
        return self._backend.name

    def _check_open(self, call: str) -> None:
        if self._closed:
            raise CommError(
                f"Buffer.{call}: this buffer was closed (Buffer.close released its {self.backend!r} "
                "backend); make a new Buffer"
            )

    def _check_values(self, t: torch.Tensor) -> bool:
        return self.check_values if self.check_values is not None else t.device.type == "cpu"

    def _num_sms(self, num_sms: int | None) -> int:
        if num_sms is None:
            return self.config.num_sms
        return validate.check_int("num_sms", num_sms, 1)

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        """Where this rank's tokens go (local, no communication).

        topk_idx: [T, K] int64 in [-1, E). Returns ``Layout``: num_tokens_per_rank [R],
        num_tokens_per_expert [E] (a token counted once per expert), is_token_in_rank [T, R] bool;
        with the ``torch`` backend and the internode kernels also num_tokens_per_node [N] (a token
        counted once per node of ``num_ranks_per_node`` ranks) and is_token_in_node [T, N] bool
        (None with the intranode kernels).
        """
        self._check_open("get_dispatch_layout")
        num_experts = validate.check_num_experts(num_experts, self.num_ranks)
        topk_idx = validate.check_topk_idx(topk_idx, None, num_experts, self._check_values(topk_idx))
        return self._backend.get_dispatch_layout(topk_idx, num_experts)

    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_experts: int,
        *,
        layout: Layout | None = None,
        handle: Handle | None = None,
        expert_alignment: int = 1,
        num_sms: int | None = None,
        previous_event: EventHandle | None = None,
        async_finish: bool = False,
        cast_to_fp8: bool = False,
        num_worst_tokens: int | None = None,
    ) -> DispatchOutput:
        """Send each token to the ranks that host its experts.

        Args:
            x: [T, H] bfloat16, or an FP8 pair (float8_e4m3fn [T, H], float32 scales [T, ceil(H/128)]).
                A row must be a multiple of 16 bytes.
            topk_idx: [T, K] int64, expert of each slot in [0, E), or -1 for an unused slot.
            topk_weights: [T, K] float32, carried to the receivers unchanged.
            num_experts: E, a multiple of R.
            layout: this routing's ``get_dispatch_layout`` result, to skip recomputing it (trusted:
                only its shape is checked).
            handle: the handle of an earlier dispatch with the same routing: skips the layout and
                the count exchange. All ranks pass a handle, or none do.
            expert_alignment: round ``num_tokens_per_expert`` up to a multiple of this.
            num_sms: SM budget of this call (kernels backend).
            previous_event: work the dispatch must wait for.
            async_finish: return before the communication ends; ``out.event`` marks its end.
            cast_to_fp8: send bf16 ``x`` as FP8 (``commkit.fp8.cast_to_fp8``: e4m3 with a float32
                scale per 128 elements, H % 128 == 0); ``out.x`` is then the FP8 pair's data.
            num_worst_tokens: size the outputs for this many received rows instead of reading the
                receive count back (no host sync: CUDA-graph capturable). ``out.x`` and the others
                then have ``num_worst_tokens`` rows of which the first N_recv are valid (past them
                ``topk_idx`` is -1, ``topk_weights`` 0, ``x`` unspecified), and
                ``out.num_tokens_per_expert`` is empty.

        Returns ``DispatchOutput``: a token goes to a rank once, however many of its experts live
        there; rows are ordered by source rank, then source token index. ``out.topk_idx`` [N_recv, K]
        holds local expert indices (``e - rank*L``) for this rank's experts and -1 for the others;
        ``out.topk_weights`` [N_recv, K] the source's weights; ``out.num_tokens_per_expert`` L ints,
        received rows using each local expert, rounded up to ``expert_alignment``.

        Autograd (``commkit.autograd``): when ``x`` or ``topk_weights`` requires grad, ``out.x`` and
        ``out.topk_weights`` carry gradients; the backward is one combine with ``out.handle`` (no
        host sync). ``out.topk_weights[:, k]`` is differentiable where ``out.topk_idx[:, k] >= 0``
        (the slot's expert is here); the other slots' weights are copies without gradient. No
        gradient: ``topk_idx``, the FP8 scales and an FP8 pair ``x``; with ``cast_to_fp8`` the
        differentiable rows are ``out.x_dequantized`` (float32) and ``x`` gets a bf16 gradient.
        """
        self._check_open("dispatch")
        data, scales = validate.split_x(x)
        num_experts = validate.check_num_experts(num_experts, self.num_ranks)
        check_values = self._check_values(topk_idx) if isinstance(topk_idx, torch.Tensor) else True
        topk_idx = validate.check_topk_idx(topk_idx, data.shape[0], num_experts, check_values)
        topk_weights = validate.check_topk_weights(topk_weights, topk_idx)
        validate.check_int("expert_alignment", expert_alignment, 1)
        if cast_to_fp8:
            validate.check_fp8_cast(data, scales)
        if num_worst_tokens is not None:
            validate.check_int("num_worst_tokens", num_worst_tokens, 0)
        device = validate.check_same_device(
            x=data, topk_idx=topk_idx, topk_weights=topk_weights, x_scales=scales
        )
        validate.check_device_type("x", device, self._backend.device_type)
        if layout is not None and not isinstance(layout, Layout):
            raise TypeError(
                f"layout: expected a commkit Layout from get_dispatch_layout, got {type(layout).__name__}"
            )
        if layout is not None and tuple(layout.is_token_in_rank.shape) != (data.shape[0], self.num_ranks):
            raise ValueError(
                f"layout: expected is_token_in_rank of shape {(data.shape[0], self.num_ranks)}, "
                f"got {tuple(layout.is_token_in_rank.shape)} (a layout of another routing)"
            )
        validate.check_event("previous_event", previous_event)
        if handle is not None:
            validate.check_handle(
                handle,
                buffer_id=self.id,
                backend=self.backend,
                num_tokens=data.shape[0],
                num_experts=num_experts,
                topk_idx=topk_idx,
                check_values=check_values,
            )
        budget = self._num_sms(num_sms)

        def run(data: torch.Tensor, topk_weights: torch.Tensor) -> DispatchOutput:
            return self._backend.dispatch(
                data,
                scales,
                topk_idx,
                topk_weights,
                num_experts,
                layout=layout,
                handle=handle,
                expert_alignment=expert_alignment,
                num_sms=budget,
                previous_event=previous_event,
                async_finish=async_finish,
                buffer_id=self.id,
                cast_to_fp8=cast_to_fp8,
                num_worst_tokens=num_worst_tokens,
            )

        if autograd.needs_grad(data, topk_weights):
            if scales is not None and data.requires_grad:
                raise TypeError(
                    "x: expected an FP8 pair without gradient (float8 data cannot carry one), got x[0] "
                    "that requires grad; dispatch the bf16 x with cast_to_fp8=True to train with FP8 "
                    "dispatch (its gradient comes back in bf16)"
                )
            call = autograd.DispatchCall(self, run, budget, fp8_out=cast_to_fp8 or scales is not None)
            out = autograd.dispatch(call, data, topk_weights)
        else:
            out = run(data, topk_weights)
        autograd.remember_num_worst_tokens(out.handle, num_worst_tokens)
        return out

    def combine(
        self,
        x: torch.Tensor,
        handle: Handle,
        *,
        num_sms: int | None = None,
        previous_event: EventHandle | None = None,
        async_finish: bool = False,
    ) -> CombineOutput:
        """Send each received row back to its source token and sum.

        Args:
            x: [N_recv, H] bfloat16, one row per row received by the dispatch, in its order (a MoE
                layer weights its expert outputs before combine).
            handle: ``out.handle`` of that dispatch.

        Returns ``CombineOutput``: ``y.x`` [T, H] bfloat16; per token the rows that come back are
        summed in float32 starting from +0.0, in ascending order of the rank that sends them, then
        rounded to bfloat16. A token that went nowhere comes back as zeros. Over several nodes the
        sum is two-level: per node the token reached, its ranks' rows summed that way and rounded to
        bfloat16; then those partials summed in float32 from +0.0 in ascending node order, rounded
        to bfloat16 (with one node the same bits as the one-level rule).

        Autograd: when ``x`` requires grad, ``y.x`` carries its gradient; the backward is a cached
        dispatch of the gradient (bf16) with ``handle``: each received row gets its source token's
        gradient (zeros for ``num_worst_tokens`` padding rows). ``handle`` has no gradient.
        """
        self._check_open("combine")
        validate.check_handle(handle, buffer_id=self.id, backend=self.backend)
        x = validate.check_combine_x(x, handle)
        validate.check_device_type("x", x.device, self._backend.device_type)
        validate.check_event("previous_event", previous_event)
        budget = self._num_sms(num_sms)

        def run(x: torch.Tensor) -> CombineOutput:
            return self._backend.combine(
                x, handle, num_sms=budget, previous_event=previous_event, async_finish=async_finish
            )

        if autograd.needs_grad(x):
            return autograd.combine(autograd.CombineCall(self, handle, budget, run), x)
        return run(x)

    def set_knobs(self, **knobs: int) -> None:
        """Kernel parameters besides the SM budget. The internode kernels' role split:
        ``internode_dispatch_forwarder_warps`` (1-7 of the 8 warps that send: the net senders get the
        rest; default 4) and ``internode_combine_forwarder_warps`` (1-7 of the 8 that reduce: the final
        reducers get the rest; default 4). Every rank must set the same values. A tuning profile's
        knobs are applied when the buffer takes its budget from that profile (no ``num_sms``). Other
        backends have none: the call warns and changes nothing (``buf.knobs`` is then {})."""
        self._check_open("set_knobs")
        unknown = sorted(set(knobs) - set(KNOBS))
        if unknown:
            raise ValueError(f"knobs: expected names among {sorted(KNOBS)}, got {unknown}")
        if not self.knobs:
            warnings.warn(
                f"set_knobs: the {self.backend!r} backend in use here has no knobs (the internode kernels "
                "do); nothing changed",
                stacklevel=2,
            )
            return
        self._backend.set_knobs(dict(knobs))

    @property
    def internode_transport(self) -> str | None:
        """The inter-node hop of the internode kernels ("gin" or "nvlink-domain"); None for the other
        backends."""
        return self._backend.transport

    @property
    def knobs(self) -> dict[str, int]:
        """Kernel parameters in use (see ``set_knobs``); {} for a backend without any."""
        return dict(self._backend.knobs)

    def _apply_profile_knobs(self) -> None:
        known = {name: value for name, value in self.config.knobs if name in KNOBS}
        if known and self.knobs:
            try:
                self._backend.set_knobs(known)
            except ConfigError as exc:
                # NOTE: profiles are read per node: raising here could strand other nodes' ranks in a
                # collective; the profile's knobs are ignored instead
                warnings.warn(f"{self.config.source}: knobs ignored: {exc}", stacklevel=3)

    def close(self) -> None:
        """Release the backend's resources (the kernels' symmetric buffer: collective, bounded by
        ``timeout_s``). Afterwards every call raises ``CommError``; a second close does nothing."""
        if self._closed:
            return
        self._closed = True
        self._backend.close()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Buffer(rank={self.rank}, num_ranks={self.num_ranks}, backend={self.backend!r}, "
            f"num_ranks_per_node={self.num_ranks_per_node}, "
            f"num_sms={self.config.num_sms} ({self.config.source}), timeout_s={self.timeout_s:g})"
        )
