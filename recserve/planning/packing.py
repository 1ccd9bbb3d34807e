"""Packing row ranges of tables into shards of bounded memory: the partitioner.

Strategies (``recserve.planning.strategies``) are policies over it: ``greedy`` places the
largest items first on the emptiest shard by bytes or by load, ``pack_nets`` fills the
fewest shards per net.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from recserve.contracts.errors import PlanError
from recserve.contracts.plan import Part
from recserve.planning.loads import TableLoad

HEADROOM = 1.5  # default shard memory: this times the even share of the table bytes


@dataclass
class Bin:
    id: int
    capacity: float
    bytes: int = 0
    load: float = 0.0
    parts: list[Part] = field(default_factory=list)

    @property
    def free(self) -> float:
        return self.capacity - self.bytes


class Packer:
    """Places row ranges of tables into bins; every strategy is a policy on top of it."""

    def __init__(self, loads: list[TableLoad], n_shards: int, capacity: float) -> None:
        self.loads = {t.spec.name: t for t in loads}
        self.bins = [Bin(i, capacity) for i in range(n_shards)]

    def put(self, b: Bin, table: str, start: int, end: int) -> None:
        t = self.loads[table]
        b.parts.append(Part(table, start, end))
        b.bytes += (end - start) * t.spec.row_bytes
        b.load += t.load_ns * (end - start) / t.spec.rows

    def spill(self, table: str, start: int, end: int, order: Iterable[Bin]) -> None:
        """Split ``[start, end)`` over bins in ``order``, filling each bin's free space."""
        row_bytes = self.loads[table].spec.row_bytes
        for b in order:
            if start >= end:
                return
            fit = min(end - start, int(b.free // row_bytes))
            if fit > 0:
                self.put(b, table, start, start + fit)
                start += fit
        if start < end:
            missing = (end - start) * row_bytes
            raise PlanError(f"table {table} does not fit: {missing} more bytes needed")

    def plan(self) -> list[tuple[Part, ...]]:
        return [tuple(sorted(b.parts, key=lambda p: (p.table, p.row_start))) for b in self.bins]


def items(t: TableLoad, by: str, share: float, capacity: float) -> list[tuple[str, int, int]]:
    """Row ranges of ``t``: whole, or equal pieces when it exceeds the ideal share of the
    balanced quantity or the memory of one shard."""
    key = measure(t, by)
    k = 1
    if share > 0 and key > share:
        k = math.ceil(key / share - 1e-9)
    if t.spec.nbytes > capacity:
        k = max(k, math.ceil(t.spec.nbytes / capacity))
    k = min(k, t.spec.rows)
    bounds = [t.spec.rows * i // k for i in range(k + 1)]
    return [(t.spec.name, a, b) for a, b in itertools.pairwise(bounds) if b > a]


def greedy(loads: list[TableLoad], n: int, capacity: float, by: str) -> Packer:
    """Largest first onto the emptiest bin (by bytes or load) that has room."""
    packer = Packer(loads, n, capacity)
    share = sum(measure(t, by) for t in loads) / n
    todo = []
    for t in loads:
        for name, a, b in items(t, by, share, capacity):
            todo.append((measure(t, by) * (b - a) / t.spec.rows, name, a, b))
    todo.sort(key=lambda it: (-it[0], it[1], it[2]))
    for _, name, a, b in todo:
        need = (b - a) * packer.loads[name].spec.row_bytes
        fits = [x for x in packer.bins if x.free >= need]
        if fits:
            packer.put(min(fits, key=lambda x: (bin_measure(x, by), x.id)), name, a, b)
        else:
            packer.spill(name, a, b, sorted(packer.bins, key=lambda x: (-x.free, x.id)))
    return packer


def measure(t: TableLoad, by: str) -> float:
    return float(t.spec.nbytes) if by == "bytes" else t.load_ns


def bin_measure(b: Bin, by: str) -> float:
    return float(b.bytes) if by == "bytes" else b.load


def fan_outs(packer: Packer, nets: dict[str, list[TableLoad]]) -> dict[str, int]:
    owner = {t.spec.name: net for net, ts in nets.items() for t in ts}
    return {
        net: sum(1 for b in packer.bins if any(owner[p.table] == net for p in b.parts))
        for net in nets
    }


def pack_nets(
    loads: list[TableLoad],
    n: int,
    capacity: float,
    nets: dict[str, list[TableLoad]],
    order: list[str],
) -> Packer:
    packer = Packer(loads, n, capacity)
    for net in order:
        mine: set[int] = set()
        tables = sorted(nets[net], key=lambda t: (-t.spec.nbytes, t.spec.name))
        left = sum(t.spec.nbytes for t in tables)  # bytes of this net not yet placed
        for t in tables:
            need = t.spec.nbytes
            own = [b for b in packer.bins if b.id in mine and b.free >= need]
            other = [b for b in packer.bins if b.id not in mine and b.free >= need]
            if own:  # best fit among the net's shards keeps its larger holes for later
                target = min(own, key=lambda b: (b.free, b.id))
            elif other:  # a new shard for this net: one that holds the rest of it, if any
                whole = [b for b in other if b.free >= left]
                target = (
                    min(whole, key=lambda b: (b.free, b.id))
                    if whole
                    else max(other, key=lambda b: (b.free, -b.id))
                )
            else:  # fits nowhere whole: fill this net's shards, then the emptiest others
                order_bins = sorted(packer.bins, key=lambda b: (b.id not in mine, -b.free, b.id))
                before = {b.id: len(b.parts) for b in packer.bins}
                packer.spill(t.spec.name, 0, t.spec.rows, order_bins)
                mine.update(b.id for b in packer.bins if len(b.parts) > before[b.id])
                left -= need
                continue
            packer.put(target, t.spec.name, 0, t.spec.rows)
            mine.add(target.id)
            left -= need
    return packer


def default_capacity(loads: list[TableLoad], n: int) -> float:
    """Per-shard bytes when none is given: 1.5x the even share (plus one row), room for the
    strategies to trade byte balance for load balance or locality, as real shards sized
    alike would allow."""
    total = sum(t.spec.nbytes for t in loads)
    widest = max(t.spec.row_bytes for t in loads)
    return float(math.ceil(HEADROOM * total / n) + widest)
