"""Pooled embedding lookups (EmbeddingBag): validation plus a numpy implementation.

``pool`` is the public entry point. Ids are validated before any row is read, so a bad id is
a typed error naming its position, never a silent read of row -1 or a segfault.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from kernels.errors import IdOutOfRangeError, KernelError
from kernels.quant import Int8RowwiseTable

Table = np.ndarray | Int8RowwiseTable
PoolMode = Literal["sum", "mean"]


def table_shape(table: Table) -> tuple[int, int]:
    if isinstance(table, Int8RowwiseTable):
        return table.shape
    if not isinstance(table, np.ndarray) or table.ndim != 2:
        raise KernelError("table must be a 2-D numpy array or an Int8RowwiseTable")
    if table.dtype not in (np.float32, np.float16):
        raise KernelError(f"table dtype must be float32 or float16, got {table.dtype}")
    return int(table.shape[0]), int(table.shape[1])


def bag_bounds(offsets: np.ndarray, n_ids: int, *, include_last_offset: bool) -> np.ndarray:
    """Offsets as ``B + 1`` int64 bounds ending at ``n_ids``, after checking them."""
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu":
        raise KernelError("offsets must be a 1-D integer array")
    if include_last_offset:
        if offsets.size == 0:
            raise KernelError("offsets with include_last_offset needs at least one entry")
        if int(offsets[-1]) != n_ids:
            raise KernelError(f"last offset {int(offsets[-1])} must equal len(ids) {n_ids}")
        bounds = offsets.astype(np.int64, copy=False)
    else:
        bounds = np.empty(offsets.size + 1, dtype=np.int64)
        bounds[:-1] = offsets
        bounds[-1] = n_ids
    if bounds.size > 1:
        if int(bounds[0]) != 0:
            raise KernelError(f"first offset must be 0, got {int(bounds[0])}")
        if np.any(np.diff(bounds) < 0):
            raise KernelError("offsets must be non-decreasing and not exceed len(ids)")
    return bounds


def check_ids(ids: np.ndarray, rows: int) -> np.ndarray:
    """Ids as a 1-D int array, all in ``[0, rows)``; raises naming the first bad position."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise KernelError("ids must be a 1-D integer array")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= rows):
        pos = int(np.flatnonzero((ids < 0) | (ids >= rows))[0])
        raise IdOutOfRangeError(pos, int(ids[pos]), rows)
    return ids


def gather_rows(table: Table, ids: np.ndarray) -> np.ndarray:
    """Float32 copies of the rows ``ids`` (already validated)."""
    if isinstance(table, Int8RowwiseTable):
        return table.dequantize(ids)
    return np.asarray(table[ids], dtype=np.float32)


def pool(
    table: Table,
    ids: np.ndarray,
    offsets: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    mode: PoolMode = "sum",
    out: np.ndarray | None = None,
    include_last_offset: bool = False,
) -> np.ndarray:
    """Pool bags of rows of ``table`` into float32 ``[B, dim]``.

    ``offsets`` holds the start of each bag (``B`` entries), or ``B + 1`` entries ending with
    ``len(ids)`` when ``include_last_offset`` is set, as in ``torch.nn.functional.embedding_bag``.
    An empty bag pools to zeros; a repeated id counts once per occurrence; ``weights`` scales
    each id's row; ``mean`` divides by the bag's id count.
    """
    rows, dim = table_shape(table)
    ids = check_ids(ids, rows)
    bounds = bag_bounds(offsets, ids.size, include_last_offset=include_last_offset)
    if mode not in ("sum", "mean"):
        raise KernelError(f"mode must be 'sum' or 'mean', got {mode!r}")
    n_bags = bounds.size - 1
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float32)
        if weights.shape != ids.shape:
            raise KernelError(f"weights shape {weights.shape} != ids shape {ids.shape}")
    if out is None:
        out = np.zeros((n_bags, dim), dtype=np.float32)
    else:
        if out.shape != (n_bags, dim) or out.dtype != np.float32:
            raise KernelError(f"out must be float32 {(n_bags, dim)}, got {out.dtype} {out.shape}")
        out[...] = 0.0
    if ids.size == 0 or n_bags == 0:
        return out
    gathered = gather_rows(table, ids)
    if weights is not None:
        gathered *= weights[:, None]
    lengths = np.diff(bounds)
    nonempty = lengths > 0
    out[nonempty] = np.add.reduceat(gathered, bounds[:-1][nonempty], axis=0)
    if mode == "mean":
        out[nonempty] /= lengths[nonempty, None].astype(np.float32)
    return out
