"""The planner's perf model of a request: ids and load per table (after Lui et al.).

A request carries ``samples`` samples; a table is looked up once per sample per feature (or
once per request for a *context* net in the ranking form), with its mean pooling factor of
ids per lookup. A table's load is the time its ids take on a shard::

    load_ns = ids_per_request * (ID_NS + row_bytes / BYTES_PER_NS)

Rows of a split table are assumed equally hot (the ids of a Zipf table are scattered over its
rows), so a part's share of the load is its share of the rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson

from recserve.contracts.errors import PlanError
from recserve.contracts.manifest import Manifest, TableSpec
from recserve.contracts.schema import Doc

ID_NS = 10.0  # per id: index load, bounds, loop
BYTES_PER_NS = 16.0  # gathered row bytes per ns on one core


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
