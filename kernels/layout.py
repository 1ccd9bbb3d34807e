"""A layout: one int64 row per table, the kernel's whole view of the tables of a call.

Columns, by name (``kernels.fused`` reads them by the same names)::

    KIND          0 float32, 1 float16, 2 int8 row-wise
    ADDRESS       address of the row id 0 would have (first id subtracted once, here)
    ROW_BYTES     bytes from one row to the next
    SCALE_OFFSET  int8: bytes from a row's start to its float32 scale (bias follows); else 0
    ROWS          rows of the table (ids are in [FIRST_ID, FIRST_ID + ROWS))
    MEAN          1: divide each bag by its length
    FIRST_ID      the id of the table's first row (a shard's row-range part takes global ids)
    DIM           the embedding dim
    OUT           the column of ``out`` ``[B, width, dim]`` the table's bags are pooled into
                  (the table's place in the call, unless the caller places it)
    FAR           1: the table's rows are mostly in DRAM, so the kernel prefetches them
                  further ahead, into L2 (``fused``): it is at least ``far_bytes()``, or at
                  least ``FAR_TABLE_MIN`` in a set that is (``mark_far``)

Also the checks every entry point shares: bag bounds from offsets or lengths, ids against
rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from numba import njit

from kernels.errors import IdOutOfRangeError, KernelError
from kernels.quant import Int8RowwiseTable

Table = np.ndarray | Int8RowwiseTable
KIND, ADDRESS, ROW_BYTES, SCALE_OFFSET, ROWS, MEAN, FIRST_ID, DIM, OUT, FAR = range(10)
COLUMNS = 10
_MEAN = {"sum": False, "mean": True}


def far_bytes() -> int:
    """Table size from which rows are prefetched far ahead: half the last-level cache (a
    smaller table is mostly cache-resident, and the near prefetch into L1 serves it best),
    at least 32 MiB."""
    global _FAR_BYTES
    if _FAR_BYTES is None:
        _FAR_BYTES = max(32 << 20, _last_level_cache() // 2)
    return _FAR_BYTES


def _last_level_cache() -> int:
    """Bytes of CPU 0's largest cache level as sysfs reports it, or 0."""
    caches = Path("/sys/devices/system/cpu/cpu0/cache")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    best = (0, 0)
    for index in caches.glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        try:
            n = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        except ValueError:
            continue
        best = max(best, (level, n))
    return best[1]


_FAR_BYTES: int | None = None
# A table below this stays in cache among larger ones (26 tables of 2.5 MB took 1.2x as long
# with the far prefetch; 26 of 39 MB, 1 GB together, 0.92x as long).
FAR_TABLE_MIN = 16 << 20


def mark_far(layout: np.ndarray) -> None:
    """Set the FAR column of a set of tables pooled together (a shard's parts, a model's
    tables), whose rows ``table_layout`` made: a table is far when it is at least
    ``far_bytes()`` on its own (as ``table_layout`` marked it), or when the set is and the
    table is at least ``FAR_TABLE_MIN``."""
    size = layout[:, ROWS] * layout[:, ROW_BYTES]
    far = layout[:, FAR] != 0
    if int(size.sum()) >= far_bytes():
        far |= size >= FAR_TABLE_MIN
    layout[:, FAR] = far


def table_shape(table: Table) -> tuple[int, int]:
    if isinstance(table, Int8RowwiseTable):
        return table.shape
    if not isinstance(table, np.ndarray) or table.ndim != 2:
        raise KernelError("table must be a 2-D numpy array or an Int8RowwiseTable")
    if table.dtype not in (np.float32, np.float16):
        raise KernelError(f"table dtype must be float32 or float16, got {table.dtype}")
    return int(table.shape[0]), int(table.shape[1])


def table_layout(table: Table, address: Callable[[np.ndarray], int]) -> list[int]:
    """A table's row of a layout (columns above; mean flag and first id 0). ``address``
    is the compiled address getter (numpy's own getters cost 1-2 us a call; the compiled one
    0.2-0.7 us, but numba has no float16 arrays)."""
    if isinstance(table, Int8RowwiseTable):
        data, kind, dim = table.data, 2, table.dim
    elif isinstance(table, np.ndarray) and table.ndim == 2:
        data, dim = table, int(table.shape[1])
        if table.dtype == np.float32:  # native byte order only
            kind = 0
        elif table.dtype == np.float16:
            kind = 1
        else:
            raise KernelError(f"table dtype must be float32 or float16, got {table.dtype}")
    else:
        raise KernelError("table must be a 2-D numpy array or an Int8RowwiseTable")
    if not data.flags.c_contiguous:
        raise KernelError("table rows must be C-contiguous")
    rows = int(data.shape[0])
    if not rows:
        return _row(kind, 0, 0, 0, 0, dim)
    addr = data.ctypes.data if kind == 1 else address(data)
    row = _row(kind, addr, data.strides[0], dim if kind == 2 else 0, rows, dim)
    row[FAR] = int(rows * data.strides[0] >= far_bytes())
    return row


