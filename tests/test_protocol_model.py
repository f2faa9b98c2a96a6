"""CPU: a model of the ring-buffer protocol of csrc/dispatch.cuh and csrc/combine.cuh.

Each warp group of the kernels is a Python generator that yields wherever the kernel would spin; a
seeded random scheduler interleaves them (one step = one wait check or one row). The model keeps the
kernels' bookkeeping (slots = sent % S, tail/head published every CHUNK rows and at the end, the
finished bit, zeroing at block end) and checks: no deadlock, every output row in place (source rank,
then source token), combine sums in ascending rank order, no counter written after its owner zeroed
it, and counters zero after every kernel. It models the protocol, not the CUDA code.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator

import pytest

FINISHED = 1 << 30


class Memory:
    """Counters and ring slots of all ranks' symmetric buffers."""

    def __init__(self) -> None:
        self.counters: dict[tuple, int] = defaultdict(int)
        self.slots: dict[tuple, object] = {}
        self.zeroed: set[tuple] = set()  # (rank, kind, channel) blocks that already zeroed
        self.errors: list[str] = []

    def write(self, owner: int, kind: str, channel: int, peer: int, value: int) -> None:
        if (owner, kind, channel) in self.zeroed:
            self.errors.append(f"{kind}[{channel}][{peer}] of rank {owner} written after it was zeroed")
        self.counters[(owner, kind, channel, peer)] = value


