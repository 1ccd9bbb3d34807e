"""Sharding plans: which shard serves which rows of which table (``recserve plan``).

Separated as torchrec's planner is: the perf model of a request (``loads``), the packer
(``packing``), the strategies that propose placements over it (``strategies``) and the cost
model that scores them and writes the report (``cost``). ``build`` runs the requested
strategy, or every strategy for ``auto``, and makes one ``Plan`` of the chosen proposal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from recserve.contracts.errors import PlanError
from recserve.contracts.manifest import Manifest
from recserve.contracts.plan import Plan, ShardPlan
from recserve.planning.cost import compare_table, report
from recserve.planning.loads import Traffic, read_access_stats, table_loads
from recserve.planning.packing import default_capacity
from recserve.planning.strategies import STRATEGIES as _STRATEGIES

STRATEGIES = tuple(_STRATEGIES)

__all__ = ["STRATEGIES", "Traffic", "build", "compare_table", "read_access_stats", "report"]


def build(
    manifest: Manifest,
    n_shards: int,
    strategy: str,
    endpoints: list[tuple[str, ...]],
    *,
    shard_memory: float | None = None,
    traffic: Traffic = Traffic(),
    access: Mapping[str, Mapping[str, float]] | None = None,
    cache_bytes: int | None = None,
) -> Plan:
    """One plan with its report; ``strategy`` may be ``auto``. With ``cache_bytes`` the
    shards serve their parts from a row cache of that size over the files (``shardd
    --cache-bytes``): ``shard_memory`` then bounds the cache, not the parts, and the report
    gives each shard's expected hit rate."""
    if n_shards < 1:
        raise PlanError("--shards must be at least 1")
    if len(endpoints) != n_shards:
        raise PlanError(f"{len(endpoints)} endpoint sets for {n_shards} shards")
    if strategy != "auto" and strategy not in _STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; use {', '.join(STRATEGIES)} or auto")
    loads = table_loads(manifest, traffic, access)
    total = sum(t.spec.nbytes for t in loads)
    if cache_bytes is not None:
        if shard_memory is not None and cache_bytes > shard_memory:
            raise PlanError(
                f"--cache-bytes {cache_bytes} is more than --shard-memory {int(shard_memory)}"
            )
        shard_memory = None  # the parts live on disk: pack them as if memory were ample
    if shard_memory is not None and total > n_shards * shard_memory:
        missing = total - n_shards * shard_memory
        raise PlanError(
            f"the model's tables need {total} bytes but {n_shards} shards of {int(shard_memory)}"
            f" bytes hold {int(n_shards * shard_memory)}: {int(missing)} bytes missing. Use "
            f"--shards {math.ceil(total / shard_memory)} or --shard-memory "
            f"{math.ceil(total / n_shards)}, quantize the tables (recserve quantize), or serve "
            "them from disk through a row cache (--cache-bytes)"
        )
    capacity = shard_memory if shard_memory is not None else default_capacity(loads, n_shards)
    names = STRATEGIES if strategy == "auto" else (strategy,)
    proposals = {name: _STRATEGIES[name](loads, n_shards, capacity) for name in names}
    reports = {
        name: report(parts, manifest, traffic, access, cache_bytes)
        for name, (parts, _) in proposals.items()
    }
    chosen = min(names, key=lambda s: (reports[s]["cost_us"], s))
    summary = reports[chosen]
    note = proposals[chosen][1]
    if note:
        summary["note"] = note
    if strategy == "auto":
        costs = ", ".join(f"{s} {reports[s]['cost_us']:.0f} us" for s in names)
        summary["chosen_because"] = f"lowest request cost: {costs}"
    shards = tuple(
        ShardPlan(i, endpoints[i], parts) for i, parts in enumerate(proposals[chosen][0])
    )
    return Plan(manifest.name, manifest.version, manifest.digest(), chosen, shards, summary)
