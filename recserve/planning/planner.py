"""Sharding strategies (``recserve plan``), after Lui et al. (ISPASS 2021), and their report.

Work model: a request carries ``samples`` samples; a table is looked up once per sample per
feature (or once per request for a *context* net in the ranking form), with its mean pooling
factor of ids per lookup. A table's load is the time its ids take on a shard::

    load_ns = ids_per_request * (ID_NS + row_bytes / BYTES_PER_NS)

Rows of a split table are assumed equally hot (the ids of a Zipf table are scattered over its
rows), so a part's share of the load is its share of the rows.

Strategies:

- ``capacity``: balance bytes. Tables above the ideal share (total / N) are split by rows,
  then parts go largest first to the shard with the fewest bytes.
- ``load``: balance load the same way, by load instead of bytes, within memory.
- ``net``: net-specific bin packing. Nets, largest first, fill the fewest shards they can:
  each table goes whole to a shard this net already uses when it fits, else whole to another
  shard, and is split by rows only when it fits nowhere whole. Fewer shards per single-net
  request, at the price of balance.
- ``auto``: all three, scored by the cost of a request's critical path (below); cheapest wins.

Cost of a request: the slowest contacted shard's load, plus ``RPC_US`` of round trip, plus
``RPC_CPU_US`` of gateway CPU per contacted shard (fan-out costs CPU even when parallel).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from recserve.contracts.errors import PlanError
from recserve.contracts.manifest import Manifest, TableSpec
from recserve.contracts.plan import Part, Plan, ShardPlan
from recserve.contracts.schema import Doc

STRATEGIES = ("capacity", "load", "net")
ID_NS = 10.0  # per id: index load, bounds, loop
BYTES_PER_NS = 16.0  # gathered row bytes per ns on one core
RPC_US = 120.0  # loopback ZeroMQ round trip
RPC_CPU_US = 20.0  # gateway CPU per shard contacted (encode, decode, merge)
HEADROOM = 1.5  # default shard memory: this times the even share of the table bytes


@dataclass(frozen=True)
class Traffic:
    """The request shape the load model assumes."""

    samples: int = 256
    context_nets: frozenset[str] = frozenset()

    def lookups(self, net: str) -> int:
        return 1 if net in self.context_nets else self.samples


@dataclass(frozen=True)
class TableLoad:
    spec: TableSpec
    ids: float  # expected ids per request
    bags: int  # bags per request (lookups x features)

    @property
    def load_ns(self) -> float:
        return self.ids * (ID_NS + self.spec.row_bytes / BYTES_PER_NS)


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


def read_access_stats(path: Path | str) -> dict[str, dict[str, float]]:
    """Measured statistics: ``{"tables": {"<name>": {"pooling_factor": 12.5}}}``."""
    try:
        value = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise PlanError(f"{path}: cannot read access stats ({exc})") from exc
    doc = Doc(value, "", lambda msg, fld: PlanError(f"{path}: {msg}", field=fld))
    doc.only("tables")
    out = {}
    for name in doc.sub("tables").value:
        t = doc.sub("tables").sub(name)
        t.only("pooling_factor", "zipf")
        pf = t.get("pooling_factor", float)
        if not pf >= 0:
            raise t.fail("pooling_factor", "must be a non-negative number")
        out[str(name)] = {"pooling_factor": pf}
    return out


def table_loads(
    manifest: Manifest, traffic: Traffic, access: Mapping[str, Mapping[str, float]] | None = None
) -> list[TableLoad]:
    access = access or {}
    unknown = sorted(set(access) - {t.name for t in manifest.tables})
    if unknown:
        raise PlanError(f"access stats name tables the model lacks: {', '.join(unknown[:5])}")
    out = []
    for t in manifest.tables:
        pf = access.get(t.name, {}).get("pooling_factor", t.stats.pooling_factor or 1.0)
        bags = traffic.lookups(t.net) * len(t.features)
        out.append(TableLoad(t, float(pf) * bags, bags))
    return out


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


def _items(t: TableLoad, by: str, share: float, capacity: float) -> list[tuple[str, int, int]]:
    """Row ranges of ``t``: whole, or equal pieces when it exceeds the ideal share of the
    balanced quantity or the memory of one shard."""
    key = _key(t, by)
    k = 1
    if share > 0 and key > share:
        k = math.ceil(key / share - 1e-9)
    if t.spec.nbytes > capacity:
        k = max(k, math.ceil(t.spec.nbytes / capacity))
    k = min(k, t.spec.rows)
    bounds = [t.spec.rows * i // k for i in range(k + 1)]
    return [(t.spec.name, a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _greedy(loads: list[TableLoad], n: int, capacity: float, by: str) -> Packer:
    """Largest first onto the emptiest bin (by bytes or load) that has room."""
    packer = Packer(loads, n, capacity)
    share = sum(_key(t, by) for t in loads) / n
    items = []
    for t in loads:
        for name, a, b in _items(t, by, share, capacity):
            items.append((_key(t, by) * (b - a) / t.spec.rows, name, a, b))
    items.sort(key=lambda it: (-it[0], it[1], it[2]))
    for _, name, a, b in items:
        need = (b - a) * packer.loads[name].spec.row_bytes
        fits = [x for x in packer.bins if x.free >= need]
        if fits:
            packer.put(min(fits, key=lambda x: (_bin_key(x, by), x.id)), name, a, b)
        else:
            packer.spill(name, a, b, sorted(packer.bins, key=lambda x: (-x.free, x.id)))
    return packer


def _key(t: TableLoad, by: str) -> float:
    return float(t.spec.nbytes) if by == "bytes" else t.load_ns


def _bin_key(b: Bin, by: str) -> float:
    return float(b.bytes) if by == "bytes" else b.load


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
    baseline = _greedy(loads, n, capacity, "bytes")
    limit = _fan_outs(baseline, nets)
    tried: list[tuple[int, int, Packer]] = []
    for order in (by_size, by_size[::-1]):
        packer = _pack_nets(loads, n, capacity, nets, order)
        fans = _fan_outs(packer, nets)
        if all(fans[net] <= limit[net] for net in nets):
            tried.append((sum(fans.values()), len(tried), packer))
    if tried:
        return min(tried, key=lambda x: x[:2])[2], ""
    return baseline, "packing by net could not beat the capacity layout's fan-out; used it"


def _fan_outs(packer: Packer, nets: dict[str, list[TableLoad]]) -> dict[str, int]:
    owner = {t.spec.name: net for net, ts in nets.items() for t in ts}
    return {
        net: sum(1 for b in packer.bins if any(owner[p.table] == net for p in b.parts))
        for net in nets
    }


def _pack_nets(
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


def build(
    manifest: Manifest,
    n_shards: int,
    strategy: str,
    endpoints: list[tuple[str, ...]],
    *,
    shard_memory: float | None = None,
    traffic: Traffic = Traffic(),
    access: Mapping[str, Mapping[str, float]] | None = None,
) -> Plan:
    """One plan with its report; ``strategy`` may be ``auto``."""
    if n_shards < 1:
        raise PlanError("--shards must be at least 1")
    if len(endpoints) != n_shards:
        raise PlanError(f"{len(endpoints)} endpoint sets for {n_shards} shards")
    loads = table_loads(manifest, traffic, access)
    total = sum(t.spec.nbytes for t in loads)
    if shard_memory is not None and total > n_shards * shard_memory:
        missing = total - n_shards * shard_memory
        raise PlanError(
            f"the model's tables need {total} bytes but {n_shards} shards of {int(shard_memory)}"
            f" bytes hold {int(n_shards * shard_memory)}: {int(missing)} bytes missing. Use "
            f"--shards {math.ceil(total / shard_memory)} or --shard-memory "
            f"{math.ceil(total / n_shards)}, or quantize the tables (recserve quantize)"
        )
    if strategy == "auto":
        candidates = {
            s: build(
                manifest,
                n_shards,
                s,
                endpoints,
                shard_memory=shard_memory,
                traffic=traffic,
                access=access,
            )
            for s in STRATEGIES
        }
        best = min(STRATEGIES, key=lambda s: (candidates[s].report["cost_us"], s))
        costs = ", ".join(f"{s} {candidates[s].report['cost_us']:.0f} us" for s in STRATEGIES)
        chosen = candidates[best]
        summary = {**chosen.report, "chosen_because": f"lowest request cost: {costs}"}
        return Plan(
            chosen.model_name,
            chosen.model_version,
            chosen.model_digest,
            best,
            chosen.shards,
            summary,
        )
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; use {', '.join(STRATEGIES)} or auto")
    capacity = shard_memory if shard_memory is not None else default_capacity(loads, n_shards)
    note = ""
    if strategy == "net":
        packer, note = _net(loads, n_shards, capacity)
    else:
        packer = _greedy(loads, n_shards, capacity, "bytes" if strategy == "capacity" else "load")
    shards = tuple(ShardPlan(i, endpoints[i], parts) for i, parts in enumerate(packer.plan()))
    plan = Plan(manifest.name, manifest.version, manifest.digest(), strategy, shards)
    summary = report(plan, manifest, traffic, access)
    if note:
        summary["note"] = note
    return Plan(plan.model_name, plan.model_version, plan.model_digest, strategy, shards, summary)


def report(
    plan: Plan,
    manifest: Manifest,
    traffic: Traffic = Traffic(),
    access: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """Bytes and load per shard, imbalance, fan-out, wire bytes and cost of a request."""
    loads = {t.spec.name: t for t in table_loads(manifest, traffic, access)}
    shard_bytes, shard_load, nets_on, wire = [], [], [], 0.0
    for shard in plan.shards:
        b = ld = 0.0
        nets: set[str] = set()
        for p in shard.parts:
            t = loads[p.table]
            frac = p.rows / t.spec.rows
            b += p.rows * t.spec.row_bytes
            ld += t.load_ns * frac
            nets.add(t.spec.net)
            # request: 8-byte ids and one 8-byte offset per bag; reply: float32 pooled rows
            wire += 8 * t.ids * frac + 8 * t.bags + 4 * t.spec.dim * t.bags
        shard_bytes.append(b)
        shard_load.append(ld)
        nets_on.append(nets)
    total_load = sum(shard_load) or 1.0
    contacted = sum(1 for nets in nets_on if nets)
    per_net = {
        net: sum(1 for nets in nets_on if net in nets)
        for net in sorted({t.net for t in manifest.tables})
    }
    critical_ns = max(shard_load) if shard_load else 0.0
    return {
        "traffic": {"samples": traffic.samples, "context_nets": sorted(traffic.context_nets)},
        "shard_bytes": [int(b) for b in shard_bytes],
        "shard_load_share": [round(x / total_load, 4) for x in shard_load],
        "bytes_imbalance": round(_imbalance(shard_bytes), 4),
        "load_imbalance": round(_imbalance(shard_load), 4),
        "split_tables": sorted({t for t in loads if sum(1 for _ in plan.parts_of(t)) > 1}),
        "shards_contacted": contacted,
        "shards_contacted_per_net": per_net,
        "wire_bytes_per_request": int(wire),
        "cost_us": round(critical_ns / 1e3 + RPC_US + RPC_CPU_US * contacted, 1),
    }


def _imbalance(values: list[float]) -> float:
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean else 1.0


def compare_table(plans: dict[str, Plan]) -> list[str]:
    """Human-readable side-by-side report of several plans."""
    lines = []
    head = f"{'':<30}" + "".join(f"{s:>14}" for s in plans)
    lines.append(head)

    def row(label: str, fn: Any) -> None:
        lines.append(f"{label:<30}" + "".join(f"{fn(p.report):>14}" for p in plans.values()))

    row("max/mean bytes", lambda r: f"{r['bytes_imbalance']:.2f}")
    row("max/mean load", lambda r: f"{r['load_imbalance']:.2f}")
    row("shards contacted (request)", lambda r: str(r["shards_contacted"]))
    nets = next(iter(plans.values())).report["shards_contacted_per_net"]
    for net in nets:
        row(
            f"shards contacted ({net} only)",
            lambda r, net=net: str(r["shards_contacted_per_net"][net]),
        )
    row("split tables", lambda r: str(len(r["split_tables"])))
    row("wire KiB per request", lambda r: f"{r['wire_bytes_per_request'] / 1024:.0f}")
    row("request cost (model, us)", lambda r: f"{r['cost_us']:.0f}")
    n = len(next(iter(plans.values())).shards)
    for i in range(n):
        row(
            f"shard {i} MiB / load share",
            lambda r, i=i: f"{r['shard_bytes'][i] / 2**20:.0f}/{r['shard_load_share'][i]:.2f}",
        )
    return lines
