"""Expected hit rates of row caches under Zipf traffic, and how to split one cache budget.

Rows of a table are asked for with a bounded Zipf law of exponent ``s`` over its ``n`` rows
(the manifest's access statistics). A cache that keeps the ``c`` most popular rows serves
the share ``H(c) / H(n)`` of its lookups, with ``H(x) = integral_1^(x+1) t^-s dt`` (the
continuous form of the generalized harmonic number; exact enough to size caches and always
an upper bound for a real policy, which must learn the hot set). A row-range part of a
table whose hot rows are scattered (as real ids and our synthetic traffic are) gets the
part's share of the table's traffic and the same exponent over its own rows.

One budget over several parts is split to maximise the expected hits of the whole shard:
each part's next cached row is worth ``w (c + 1)^-s / H(n)`` lookups for its bytes, so the
split fills every part up to one marginal value per byte (water-filling by bisection).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_S = 1e-3
DEFAULT_ZIPF = 1.05  # a table without access statistics (as synthetic traffic assumes)
SLOT_BYTES = 72  # bookkeeping per cached row beside the row (kernels.rowcache: at most ~69)


@dataclass(frozen=True)
class CachedPart:
    rows: int
    zipf: float
    traffic: float  # expected ids per sample that read this part
    row_cost: float  # bytes one cached row costs (row plus bookkeeping)


def harmonic(x: float, s: float) -> float:
    """``integral_1^(x+1) t^-s dt``."""
    s = max(s, MIN_S)
    if abs(s - 1.0) < 1e-9:
        return math.log(x + 1.0)
    return ((x + 1.0) ** (1.0 - s) - 1.0) / (1.0 - s)


def hit_rate(rows: float, cached: float, zipf: float) -> float:
    """The share of lookups of a table of ``rows`` served by its ``cached`` hottest rows."""
    if rows <= 0:
        return 1.0
    cached = min(max(cached, 0.0), rows)
    return harmonic(cached, zipf) / harmonic(rows, zipf)


def _rows_at(part: CachedPart, value: float) -> float:
    """Rows of ``part`` worth at least ``value`` per byte."""
    s = max(part.zipf, MIN_S)
    scale = part.traffic / (harmonic(part.rows, s) * part.row_cost)
    if scale <= 0:
        return 0.0
    return min(float(part.rows), max(0.0, (scale / value) ** (1.0 / s) - 1.0))


def split(parts: Sequence[CachedPart], budget: float) -> list[int]:
    """Cached rows per part for ``budget`` bytes, maximising expected hits."""
    if not parts:
        return []
    if sum(p.rows * p.row_cost for p in parts) <= budget:
        return [p.rows for p in parts]
    lo, hi = 1e-30, 1e30  # marginal value per byte; bisect in log space
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        cost = sum(_rows_at(p, mid) * p.row_cost for p in parts)
        if cost > budget:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    rows = [int(_rows_at(p, hi)) for p in parts]
    # Rounding down leaves some bytes; hand them out in order of the parts' traffic.
    left = budget - sum(r * p.row_cost for r, p in zip(rows, parts, strict=True))
    for i in sorted(range(len(parts)), key=lambda i: -parts[i].traffic):
        extra = min(parts[i].rows - rows[i], int(left // parts[i].row_cost))
        rows[i] += max(0, extra)
        left -= max(0, extra) * parts[i].row_cost
    return rows


def expected_hit_rate(parts: Sequence[CachedPart], budget: float) -> float:
    """The share of a shard's ids served from a cache of ``budget`` bytes split by ``split``."""
    total = sum(p.traffic for p in parts)
    if total <= 0:
        return 1.0
    rows = split(parts, budget)
    hits = sum(p.traffic * hit_rate(p.rows, r, p.zipf) for p, r in zip(parts, rows, strict=True))
    return hits / total
