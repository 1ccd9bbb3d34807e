# numba-compiled bodies: numpy scalar types are numba's, not mypy's.
# mypy: disable-error-code="no-any-return"
"""Updated rows applied to pooled bags: a version's rows as corrections, not copies.

A model version's updated rows of a table part are kept as sorted row ids and, per row, the
difference between its new value and the value the table file holds. Pooling reads the
file's rows as always; then every id of a bag found among the updated ones adds its
difference (times its weight, divided by the bag's length for ``mean``), which gives the
bag pooled over the new rows. The file is never written, a version is one immutable pair of
arrays, and switching versions is choosing another pair.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True, inline="always")
def _find(keys, x):
    """The index of ``x`` in sorted ``keys``, or -1."""
    lo, hi = 0, keys.size
    while lo < hi:
        mid = (lo + hi) >> 1
        if keys[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < keys.size and keys[lo] == x else -1


@njit(nogil=True, cache=True)
def apply_deltas(out, j, ids, bounds, weights, weighted, mean, bits, first, keys, deltas):
    """Add ``deltas`` of the ids of ``keys`` (sorted) found in each bag of column ``j`` of
    ``out`` ``[bags, parts, dim]``; bag ``b`` is ``ids[bounds[b]:bounds[b + 1]]``. Only
    ids whose bit is set in ``bits`` (local row ``id - first``) are looked for: most ids of
    a lookup are rows no update touched, passed over with one bit test."""
    if keys.size == 0:
        return
    dim = deltas.shape[1]
    for b in range(bounds.size - 1):
        lo, hi = bounds[b], bounds[b + 1]
        if hi <= lo:
            continue
        scale0 = 1.0 / (hi - lo) if mean else 1.0
        for i in range(lo, hi):
            r = ids[i] - first
            if (bits[r >> 3] >> (r & 7)) & 1 == 0:
                continue
            k = _find(keys, ids[i])
            if k >= 0:
                scale = scale0 * (weights[i] if weighted else 1.0)
                for d in range(dim):
                    out[b, j, d] += np.float32(scale * deltas[k, d])
