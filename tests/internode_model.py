"""CPU: an executable model of csrc/internode_dispatch.cuh and csrc/internode_combine.cuh.

Every role of every (rank, channel) block is a Python generator that mirrors the kernel's code (the
comments name the kernel lines); it yields a ``Wait`` wherever the kernel spins on a counter or a signal
and the condition does not hold yet, and a plain ``None`` after every row or publication (a point where
the scheduler may switch). ``schedule`` interleaves the generators under a seeded random policy and
raises ``Deadlock`` when every live role waits on a location nobody will write again.

Modeled: N nodes x G GPUs (rank = node * G + local), num_channels blocks per rank (token ranges as
channel_token_range), the NVLink rings (``nvl_slots`` slots, tail/head published every ``nvl_chunk`` rows
and at the end, kFinishedBit in the dispatch tail), the net rings (``net_slots`` slots, signals grown by
deltas: put_signal every ``net_chunk`` rows, the rest (+ kFinishedBit in dispatch) at the end, head
signal_add deltas), a Net either writing straight into the peer's ring (NvlinkDomainNet) or into a
staging copy that put_signal delivers (GinNet), the end-of-kernel waits and the resets of counters and
signals by their owners. Rows carry real payloads (bf16 rows, top-k, weights, metadata), so the outputs
are compared with commkit.reference bit for bit.

Checked on the fly (``ProtocolError``): a slot is written only when its reader has freed it (head), read
only when its writer has published it (tail) and holds the row of that position in this launch; a
counter or signal is never written after its owner reset it; every output row and forwarder record is
written once; the combine's rows and partials belong to the token expected. Not modeled: the memory
model (weak stores, fences, release/acquire: a write here is visible to everyone at once), warps inside
a group (a group is one actor), timeouts, FP8 rows, virtual ranks (token_base = 0).
"""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import torch

from commkit.reference import layout_reference

# csrc/common.cuh, csrc/net.cuh
FINISHED = 1 << 30  # kFinishedBit
COUNT_MASK = FINISHED - 1  # kCountMask
NUM_SLOTS = 16  # kNumSlots
CHUNK = 4  # kChunk
NET_SLOTS = 16  # kNetSlots
NET_CHUNK = 4  # kNetChunk
NET_SEND_WARPS = 4  # InterDispatchConfig::kNetSendWarps with the default role split
INT32_MAX = 2**31 - 1  # the host's fwd_token filler (commkit/backends/internode.py)

# CounterKind (NVLink counters) and NetSignal (net signals) share the numbering
DISPATCH_TAIL, DISPATCH_HEAD, COMBINE_TAIL, COMBINE_HEAD = 0, 1, 2, 3
KIND_NAMES = ("dispatch tail", "dispatch head", "combine tail", "combine head")


class ProtocolError(AssertionError):
    """The model caught the protocol breaking one of its invariants."""


class Deadlock(AssertionError):
    """Every live role waits on a location that no live role will write."""


@dataclass(frozen=True)
class Wait:
    """What a role spins on: a description and the locations whose writes may end the wait."""

    what: str
    keys: tuple


Step = Generator["Wait | None", None, None]


@dataclass(frozen=True)
class Params:
    """Ring geometry and variants. The defaults are the kernels'; the rest are for stress tests
    (smaller rings wrap more) and for deliberately broken variants (to show that deadlocks are found)."""

    nvl_slots: int = NUM_SLOTS
    nvl_chunk: int = CHUNK
    net_slots: int = NET_SLOTS
    net_chunk: int = NET_CHUNK
    net: str = "direct"  # "direct": NvlinkDomainNet; "gin": staging copy delivered by put_signal
    # "ascending" as the kernel; "rotating" (broken): the combine's NVLink senders and forwarders serve
    # the source nodes starting from their own node, (node + i) % N.
    combine_source_order: str = "ascending"
    # Dispatch net sender warps (kNumRoleWarps - the knob internode_dispatch_forwarder_warps): 1 to 7
    net_send_warps: int = NET_SEND_WARPS


