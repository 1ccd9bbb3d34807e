"""Sharding strategies (Lui et al., ISPASS 2021), each a policy over the packer:

- ``capacity``: balance bytes. Tables above the ideal share (total / N) are split by rows,
  then parts go largest first to the shard with the fewest bytes.
- ``load``: balance load the same way, by load instead of bytes, within memory.
- ``net``: net-specific bin packing. Nets, largest first, fill the fewest shards they can:
  each table goes whole to a shard this net already uses when it fits, else whole to another
  shard, and is split by rows only when it fits nowhere whole. Fewer shards per single-net
  request, at the price of balance.

A strategy proposes parts per shard and a note; the cost model (``recserve.planning.cost``)
scores proposals, and ``build`` picks one (``auto``: the cheapest of all).
"""

from __future__ import annotations

from typing import Protocol

from recserve.contracts.plan import Part
from recserve.planning.loads import TableLoad
from recserve.planning.packing import Packer, fan_outs, greedy, pack_nets

Proposal = tuple[list[tuple[Part, ...]], str]  # parts per shard, and a note ("" if none)


class Strategy(Protocol):
    def __call__(self, loads: list[TableLoad], n: int, capacity: float) -> Proposal: ...


def capacity(loads: list[TableLoad], n: int, capacity: float) -> Proposal:
    return greedy(loads, n, capacity, "bytes").plan(), ""


def load(loads: list[TableLoad], n: int, capacity: float) -> Proposal:
    return greedy(loads, n, capacity, "load").plan(), ""


def net(loads: list[TableLoad], n: int, capacity: float) -> Proposal:
    packer, note = _net(loads, n, capacity)
    return packer.plan(), note


def _net(loads: list[TableLoad], n: int, capacity: float) -> tuple[Packer, str]:
    """Net-specific packing, never worse than ``capacity`` for any one net's fan-out.

    Packs nets largest first, then smallest first; keeps the first layout whose fan-out is
    at most the capacity layout's for every net, the lower total first. When memory is so
    tight that fragments defeat both, it returns the capacity layout and says so.
    """
    nets: dict[str, list[TableLoad]] = {}
    for t in loads:
        nets.setdefault(t.spec.net, []).append(t)
    by_size = sorted(nets, key=lambda net: (-sum(t.spec.nbytes for t in nets[net]), net))
    baseline = greedy(loads, n, capacity, "bytes")
    limit = fan_outs(baseline, nets)
    tried: list[tuple[int, int, Packer]] = []
    for order in (by_size, by_size[::-1]):
        packer = pack_nets(loads, n, capacity, nets, order)
        fans = fan_outs(packer, nets)
        if all(fans[net] <= limit[net] for net in nets):
            tried.append((sum(fans.values()), len(tried), packer))
    if tried:
        return min(tried, key=lambda x: x[:2])[2], ""
    return baseline, "packing by net could not beat the capacity layout's fan-out; used it"


STRATEGIES: dict[str, Strategy] = {"capacity": capacity, "load": load, "net": net}
