"""The cost model: what a plan costs a request, and the report ``plan.json`` keeps.

Cost of a request: the slowest contacted shard's load, plus ``RPC_US`` of round trip, plus
``RPC_CPU_US`` of gateway CPU per contacted shard (fan-out costs CPU even when parallel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from recserve.contracts.manifest import Manifest
from recserve.contracts.plan import Part, Plan
from recserve.planning.hits import DEFAULT_ZIPF, SLOT_BYTES, CachedPart, expected_hit_rate
from recserve.planning.loads import Traffic, table_loads

RPC_US = 120.0  # loopback ZeroMQ round trip
RPC_CPU_US = 20.0  # gateway CPU per shard contacted (encode, decode, merge)


def report(
    shards: Sequence[Sequence[Part]],
    manifest: Manifest,
    traffic: Traffic = Traffic(),
    access: Mapping[str, Mapping[str, float]] | None = None,
    cache_bytes: int | None = None,
) -> dict[str, Any]:
    """Bytes and load per shard, imbalance, fan-out, wire bytes and cost of a request; with
    ``cache_bytes`` each shard's expected row-cache hit rate."""
    loads = {t.spec.name: t for t in table_loads(manifest, traffic, access)}
    shard_bytes, shard_load, nets_on, wire, hit_rates = [], [], [], 0.0, []
    for parts in shards:
        b = ld = 0.0
        nets: set[str] = set()
        cached = []
        for p in parts:
            t = loads[p.table]
            frac = p.rows / t.spec.rows
            b += p.rows * t.spec.row_bytes
            ld += t.load_ns * frac
            nets.add(t.spec.net)
            # request: 8-byte ids and one 8-byte offset per bag; reply: float32 pooled rows
            wire += 8 * t.ids * frac + 8 * t.bags + 4 * t.spec.dim * t.bags
            zipf = t.spec.stats.zipf if t.spec.stats.zipf is not None else DEFAULT_ZIPF
            cached.append(CachedPart(p.rows, zipf, t.ids * frac, t.spec.row_bytes + SLOT_BYTES))
        if cache_bytes is not None:
            hit_rates.append(round(expected_hit_rate(cached, cache_bytes), 4))
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
    out = {
        "traffic": {"samples": traffic.samples, "context_nets": sorted(traffic.context_nets)},
        "shard_bytes": [int(b) for b in shard_bytes],
        "shard_load_share": [round(x / total_load, 4) for x in shard_load],
        "bytes_imbalance": round(_imbalance(shard_bytes), 4),
        "load_imbalance": round(_imbalance(shard_load), 4),
        "split_tables": sorted(
            {t for t in loads if sum(p.table == t for parts in shards for p in parts) > 1}
        ),
        "shards_contacted": contacted,
        "shards_contacted_per_net": per_net,
        "wire_bytes_per_request": int(wire),
        "cost_us": round(critical_ns / 1e3 + RPC_US + RPC_CPU_US * contacted, 1),
    }
    if cache_bytes is not None:
        out["cache_bytes"] = cache_bytes
        out["expected_hit_rate"] = hit_rates
    return out


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
    cached = "expected_hit_rate" in next(iter(plans.values())).report
    if cached:
        row("cache hit rate (worst shard)", lambda r: f"{min(r['expected_hit_rate']):.3f}")
    n = len(next(iter(plans.values())).shards)
    for i in range(n):
        row(
            f"shard {i} MiB / load share",
            lambda r, i=i: f"{r['shard_bytes'][i] / 2**20:.0f}/{r['shard_load_share'][i]:.2f}",
        )
        if cached:
            row(f"shard {i} cache hit rate", lambda r, i=i: f"{r['expected_hit_rate'][i]:.3f}")
    return lines
