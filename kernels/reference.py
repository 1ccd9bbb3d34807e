"""Plain numpy pooling (fancy indexing + ``reduceat``): the reference the kernel is tested
against and the baseline benchmarks compare with."""

from __future__ import annotations

import numpy as np

from kernels.errors import KernelError
from kernels.layout import Table, bag_bounds, check_ids, check_weights, table_shape
from kernels.pooling import PoolMode
from kernels.quant import Int8RowwiseTable


def gather_rows(table: Table, ids: np.ndarray) -> np.ndarray:
    """Float32 copies of the rows ``ids`` (already validated)."""
    if isinstance(table, Int8RowwiseTable):
        return table.dequantize(ids)
    return np.asarray(table[ids], dtype=np.float32)


def pool_numpy(
    table: Table,
    ids: np.ndarray,
    offsets: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    mode: PoolMode = "sum",
    include_last_offset: bool = False,
) -> np.ndarray:
    """``pool`` in plain numpy (fancy indexing + ``reduceat``): the reference baseline."""
    rows, dim = table_shape(table)
    ids = check_ids(ids, rows)
    bounds = bag_bounds(offsets, ids.size, include_last_offset=include_last_offset)
    if mode not in ("sum", "mean"):
        raise KernelError(f"mode must be 'sum' or 'mean', got {mode!r}")
    weights = check_weights(weights, ids.size)
    out = np.zeros((bounds.size - 1, dim), dtype=np.float32)
    if ids.size == 0 or out.shape[0] == 0:
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