def _row(kind: int, addr: int, row_bytes: int, scale: int, rows: int, dim: int) -> list[int]:
    row = [0] * COLUMNS
    row[KIND], row[ADDRESS], row[ROW_BYTES], row[SCALE_OFFSET] = kind, addr, row_bytes, scale
    row[ROWS], row[DIM] = rows, dim
    return row


def set_modes(layout: np.ndarray, modes: Sequence[str] | str) -> int:
    """Check that the tables of ``layout`` share a dim and ``modes`` is one mode or one per
    table, then write the kernel's mean flags; returns the dim."""
    dim = int(layout[0, DIM])
    if layout.shape[0] > 1:
        dims = set(layout[:, DIM].tolist())
        if len(dims) > 1:
            raise KernelError(f"tables differ in dim: {sorted(dims)}")
    names = [modes] * layout.shape[0] if isinstance(modes, str) else list(modes)
    if len(names) != layout.shape[0] or any(m not in _MEAN for m in names):
        raise KernelError(f"modes must be 'sum' or 'mean', one or one per table: {modes!r}")
    layout[:, MEAN] = [_MEAN[m] for m in names]
    return dim


def bag_bounds(
    offsets: np.ndarray, n_ids: int, *, include_last_offset: bool, ordered: bool = True
) -> np.ndarray:
    """Offsets as ``B + 1`` int64 bounds ending at ``n_ids``. ``ordered``: check that they do
    not decrease (O(B)); without it only O(1) checks run, and the kernel checks the rest
    as it reads them."""
    if not isinstance(offsets, np.ndarray):
        offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu":
        raise KernelError("offsets must be a 1-D integer array")
    if include_last_offset:
        if offsets.size == 0 or int(offsets[-1]) != n_ids:
            raise KernelError(
                f"with include_last_offset the last offset must equal len(ids) {n_ids}"
            )
        bounds = offsets.astype(np.int64, copy=False)
    else:
        bounds = np.empty(offsets.size + 1, dtype=np.int64)
        bounds[:-1] = offsets
        bounds[-1] = n_ids
    if bounds.size > 1:
        if int(bounds[0]) != 0:
            raise KernelError(f"first offset must be 0, got {int(bounds[0])}")
        if ordered and np.any(np.diff(bounds) < 0):
            raise KernelError("offsets must be non-decreasing and not exceed len(ids)")
    return bounds


def bag_positions(lengths: np.ndarray, n_ids: int) -> np.ndarray | None:
    """Bag lengths as ``B + 1`` int64 positions into ``n_ids`` ids, in one compiled pass
    (a shard's every lookup: numpy's reductions and ``accumulate`` cost several times more
    with the caches cold from pooling); None when a length is negative or they do not add
    up to ``n_ids``."""
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise KernelError("lengths must be a 1-D integer array")
    out = np.empty(lengths.size + 1, np.int64)
    return out if _positions(lengths, n_ids, out) else None


@njit(nogil=True, cache=True)
def _positions(lengths, n_ids, out):  # pragma: no cover
    total = 0
    out[0] = 0
    for i in range(lengths.size):
        n = int(lengths[i])
        if n < 0:
            return False
        total += n
        out[i + 1] = total
    return total == n_ids


def check_ids(ids: np.ndarray, rows: int, *, base: int = 0, first: int = 0) -> np.ndarray:
    """Ids as a 1-D int array, all in ``[first, first + rows)``; raises naming the first bad
    position (``base`` + its index)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise KernelError("ids must be a 1-D integer array")
    if ids.size and (int(ids.min()) < first or int(ids.max()) >= first + rows):
        pos = int(np.flatnonzero((ids < first) | (ids >= first + rows))[0])
        raise IdOutOfRangeError(base + pos, int(ids[pos]), rows, first)
    return ids


def check_weights(weights: np.ndarray | None, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if weights.shape != (n,):
        raise KernelError(f"weights shape {weights.shape} != ids shape {(n,)}")
    return weights