def channel_token_range(num_tokens: int, num_channels: int, channel: int) -> range:
    """csrc/common.cuh channel_token_range."""
    return range(num_tokens * channel // num_channels, num_tokens * (channel + 1) // num_channels)


def bits_of(mask: int) -> Iterator[int]:
    """The set bits of mask, ascending (the kernels' `__ffs(bits) - 1; bits &= bits - 1` loops)."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


# ---------------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------------


class Machine:
    """The symmetric buffers of all ranks: NVLink counters, net signals, rings, staging copies.

    It outlives a launch (the next dispatch or combine runs on the same state) and counts ``version``
    per location so that the scheduler wakes exactly the roles a write may unblock.
    """

    def __init__(self, num_nodes: int, gpus_per_node: int, params: Params | None = None) -> None:
        self.num_nodes = num_nodes
        self.gpus = gpus_per_node
        self.params = params or Params()
        self.counters: dict[tuple, int] = defaultdict(int)  # (rank, kind, channel, peer local)
        self.signals: dict[tuple, int] = defaultdict(int)  # (rank, kind, channel, node)
        self.nvl_ring: dict[tuple, tuple] = {}  # (rank, channel, src local, slot) -> (launch, seq, row)
        self.net_ring: dict[tuple, tuple] = {}  # (rank, channel, src node, slot) -> (launch, seq, row)
        self.net_stage: dict[tuple, tuple] = {}  # (rank, channel, dst node, slot) -> (launch, seq, row)
        self.launch = 0
        self.kernel = ""
        self.zeroed: set[tuple] = set()  # (rank, channel) blocks of this launch that already reset
        self.written: list[tuple] = []  # keys written since the scheduler last looked
        self.net_rows = 0  # rows put to another node in this launch
        self.loopback_rows = 0  # rows put to the own node (combine)
        self.steps = 0

    # -- geometry
    def node_of(self, rank: int) -> int:
        return rank // self.gpus

    def local_of(self, rank: int) -> int:
        return rank % self.gpus

    def rank_of(self, node: int, local: int) -> int:
        return node * self.gpus + local

    @property
    def num_ranks(self) -> int:
        return self.num_nodes * self.gpus

    def begin(self, kernel: str) -> None:
        """A new launch, after the barrier of notify / cached notify: every counter and signal is 0."""
        stale = {k: v for k, v in self.counters.items() if v} | {k: v for k, v in self.signals.items() if v}
        if stale:
            raise ProtocolError(f"{kernel} starts with nonzero counters/signals: {sorted(stale.items())[:5]}")
        self.launch += 1
        self.kernel = kernel
        self.zeroed = set()
        self.net_rows = self.loopback_rows = 0

    def all_zero(self) -> bool:
        return not any(self.counters.values()) and not any(self.signals.values())

    def _check_not_reset(self, owner: int, kind: int, channel: int, what: str) -> None:
        if (owner, channel) in self.zeroed:
            raise ProtocolError(
                f"{self.kernel}: {KIND_NAMES[kind]} {what} of rank {owner} channel {channel} written after "
                "its owner reset it"
            )

    # -- NVLink counters (st.release.sys / ld.acquire.sys)
    def store_counter(self, owner: int, kind: int, channel: int, peer: int, value: int) -> None:
        self._check_not_reset(owner, kind, channel, f"counter[{peer}]")
        key = (owner, kind, channel, peer)
        if (self.counters[key] & COUNT_MASK) > (value & COUNT_MASK):
            raise ProtocolError(
                f"{self.kernel}: counter {key} goes back from {self.counters[key]} to {value}"
            )
        self.counters[key] = value
        self.written.append(("c", *key))

    def counter(self, owner: int, kind: int, channel: int, peer: int) -> int:
        return self.counters[(owner, kind, channel, peer)]

    # -- net signals (the Net concept of csrc/net.cuh)
    def add_signal(self, owner: int, kind: int, channel: int, node: int, delta: int) -> None:
        self._check_not_reset(owner, kind, channel, f"signal[{node}]")
        key = (owner, kind, channel, node)
        self.signals[key] += delta
        self.written.append(("s", *key))

    def signal(self, owner: int, kind: int, channel: int, node: int) -> int:
        return self.signals[(owner, kind, channel, node)]

    def send_slot_write(
        self, rank: int, node: int, channel: int, seq: int, row: object, head_kind: int
    ) -> None:
        """`view.send_slot(node, channel, seq % kNetSlots)` filled with `row` (the writer group's stores)."""
        p = self.params
        my_node, local = self.node_of(rank), self.local_of(rank)
        head = self.signal(rank, head_kind, channel, node) & COUNT_MASK
        if seq - head >= p.net_slots:
            raise ProtocolError(f"rank {rank} overwrites net slot {seq} of node {node} (head {head})")
        if p.net == "gin":
            self.net_stage[(rank, channel, node, seq % p.net_slots)] = (self.launch, seq, row)
        else:
            dst = self.rank_of(node, local)
            self.net_ring[(dst, channel, my_node, seq % p.net_slots)] = (self.launch, seq, row)

    def put_signal(
        self, rank: int, node: int, channel: int, first_slot: int, num_slots: int, kind: int, delta: int
    ) -> None:
        """Net::put_signal: deliver slots [first_slot, +num_slots) then add delta to the peer's signal."""
        p = self.params
        if first_slot < 0 or first_slot + num_slots > p.net_slots:
            raise ProtocolError(f"put_signal wraps: slots [{first_slot}, +{num_slots}) of {p.net_slots}")
        my_node, local = self.node_of(rank), self.local_of(rank)
        dst = self.rank_of(node, local)
        if p.net == "gin":
            for s in range(first_slot, first_slot + num_slots):
                staged = self.net_stage.get((rank, channel, node, s))
                if staged is None:
                    raise ProtocolError(f"rank {rank} puts net slot {s} to node {node} that it never staged")
                self.net_ring[(dst, channel, my_node, s)] = staged
        if node == my_node:
            self.loopback_rows += num_slots
        else:
            self.net_rows += num_slots
        self.add_signal(dst, kind, channel, my_node, delta)

    def signal_add(self, rank: int, node: int, kind: int, channel: int, delta: int) -> None:
        """Net::signal_add: delta to the signal (kind, channel, my node) of my rail peer on `node`."""
        self.add_signal(self.rank_of(node, self.local_of(rank)), kind, channel, self.node_of(rank), delta)

    def recv_slot(self, rank: int, channel: int, src_node: int, seq: int, tail_kind: int) -> object:
        """`view.recv_slot(channel, src_node, seq % kNetSlots)`, checked: published, and row `seq`."""
        tail = self.signal(rank, tail_kind, channel, src_node) & COUNT_MASK
        key = (rank, channel, src_node, seq % self.params.net_slots)
        where = f"row {seq} from node {src_node}"
        return self._checked_read(self.net_ring, key, rank, seq, tail, f"net {where}", f"net slot of {where}")

    # -- NVLink rings: queue (channel, src local) of rank `dst`
    def nvl_write(
        self, dst: int, channel: int, src_local: int, seq: int, row: object, head_kind: int
    ) -> None:
        src = self.rank_of(self.node_of(dst), src_local)
        head = self.counter(src, head_kind, channel, self.local_of(dst))
        if seq - head >= self.params.nvl_slots:
            raise ProtocolError(f"rank {src} overwrites NVLink slot {seq} of rank {dst} (head {head})")
        self.nvl_ring[(dst, channel, src_local, seq % self.params.nvl_slots)] = (self.launch, seq, row)

    def nvl_read(self, rank: int, channel: int, src_local: int, seq: int, tail_kind: int) -> object:
        tail = self.counter(rank, tail_kind, channel, src_local) & COUNT_MASK
        key = (rank, channel, src_local, seq % self.params.nvl_slots)
        row, slot = f"NVLink row {seq} of local {src_local}", f"NVLink slot of row {seq} from {src_local}"
        return self._checked_read(self.nvl_ring, key, rank, seq, tail, row, slot)

    def _checked_read(
        self, ring: dict, key: tuple, rank: int, seq: int, tail: int, row: str, slot: str
    ) -> object:
        """The row in ring[key], checked: row seq is published (below tail) and the slot holds it, from
        this launch (row, slot: how the errors name them)."""
        if seq >= tail:
            raise ProtocolError(f"rank {rank} reads {row}, published {tail}")
        got = ring.get(key)
        if got is None or got[:2] != (self.launch, seq):
            raise ProtocolError(f"rank {rank} {slot} holds {got and got[:2]}")
        return got[2]

    # -- block end (`__syncthreads(); reset`), kernel lines: dispatch 415-424, combine 313-322
    def reset_block(self, rank: int, channel: int, kinds: tuple[int, int], own_node_signals: bool) -> None:
        for kind in kinds:
            for j in range(self.gpus):
                self.counters[(rank, kind, channel, j)] = 0
            for m in range(self.num_nodes):
                if own_node_signals or m != self.node_of(rank):
                    self.signals[(rank, kind, channel, m)] = 0
        self.zeroed.add((rank, channel))


def wait_for(read: Callable[[], int], done: Callable[[int], bool], what: str, key: tuple) -> Generator:
    """`wait_until` / `wait_signal`: spin on an acquire load until done(value); returns the value."""
    while True:
        value = read()
        if done(value):
            return value
        yield Wait(what, (key,))


def wait_head(
    mc: Machine, rank: int, kind: int, c: int, peer: int, done: Callable[[int], bool], what: str, *, net: bool
) -> Generator:
    """wait_until the head counter of rank's NVLink queue to local GPU `peer` (net: wait_signal, the head
    signal of node `peer`) until done(head); returns the head. what: the condition, for deadlock reports."""
    if net:
        read, name, key = (lambda: mc.signal(rank, kind, c, peer)), f"net head of node {peer}", "s"
    else:
        read, name, key = (lambda: mc.counter(rank, kind, c, peer)), f"NVLink head of local {peer}", "c"
    return wait_for(read, done, f"{name} {what}", (key, rank, kind, c, peer))


def wait_slot(mc: Machine, rank: int, kind: int, c: int, peer: int, sent: int, *, net: bool) -> Generator:
    """Before row `sent` of a queue: the head leaves a slot of its ring free; returns the head."""
    slots = mc.params.net_slots if net else mc.params.nvl_slots
    return wait_head(mc, rank, kind, c, peer, lambda v: sent - v < slots, f"> {sent - slots}", net=net)


def wait_drained(mc: Machine, rank: int, kind: int, c: int, peer: int, sent: int, *, net: bool) -> Generator:
    """The end of a sender: the head of its queue reaches `sent` (every row consumed)."""
    return wait_head(mc, rank, kind, c, peer, lambda v: v >= sent, f">= {sent} (end)", net=net)


class BlockRoles:
    """The roles of each block (rank, channel c) of one launch: each says when it is done, and the
    block's end (__syncthreads, then the owner resets the block) waits for all of them."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.done: dict[tuple, int] = defaultdict(int)

    def role_done(self, rank: int, c: int) -> None:
        self.done[(rank, c)] += 1
        self.machine.written.append(("done", rank, c))

    def block_end(
        self, rank: int, c: int, num_roles: int, kinds: tuple[int, int], own_node_signals: bool
    ) -> Step:
        """__syncthreads, then the owner resets its counters of kinds and its signals (own_node_signals:
        its own node's too)."""
        yield from wait_for(
            lambda: self.done[(rank, c)], lambda v: v == num_roles, "the block's roles", ("done", rank, c)
        )
        self.machine.reset_block(rank, c, kinds, own_node_signals=own_node_signals)


def run_launch(machine: Machine, actors: dict[str, Step], rng: random.Random, policy: str) -> None:
    """schedule the launch's roles; after the launch every counter and signal is 0 again."""
    schedule(machine, actors, rng, policy)
    if not machine.all_zero():
        raise ProtocolError(f"{machine.kernel} leaves nonzero counters/signals")


def schedule(machine: Machine, actors: dict[str, Step], rng: random.Random, policy: str = "uniform") -> None:
    """Runs the actors to completion under a random interleaving.

    uniform: any runnable actor at each step; sticky: keep the current actor with probability 0.9
    (long solo runs); priority: random priorities, the highest runnable runs, one priority redrawn now
    and then (starves some roles for long stretches). A role that yields a Wait is parked until one of
    its keys is written; with every live role parked the run is a deadlock.
    """
    gens = dict(actors)
    runnable = list(gens)
    parked: dict[str, Wait] = {}
    waiting_on: dict[tuple, set[str]] = defaultdict(set)
    prio = {name: rng.random() for name in gens}
    current: str | None = None
    max_steps = 20_000_000
    while gens:
        if not runnable:
            waits = "\n  ".join(f"{n}: {w.what}" for n, w in sorted(parked.items()))
            raise Deadlock(f"{machine.kernel}: deadlock, every live role waits:\n  {waits}")
        machine.steps += 1
        if machine.steps > max_steps:
            raise Deadlock(f"{machine.kernel}: no end after {max_steps} steps (livelock)")
        if policy == "sticky" and current in gens and current not in parked and rng.random() < 0.9:
            name = current
        elif policy == "priority":
            if rng.random() < 0.01:
                prio[rng.choice(runnable)] = rng.random()
            name = max(runnable, key=prio.__getitem__)
        else:
            name = runnable[rng.randrange(len(runnable))]
        current = name
        try:
            result = next(gens[name])
        except StopIteration:
            del gens[name]
            runnable.remove(name)
            result = None
        if isinstance(result, Wait):
            runnable.remove(name)
            parked[name] = result
            for key in result.keys:
                waiting_on[key].add(name)
        if machine.written:
            for key in machine.written:
                for woken in waiting_on.pop(key, ()):
                    if woken in parked:
                        for other in parked.pop(woken).keys:
                            if other != key:
                                waiting_on[other].discard(woken)
                        runnable.append(woken)
            machine.written.clear()


# ---------------------------------------------------------------------------------------------------
# Host side: the inputs the layout / notify kernels and the host give the internode kernels
# ---------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """A routing over N x G ranks and what layout + notify derive from it (token_base = 0 everywhere).

    send_pos[r][t][d]:      position of token t among those rank r sends to rank d (-1: none)
    node_send_pos[r][t][m]: position of token t among those rank r sends to node m (-1: none)
    recv_rank_offset[r]:    R + 1 prefix sums over the source ranks of the rows rank r receives (meta)
    fwd_offsets[r]:         N + 1 prefix sums over source nodes m: the forwarder records of rank r.
                            Exact (padded_records False): sized by the tokens rank (m, local r) sends to
                            node(r). Padded (as commkit/backends/internode.py): sized by the source's
                            token count, the unused tail keeps fwd_token = INT32_MAX and fwd_mask = 0.
    """

    num_nodes: int
    gpus: int
    num_experts: int
    xs: list[torch.Tensor]  # [T_r, H] bf16
    topk_idx: list[torch.Tensor]  # [T_r, K] int64, -1 unused
    topk_weights: list[torch.Tensor]  # [T_r, K] float32
    padded_records: bool = False
    send_pos: list[list[list[int]]] = field(init=False)
    node_send_pos: list[list[list[int]]] = field(init=False)
    recv_rank_offset: list[list[int]] = field(init=False)
    fwd_offsets: list[list[int]] = field(init=False)
    experts: list[list[list[int]]] = field(init=False)  # topk_idx as lists
    tokens_per_rank: list[list[int]] = field(init=False)  # [r][d] rows rank r sends to rank d
    tokens_per_node: list[list[int]] = field(init=False)  # [r][m] tokens rank r sends to node m

    def __post_init__(self) -> None:
        num_ranks, num_nodes, gpus = self.num_ranks, self.num_nodes, self.gpus
        self.experts = [idx.tolist() for idx in self.topk_idx]
        self.send_pos, self.node_send_pos = [], []
        per_rank, per_node = [], []  # [r][d] rows r sends to rank d, [r][m] tokens r sends to node m
        for r in range(num_ranks):
            lay = layout_reference(self.topk_idx[r], self.num_experts, num_ranks, gpus)
            in_rank, in_node = lay.is_token_in_rank.tolist(), lay.is_token_in_node.tolist()
            rank_count, node_count = [0] * num_ranks, [0] * num_nodes
            sp, nsp = [], []
            for t in range(len(in_rank)):
                row = []
                for d in range(num_ranks):
                    row.append(rank_count[d] if in_rank[t][d] else -1)
                    rank_count[d] += in_rank[t][d]
                sp.append(row)
                row = []
                for m in range(num_nodes):
                    row.append(node_count[m] if in_node[t][m] else -1)
                    node_count[m] += in_node[t][m]
                nsp.append(row)
            self.send_pos.append(sp)
            self.node_send_pos.append(nsp)
            per_rank.append(rank_count)
            per_node.append(node_count)
        self.recv_rank_offset = []
        for d in range(num_ranks):
            offsets = [0]
            for s in range(num_ranks):
                offsets.append(offsets[-1] + per_rank[s][d])
            self.recv_rank_offset.append(offsets)
        self.fwd_offsets = []
        for r in range(num_ranks):
            offsets = [0]
            for m in range(num_nodes):
                src = m * gpus + r % gpus
                offsets.append(
                    offsets[-1]
                    + (len(self.experts[src]) if self.padded_records else per_node[src][r // gpus])
                )
            self.fwd_offsets.append(offsets)
        self.tokens_per_rank = per_rank
        self.tokens_per_node = per_node

    @property
    def num_ranks(self) -> int:
        return self.num_nodes * self.gpus

    @property
    def num_tokens(self) -> list[int]:
        return [x.shape[0] for x in self.xs]

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.num_ranks

    def net_row_count(self) -> int:
        """Rows the dispatch sends over the inter-node hop: a token once per remote node it reaches."""
        return sum(
            count
            for r, counts in enumerate(self.tokens_per_node)
            for m, count in enumerate(counts)
            if m != r // self.gpus
        )

    def flat_row_count(self) -> int:
        """Rows a flat all-to-all would send between nodes: a token once per remote rank it reaches."""
        return sum(
            count
            for r, counts in enumerate(self.tokens_per_rank)
            for d, count in enumerate(counts)
            if d // self.gpus != r // self.gpus
        )


# Slot payloads (the bytes of a slot, as fields)
@dataclass(frozen=True)
class NetDispatchRow:  # [row][scales][global expert x K][weights x K][src_token][node_pos][send_pos x G]
    x: torch.Tensor
    experts: tuple[int, ...]
    weights: torch.Tensor
    src_token: int
    node_pos: int
    send_pos: tuple[int, ...]


@dataclass(frozen=True)
class NvlDispatchRow:  # [row][scales][local expert x K][weights x K][src_token][src_rank][send_pos]
    x: torch.Tensor
    local_experts: tuple[int, ...]
    weights: torch.Tensor
    src_token: int
    src_rank: int
    send_pos: int


@dataclass(frozen=True)
class CombineRow:  # NVLink [bf16 row][src_token, src_rank]; net [bf16 row][src_token]
    x: torch.Tensor
    src_token: int
    src_rank: int = -1


@dataclass
class DispatchResult:
    """Per rank: the received rows (as the kernel writes them) and the forwarder records."""

    x: list[torch.Tensor]
    topk_idx: list[torch.Tensor]
    topk_weights: list[torch.Tensor]
    src_token: list[list[int]]
    src_rank: list[list[int]]  # from the NVLink slots (the kernel uses it for the row, does not output it)
    fwd_mask: list[list[int]]
    fwd_token: list[list[int]]
    net_rows: int


# ---------------------------------------------------------------------------------------------------
# Dispatch (csrc/internode_dispatch.cuh)
# ---------------------------------------------------------------------------------------------------


def local_gpu_mask(experts, node: int, experts_per_rank: int, gpus: int) -> int:
    """local_gpu_mask (kernel lines 54-61): bit j for an expert on GPU j of `node`."""
    first = node * gpus * experts_per_rank
    mask = 0
    for e in experts:
        if first <= e < first + experts_per_rank * gpus:
            mask |= 1 << ((e - first) // experts_per_rank)
    return mask


def run_dispatch(
    machine: Machine, prob: Problem, num_channels: int, rng: random.Random, policy: str = "uniform"
) -> DispatchResult:
    p, mc = machine.params, machine
    num_nodes, gpus, num_ranks = prob.num_nodes, prob.gpus, prob.num_ranks
    per_rank = prob.experts_per_rank
    hidden, num_topk = prob.xs[0].shape[1], prob.topk_idx[0].shape[1]
    machine.begin("dispatch")

    num_recv = [offsets[-1] for offsets in prob.recv_rank_offset]
    out_x = [torch.zeros(n, hidden, dtype=torch.bfloat16) for n in num_recv]
    out_idx = [torch.zeros(n, num_topk, dtype=torch.int64) for n in num_recv]
    out_w = [torch.zeros(n, num_topk, dtype=torch.float32) for n in num_recv]
    out_src_token: list[list[int]] = [[-1] * n for n in num_recv]
    out_src_rank: list[list[int]] = [[-1] * n for n in num_recv]
    # As the host allocates them: mask 0, token INT32_MAX (the padded tail stays so)
    fwd_mask: list[list[int]] = [[0] * offsets[-1] for offsets in prob.fwd_offsets]
    fwd_token: list[list[int]] = [[INT32_MAX] * offsets[-1] for offsets in prob.fwd_offsets]
    fwd_written: set[tuple[int, int]] = set()
    roles = BlockRoles(machine)

    def net_sender(rank: int, c: int, warp: int) -> Step:
        """Warps 0-3 (kernel lines 104-168): remote nodes i = warp, warp + 4, ... one after the other."""
        node = mc.node_of(rank)
        tokens = channel_token_range(prob.num_tokens[rank], num_channels, c)
        for i in range(warp, num_nodes - 1, p.net_send_warps):
            m = i if i < node else i + 1  # line 108
            sent = cached_head = 0
            for t in tokens:  # line 112
                node_pos = prob.node_send_pos[rank][t][m]
                if node_pos < 0:
                    continue
                if sent - cached_head >= p.net_slots:  # lines 116-123
                    cached_head = yield from wait_slot(mc, rank, DISPATCH_HEAD, c, m, sent, net=True)
                row = NetDispatchRow(  # lines 124-146
                    x=prob.xs[rank][t],
                    experts=tuple(prob.experts[rank][t]),
                    weights=prob.topk_weights[rank][t],
                    src_token=t,
                    node_pos=node_pos,
                    send_pos=tuple(prob.send_pos[rank][t][m * gpus + j] for j in range(gpus)),
                )
                mc.send_slot_write(rank, m, c, sent, row, DISPATCH_HEAD)
                sent += 1
                yield
                if sent % p.net_chunk == 0:  # lines 148-153
                    mc.put_signal(
                        rank,
                        m,
                        c,
                        (sent - p.net_chunk) % p.net_slots,
                        p.net_chunk,
                        DISPATCH_TAIL,
                        p.net_chunk,
                    )
                    yield
            rest = sent % p.net_chunk  # lines 156-166
            if rest:
                mc.put_signal(rank, m, c, (sent - rest) % p.net_slots, rest, DISPATCH_TAIL, rest + FINISHED)
            else:
                mc.signal_add(rank, m, DISPATCH_TAIL, c, FINISHED)
            yield
            yield from wait_drained(mc, rank, DISPATCH_HEAD, c, m, sent, net=True)
        roles.role_done(rank, c)

    def forwarder(rank: int, c: int) -> Step:
        """Warps 4-7 (kernel lines 169-348): source nodes' rows -> NVLink queues of this node's GPUs."""
        node, local = mc.node_of(rank), mc.local_of(rank)
        tokens = channel_token_range(prob.num_tokens[rank], num_channels, c)
        token_begin, token_end = tokens.start, tokens.stop
        # s_src (line 175): consumed, available, finished, done
        src = [[0, token_begin if m == node else 0, m == node, False] for m in range(num_nodes)]
        nvl_sent, nvl_head = [0] * gpus, [0] * gpus

        def forward_row(m: int, net_seq: int, t_own: int) -> Step:
            """forward_row (lines 185-270); the net slot is read again for every copy (lines 228-251)."""
            from_x = t_own >= 0

            def load() -> NetDispatchRow:
                if from_x:
                    return NetDispatchRow(
                        x=prob.xs[rank][t_own],
                        experts=tuple(prob.experts[rank][t_own]),
                        weights=prob.topk_weights[rank][t_own],
                        src_token=t_own,
                        node_pos=prob.node_send_pos[rank][t_own][node],
                        send_pos=tuple(prob.send_pos[rank][t_own][node * gpus + j] for j in range(gpus)),
                    )
                return mc.recv_slot(rank, c, m, net_seq, DISPATCH_TAIL)

            row = load()
            mask = local_gpu_mask(row.experts, node, per_rank, gpus)  # line 193
            for j in bits_of(mask):  # line 199
                if nvl_sent[j] - nvl_head[j] >= p.nvl_slots:  # lines 202-209
                    sent_j = nvl_sent[j]
                    nvl_head[j] = yield from wait_slot(mc, rank, DISPATCH_HEAD, c, j, sent_j, net=False)
                row = load()  # lines 211-253: copy the row and write the metadata
                first = (node * gpus + j) * per_rank
                mc.nvl_write(
                    mc.rank_of(node, j),
                    c,
                    local,
                    nvl_sent[j],
                    NvlDispatchRow(
                        x=row.x,
                        local_experts=tuple(
                            e - first if first <= e < first + per_rank else -1 for e in row.experts
                        ),
                        weights=row.weights,
                        src_token=row.src_token,
                        src_rank=m * gpus + local,
                        send_pos=row.send_pos[j],
                    ),
                    DISPATCH_HEAD,
                )
                yield
                nvl_sent[j] += 1  # lines 255-261
                if nvl_sent[j] % p.nvl_chunk == 0:
                    mc.store_counter(mc.rank_of(node, j), DISPATCH_TAIL, c, local, nvl_sent[j])
                    yield
            row = load()  # lines 263-269: the record the combine replays
            idx = prob.fwd_offsets[rank][m] + row.node_pos
            if (rank, idx) in fwd_written or idx >= prob.fwd_offsets[rank][m + 1]:
                raise ProtocolError(f"rank {rank}: forwarder record {idx} written twice or past its source's")
            fwd_written.add((rank, idx))
            fwd_mask[rank][idx] = mask
            fwd_token[rank][idx] = row.src_token

        while True:  # lines 273-335
            any_left = progressed = False
            for m in range(num_nodes):
                st = src[m]
                if m != node and not st[3] and not st[2] and st[0] == st[1]:  # lines 276-283
                    value = mc.signal(rank, DISPATCH_TAIL, c, m)
                    st[1], st[2] = value & COUNT_MASK, bool(value & FINISHED)
                consumed0, available, finished, done = st
                if done:
                    continue
                any_left = True
                own_node = m == node
                rows = p.net_chunk if own_node else min(available - consumed0, p.net_chunk)  # line 293
                t, taken = available, 0
                while taken < rows:  # lines 295-304
                    if own_node:
                        while t < token_end and prob.node_send_pos[rank][t][node] < 0:
                            t += 1
                        if t == token_end:
                            break
                        yield from forward_row(m, -1, t)
                        t += 1
                    else:
                        yield from forward_row(m, consumed0 + taken, -1)
                    taken += 1
                consumed = consumed0 + taken
                done = t == token_end if own_node else finished and consumed == available  # line 306
                progressed |= taken > 0 or done
                if not own_node:  # lines 309-321
                    chunk = p.net_chunk
                    publish = (
                        consumed // chunk * chunk
                        - consumed0 // chunk * chunk
                        + (consumed % chunk if done else 0)
                    )
                    if publish > 0:
                        mc.signal_add(rank, m, DISPATCH_HEAD, c, publish)
                        yield
                else:
                    st[1] = t
                st[0], st[3] = consumed, done
            if not any_left:
                break
            if not progressed:  # the kernel polls again; nothing changes until a source puts rows
                keys = tuple(("s", rank, DISPATCH_TAIL, c, m) for m in range(num_nodes) if not src[m][3])
                yield Wait("net tails of " + ", ".join(str(k[-1]) for k in keys), keys)

        for j in range(gpus):  # lines 337-348 (thread j: the end of queue j, then its last head)
            mc.store_counter(mc.rank_of(node, j), DISPATCH_TAIL, c, local, nvl_sent[j] | FINISHED)
            yield
        for j in range(gpus):
            yield from wait_drained(mc, rank, DISPATCH_HEAD, c, j, nvl_sent[j], net=False)
        roles.role_done(rank, c)

    def receiver(rank: int, c: int, peer: int) -> Step:
        """Warps 8-15, group `peer` (kernel lines 349-412): queue (c, peer) -> outputs."""
        node, local = mc.node_of(rank), mc.local_of(rank)
        head_owner = mc.rank_of(node, peer)
        consumed = available = 0
        finished = False
        while True:
            if consumed == available:  # lines 368-378
                if finished:
                    break
                value = yield from wait_for(
                    lambda: mc.counter(rank, DISPATCH_TAIL, c, peer),
                    lambda v, consumed=consumed: (v & COUNT_MASK) > consumed or bool(v & FINISHED),
                    f"NVLink tail of local {peer} > {consumed}",
                    ("c", rank, DISPATCH_TAIL, c, peer),
                )
                available, finished = value & COUNT_MASK, bool(value & FINISHED)
                continue
            row = mc.nvl_read(rank, c, peer, consumed, DISPATCH_TAIL)  # lines 379-399
            assert isinstance(row, NvlDispatchRow)
            out = prob.recv_rank_offset[rank][row.src_rank] + row.send_pos
            if out_src_token[rank][out] != -1:
                raise ProtocolError(f"rank {rank}: output row {out} written twice")
            out_x[rank][out] = row.x
            out_idx[rank][out] = torch.tensor(row.local_experts)
            out_w[rank][out] = row.weights
            out_src_token[rank][out] = row.src_token
            out_src_rank[rank][out] = row.src_rank
            consumed += 1
            yield
            if consumed % p.nvl_chunk == 0:  # lines 401-405
                mc.store_counter(head_owner, DISPATCH_HEAD, c, local, consumed)
                yield
        if consumed % p.nvl_chunk:  # lines 407-411
            mc.store_counter(head_owner, DISPATCH_HEAD, c, local, consumed)
        roles.role_done(rank, c)

    actors: dict[str, Step] = {}
    for rank in range(num_ranks):
        for c in range(num_channels):
            name = f"dispatch rank {rank} ch {c}"
            senders = range(min(p.net_send_warps, num_nodes - 1))
            for w in senders:
                actors[f"{name} net sender warp {w}"] = net_sender(rank, c, w)
            actors[f"{name} forwarder"] = forwarder(rank, c)
            for peer in range(gpus):
                actors[f"{name} receiver of local {peer}"] = receiver(rank, c, peer)
            # Lines 415-424: the owner resets its counters and signals (not its own node's)
            end = roles.block_end(rank, c, len(senders) + 1 + gpus, (DISPATCH_TAIL, DISPATCH_HEAD), False)
            actors[f"{name} end"] = end
    run_launch(machine, actors, rng, policy)
    for rank in range(num_ranks):
        if -1 in out_src_token[rank]:
            raise ProtocolError(f"rank {rank}: output row {out_src_token[rank].index(-1)} never written")
        for m in range(num_nodes):
            lo = prob.fwd_offsets[rank][m]
            count = prob.tokens_per_node[m * gpus + rank % gpus][rank // gpus]
            missing = [k for k in range(lo, lo + count) if (rank, k) not in fwd_written]
            if missing:
                raise ProtocolError(f"rank {rank}: forwarder records {missing[:4]} never written")
    return DispatchResult(
        out_x, out_idx, out_w, out_src_token, out_src_rank, fwd_mask, fwd_token, machine.net_rows
    )


# ---------------------------------------------------------------------------------------------------
# Combine (csrc/internode_combine.cuh)
# ---------------------------------------------------------------------------------------------------


def source_nodes(params: Params, node: int, num_nodes: int) -> list[int]:
    """The order in which the combine's NVLink senders and forwarders serve the source nodes."""
    if params.combine_source_order == "rotating":  # broken variant (tests that deadlocks are found)
        return [(node + i) % num_nodes for i in range(num_nodes)]
    return list(range(num_nodes))


def run_combine(
    machine: Machine,
    prob: Problem,
    got: DispatchResult,
    x_experts: list[torch.Tensor],
    num_channels: int,
    rng: random.Random,
    policy: str = "uniform",
) -> list[torch.Tensor]:
    """x_experts[r]: [N_r, H] bf16 in the order rank r received its rows. Returns out[s]: [T_s, H] bf16."""
    p, mc = machine.params, machine
    num_nodes, gpus, num_ranks = prob.num_nodes, prob.gpus, prob.num_ranks
    hidden = prob.xs[0].shape[1]
    machine.begin("combine")
    out = [torch.zeros(n, hidden, dtype=torch.bfloat16) for n in prob.num_tokens]
    out_written = [[False] * n for n in prob.num_tokens]
    roles = BlockRoles(machine)

    def nvl_sender(rank: int, c: int, peer: int) -> Step:
        """Warps 0-7, group `peer` (kernel lines 96-144): rows of sources (m, peer) -> forwarder (n, peer)."""
        node, local = mc.node_of(rank), mc.local_of(rank)
        dst = mc.rank_of(node, peer)
        offsets, src_tokens = prob.recv_rank_offset[rank], got.src_token[rank]
        sent = cached_head = 0
        for m in source_nodes(p, node, num_nodes):  # line 110
            src = m * gpus + peer
            tokens = channel_token_range(prob.num_tokens[src], num_channels, c)
            row_begin = bisect.bisect_left(
                src_tokens, tokens.start, offsets[src], offsets[src + 1]
            )  # 114-115
            row_end = bisect.bisect_left(src_tokens, tokens.stop, row_begin, offsets[src + 1])
            for row in range(row_begin, row_end):
                if sent - cached_head >= p.nvl_slots:  # lines 117-119
                    cached_head = yield from wait_slot(mc, rank, COMBINE_HEAD, c, peer, sent, net=False)
                mc.nvl_write(
                    dst, c, local, sent, CombineRow(x_experts[rank][row], src_tokens[row], src), COMBINE_HEAD
                )
                sent += 1
                yield
                if sent % p.nvl_chunk == 0:  # lines 131-135
                    mc.store_counter(dst, COMBINE_TAIL, c, local, sent)
                    yield
        if sent % p.nvl_chunk:  # lines 138-143
            mc.store_counter(dst, COMBINE_TAIL, c, local, sent)
            yield
        yield from wait_drained(mc, rank, COMBINE_HEAD, c, peer, sent, net=False)
        roles.role_done(rank, c)

    def forwarder(rank: int, c: int) -> Step:
        """Warps 8-11 (kernel lines 145-247): node partials of the sources (m, local) -> their net queues."""
        node, local = mc.node_of(rank), mc.local_of(rank)
        nvl_consumed, nvl_available = [0] * gpus, [0] * gpus
        net_total = [0] * num_nodes
        records = got.fwd_token[rank]
        for m in source_nodes(p, node, num_nodes):  # line 154
            src = m * gpus + local
            tokens = channel_token_range(prob.num_tokens[src], num_channels, c)
            lo, hi = prob.fwd_offsets[rank][m], prob.fwd_offsets[rank][m + 1]
            k_begin = bisect.bisect_left(records, tokens.start, lo, hi)  # lines 161-162
            k_end = bisect.bisect_left(records, tokens.stop, k_begin, hi)
            sent = cached_head = 0
            for k in range(k_begin, k_end):
                mask, src_token = got.fwd_mask[rank][k], records[k]
                for jj in bits_of(mask):  # lines 168-179
                    need = nvl_consumed[jj]
                    if nvl_available[jj] <= need:
                        nvl_available[jj] = yield from wait_for(
                            lambda jj=jj: mc.counter(rank, COMBINE_TAIL, c, jj),
                            lambda v, need=need: v > need,
                            f"NVLink tail of local {jj} > {need} (source node {m} token {src_token})",
                            ("c", rank, COMBINE_TAIL, c, jj),
                        )
                if sent - cached_head >= p.net_slots:  # lines 180-183
                    cached_head = yield from wait_slot(mc, rank, COMBINE_HEAD, c, m, sent, net=True)
                acc = torch.zeros(hidden, dtype=torch.float32)  # lines 186-198: acc = +0.0f, += rows
                for jj in bits_of(mask):
                    row = mc.nvl_read(rank, c, jj, nvl_consumed[jj], COMBINE_TAIL)
                    assert isinstance(row, CombineRow)
                    if row.src_token != src_token or row.src_rank != src:  # lines 202-208
                        raise ProtocolError(
                            f"combine forwarder rank {rank}: row out of order from local {jj}: token "
                            f"{row.src_rank}:{row.src_token}, expected {src}:{src_token}"
                        )
                    acc = acc + row.x.float()
                partial = CombineRow(acc.to(torch.bfloat16), src_token)
                mc.send_slot_write(rank, m, c, sent, partial, COMBINE_HEAD)  # line 200
                yield
                for jj in bits_of(mask):  # lines 210-223
                    nvl_consumed[jj] += 1
                    if nvl_consumed[jj] % p.nvl_chunk == 0:
                        mc.store_counter(mc.rank_of(node, jj), COMBINE_HEAD, c, local, nvl_consumed[jj])
                sent += 1
                if sent % p.net_chunk == 0:
                    mc.put_signal(
                        rank, m, c, (sent - p.net_chunk) % p.net_slots, p.net_chunk, COMBINE_TAIL, p.net_chunk
                    )
                yield
            rest = sent % p.net_chunk  # lines 226-231
            if rest:
                mc.put_signal(rank, m, c, (sent - rest) % p.net_slots, rest, COMBINE_TAIL, rest)
                yield
            net_total[m] = sent
        for jj in range(gpus):  # lines 233-239
            if nvl_consumed[jj] % p.nvl_chunk:
                mc.store_counter(mc.rank_of(node, jj), COMBINE_HEAD, c, local, nvl_consumed[jj])
        yield
        for m in range(num_nodes):  # lines 240-246
            yield from wait_drained(mc, rank, COMBINE_HEAD, c, m, net_total[m], net=True)
        roles.role_done(rank, c)

    def final_reducer(rank: int, c: int) -> Step:
        """Warps 12-15 (kernel lines 248-311): node partials of this rank's channel tokens -> out."""
        net_consumed, net_available = [0] * num_nodes, [0] * num_nodes
        for t in channel_token_range(prob.num_tokens[rank], num_channels, c):
            in_node = prob.node_send_pos[rank][t]
            for m in range(num_nodes):  # lines 263-273
                need = net_consumed[m]
                if in_node[m] >= 0 and net_available[m] <= need:
                    net_available[m] = yield from wait_for(
                        lambda m=m: mc.signal(rank, COMBINE_TAIL, c, m),
                        lambda v, need=need: v > need,
                        f"net tail of node {m} > {need} (token {t})",
                        ("s", rank, COMBINE_TAIL, c, m),
                    )
            acc = torch.zeros(hidden, dtype=torch.float32)  # lines 275-289
            for m in range(num_nodes):
                if in_node[m] < 0:
                    continue
                row = mc.recv_slot(rank, c, m, net_consumed[m], COMBINE_TAIL)
                assert isinstance(row, CombineRow)
                if row.src_token != t:  # lines 290-296
                    raise ProtocolError(
                        f"combine rank {rank}: partial from node {m} for token {row.src_token}, expected {t}"
                    )
                acc = acc + row.x.float()
            if out_written[rank][t]:
                raise ProtocolError(f"combine rank {rank}: token {t} written twice")
            out[rank][t] = acc.to(torch.bfloat16)
            out_written[rank][t] = True
            yield
            for m in range(num_nodes):  # lines 298-306
                if in_node[m] < 0:
                    continue
                net_consumed[m] += 1
                if net_consumed[m] % p.net_chunk == 0:
                    mc.signal_add(rank, m, COMBINE_HEAD, c, p.net_chunk)
            yield
        for m in range(num_nodes):  # lines 309-310
            if net_consumed[m] % p.net_chunk:
                mc.signal_add(rank, m, COMBINE_HEAD, c, net_consumed[m] % p.net_chunk)
        roles.role_done(rank, c)

    actors: dict[str, Step] = {}
    for rank in range(num_ranks):
        for c in range(num_channels):
            name = f"combine rank {rank} ch {c}"
            for peer in range(gpus):
                actors[f"{name} NVLink sender to local {peer}"] = nvl_sender(rank, c, peer)
            actors[f"{name} forwarder"] = forwarder(rank, c)
            actors[f"{name} final reducer"] = final_reducer(rank, c)
            # Lines 313-322: the owner resets its counters and signals, its own node's too
            actors[f"{name} end"] = roles.block_end(rank, c, gpus + 2, (COMBINE_TAIL, COMBINE_HEAD), True)
    run_launch(machine, actors, rng, policy)
    for rank in range(num_ranks):
        if not all(out_written[rank]):
            raise ProtocolError(f"combine rank {rank}: token {out_written[rank].index(False)} never written")
    return out