def channel_range(num_tokens: int, num_channels: int, c: int) -> range:
    return range(num_tokens * c // num_channels, num_tokens * (c + 1) // num_channels)


def run(actors: list, rng: random.Random, max_steps: int = 2_000_000) -> None:
    live = list(actors)
    steps = 0
    while live:
        steps += 1
        assert steps < max_steps, "no progress: deadlock"
        i = rng.randrange(len(live))
        try:
            next(live[i])
        except StopIteration:
            live.pop(i)


def block_end(
    mem: Memory, done_groups: dict, r: int, c: int, num_ranks: int, kinds: tuple[str, str]
) -> Iterator[None]:
    """The end of block c of rank r: once its 2R warp groups are done, the rank zeroes its counters of
    the two kinds (tail, head) for every peer."""
    while done_groups[(r, c)] < 2 * num_ranks:
        yield
    for p in range(num_ranks):
        for kind in kinds:
            mem.counters[(r, kind, c, p)] = 0
    mem.zeroed.update((r, kind, c) for kind in kinds)


def run_checked(actors: list, mem: Memory, seed: int) -> None:
    """run the actors, then the checks of every kernel: no error recorded, every counter zero again."""
    run(actors, random.Random(seed))
    assert not mem.errors, mem.errors[:5]
    assert all(v == 0 for v in mem.counters.values())


def dispatch_model(tokens, send_sets, num_channels, slots, chunk, seed):
    """tokens[r] = T_r; send_sets[r][t] = set of destination ranks. Returns rows received per rank."""
    num_ranks = len(tokens)
    mem = Memory()
    send_pos = []
    for r in range(num_ranks):
        counters = [0] * num_ranks
        pos = []
        for t in range(tokens[r]):
            row = {}
            for d in sorted(send_sets[r][t]):
                row[d] = counters[d]
                counters[d] += 1
            pos.append(row)
        send_pos.append(pos)
    recv_offset = [[0] * (num_ranks + 1) for _ in range(num_ranks)]
    for d in range(num_ranks):
        for s in range(num_ranks):
            n = sum(1 for t in range(tokens[s]) if d in send_sets[s][t])
            recv_offset[d][s + 1] = recv_offset[d][s] + n
    out = [[None] * recv_offset[d][num_ranks] for d in range(num_ranks)]
    done_groups: dict[tuple, int] = defaultdict(int)

    def sender(r, c, d):
        sent = 0
        for t in channel_range(tokens[r], num_channels, c):
            if d not in send_pos[r][t]:
                continue
            while sent - mem.counters[(r, "dhead", c, d)] >= slots:
                yield
            mem.slots[(d, c, r, sent % slots)] = (r, t, send_pos[r][t][d])
            sent += 1
            yield
            if sent % chunk == 0:
                mem.write(d, "dtail", c, r, sent)
        mem.write(d, "dtail", c, r, sent | FINISHED)
        while mem.counters[(r, "dhead", c, d)] < sent:
            yield
        done_groups[(r, c)] += 1

    def receiver(r, c, s):
        consumed = available = 0
        finished = False
        while True:
            if consumed == available:
                if finished:
                    break
                v = mem.counters[(r, "dtail", c, s)]
                if (v & ~FINISHED) > consumed or v & FINISHED:
                    available, finished = v & ~FINISHED, bool(v & FINISHED)
                yield
                continue
            src, t, pos = mem.slots[(r, c, s, consumed % slots)]
            row = recv_offset[r][src] + pos
            if out[r][row] is not None:
                mem.errors.append(f"rank {r} row {row} written twice")
            out[r][row] = (src, t)
            consumed += 1
            yield
            if consumed % chunk == 0:
                mem.write(s, "dhead", c, r, consumed)
        if consumed % chunk:
            mem.write(s, "dhead", c, r, consumed)
        done_groups[(r, c)] += 1

    actors = []
    for r in range(num_ranks):
        for c in range(num_channels):
            actors += [sender(r, c, d) for d in range(num_ranks)]
            actors += [receiver(r, c, s) for s in range(num_ranks)]
            actors.append(block_end(mem, done_groups, r, c, num_ranks, ("dtail", "dhead")))
    run_checked(actors, mem, seed)
    return out


def combine_model(tokens, received, values, num_channels, slots, chunk, seed):
    """received[d] = [(src, t)] rows of rank d in order; values[d][i] = the value of that row.
    Returns per source rank the list of (per token) summation sequences in the order they were added."""
    num_ranks = len(tokens)
    mem = Memory()
    done_groups: dict[tuple, int] = defaultdict(int)
    sums = [[[] for _ in range(tokens[s])] for s in range(num_ranks)]
    goes_to = [[set() for _ in range(tokens[s])] for s in range(num_ranks)]
    for d in range(num_ranks):
        for src, t in received[d]:
            goes_to[src][t].add(d)

    def sender(d, c, s):
        rows = [
            i
            for i, (src, t) in enumerate(received[d])
            if src == s and t in channel_range(tokens[s], num_channels, c)
        ]
        sent = 0
        for i in rows:
            while sent - mem.counters[(d, "chead", c, s)] >= slots:
                yield
            mem.slots[(s, c, d, sent % slots)] = (received[d][i][1], values[d][i])
            sent += 1
            yield
            if sent % chunk == 0:
                mem.write(s, "ctail", c, d, sent)
        if sent % chunk:
            mem.write(s, "ctail", c, d, sent)
        while mem.counters[(d, "chead", c, s)] < sent:
            yield
        done_groups[(d, c)] += 1

    def reducer(r, c):
        consumed = [0] * num_ranks
        published = [0] * num_ranks
        token_range = channel_range(tokens[r], num_channels, c)
        for n, t in enumerate(token_range):
            for d in range(num_ranks):
                if d not in goes_to[r][t]:
                    continue
                while mem.counters[(r, "ctail", c, d)] <= consumed[d]:
                    yield
                tok, value = mem.slots[(r, c, d, consumed[d] % slots)]
                if tok != t:
                    mem.errors.append(f"rank {r}: row from {d} is for token {tok}, expected {t}")
                sums[r][t].append((d, value))
                consumed[d] += 1
                yield
            if (n + 1) % chunk == 0:
                for d in range(num_ranks):
                    if consumed[d] != published[d]:
                        mem.write(d, "chead", c, r, consumed[d])
                        published[d] = consumed[d]
        for d in range(num_ranks):
            if consumed[d] != published[d]:
                mem.write(d, "chead", c, r, consumed[d])
        done_groups[(r, c)] += num_ranks

    actors = []
    for r in range(num_ranks):
        for c in range(num_channels):
            actors += [sender(r, c, s) for s in range(num_ranks)]
            actors += [reducer(r, c), block_end(mem, done_groups, r, c, num_ranks, ("ctail", "chead"))]
    run_checked(actors, mem, seed)
    return sums


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("slots", "chunk"), [(16, 4), (8, 4), (2, 1), (4, 2)])
def test_dispatch_then_combine(seed: int, slots: int, chunk: int) -> None:
    rng = random.Random(seed)
    num_ranks = rng.choice([1, 2, 3, 4, 8])
    num_channels = rng.choice([1, 2, 3, 5])
    tokens = [rng.choice([0, 1, 7, 40, 61]) for _ in range(num_ranks)]
    send_sets = [[{d for d in range(num_ranks) if rng.random() < 0.5} for _ in range(t)] for t in tokens]

    out = dispatch_model(tokens, send_sets, num_channels, slots, chunk, seed)
    for d in range(num_ranks):
        expected = [(s, t) for s in range(num_ranks) for t in range(tokens[s]) if d in send_sets[s][t]]
        assert out[d] == expected, f"rank {d}: rows not in (source rank, token) order"

    values = [[rng.random() for _ in out[d]] for d in range(num_ranks)]
    sums = combine_model(tokens, out, values, num_channels, slots, chunk, seed + 1)
    for s in range(num_ranks):
        for t in range(tokens[s]):
            order = [d for d, _ in sums[s][t]]
            assert order == sorted(send_sets[s][t]), f"token ({s}, {t}): added in rank order {order}"
