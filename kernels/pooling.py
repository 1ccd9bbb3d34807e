"""Pooled embedding lookups (EmbeddingBag): the public API.

``pool`` pools one table, ``pool_many`` several tables with the same bag count in one compiled
call (amortising per-call overhead for requests that touch many small tables), and
``pool_packed`` takes the packed layout the shard daemon receives on the wire: one ids
buffer for all tables and a ``[T, B + 1]`` array of bag bounds into it.

Everything is validated before memory is touched: an id outside ``[0, rows)`` raises
``IdOutOfRangeError`` naming the first bad position (numpy would silently read row -1; the
compiled kernel has no bounds checks). ``pool_numpy`` is a plain numpy implementation kept for
correctness checks and as the baseline benchmarks compare against.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any, Literal

import numba
import numpy as np

from kernels.errors import IdOutOfRangeError, KernelError
from kernels.layout import (
    ADDRESS,
    COLUMNS,
    DIM,
    FAR,
    FIRST_ID,
    KIND,
    OUT,
    ROW_BYTES,
    ROWS,
    SCALE_OFFSET,
    Table,
    bag_bounds,
    bag_positions,
    check_ids,
    check_weights,
    far_bytes,
    mark_far,
    set_modes,
    table_layout,
    table_shape,
)
from kernels.quant import TAIL_BYTES, Int8RowwiseTable, quantize_rows

PoolMode = Literal["sum", "mean"]
SERIAL_BELOW = 2048  # ids per call under which one thread beats waking the pool
_ONE = np.ones(1, np.float32)
MAX_THREADS: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]


def default_threads() -> int:
    """Cores this process may run on, capped by numba's pool size."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_THREADS))


def _ids_for_kernel(ids: np.ndarray) -> np.ndarray:
    if not isinstance(ids, np.ndarray):
        ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise KernelError("ids must be a 1-D integer array")
    if ids.dtype == np.uint64:
        if ids.size and int(ids.max()) >= 2**63:
            raise IdOutOfRangeError(int(ids.argmax()), int(ids.max()), 2**63)
        return ids.astype(np.int64)
    if ids.dtype not in (np.int64, np.int32):
        return ids.astype(np.int64)  # narrower ints and uint32: widen once
    return ids if ids.flags.c_contiguous else np.ascontiguousarray(ids)


class TableSet:
    """Tables resolved once for many pooling calls: addresses, row sizes and row counts.

    Resolving a table costs ~2 us (numpy's and numba's address getters are slow), so a
    request over 26 tables paid ~50 us before any row was read; a shard or a gateway keeps
    a ``TableSet`` of what it serves and pools subsets of it. ``first_ids[t]`` (default 0)
    is the id of table ``t``'s first row: a shard's row-range part takes global ids, no
    copy. The set holds references to the tables, so their memory outlives it.
    """

    def __init__(self, tables: Sequence[Table], first_ids: Sequence[int] | None = None) -> None:
        self.tables = list(tables)
        self.layout = np.array(
            [table_layout(t, _compiled().address) for t in self.tables], np.int64
        ).reshape(-1, COLUMNS)
        mark_far(self.layout)
        if first_ids is not None:
            if len(first_ids) != len(self.tables):
                raise KernelError(f"{len(first_ids)} first_ids for {len(self.tables)} tables")
            self.layout[:, FIRST_ID] = first_ids
            self.layout[:, ADDRESS] -= self.layout[:, FIRST_ID] * self.layout[:, ROW_BYTES]

    def __len__(self) -> int:
        return len(self.tables)

    def pool(
        self,
        which: Sequence[int] | np.ndarray,
        ids: np.ndarray,
        bounds: np.ndarray,
        *,
        weights: np.ndarray | None = None,
        modes: Sequence[str] | str = "sum",
        out: np.ndarray | None = None,
        threads: int | None = None,
    ) -> np.ndarray:
        """Pool tables ``which`` (indices into the set) as ``pool_packed`` does: float32
        ``[B, len(which), dim]``; ``bounds[j]`` delimits the bags of table ``which[j]``."""
        return self.prepare(
            which, ids, bounds, weights=weights, modes=modes, out=out, threads=threads
        ).run()

    def prepare(
        self,
        which: Sequence[int] | np.ndarray,
        ids: np.ndarray,
        bounds: np.ndarray,
        *,
        weights: np.ndarray | None = None,
        modes: Sequence[str] | str = "sum",
        out: np.ndarray | None = None,
        threads: int | None = None,
        cols: Sequence[int] | np.ndarray | None = None,
    ) -> PoolCall:
        """``pool``'s checks and output allocation, without running it: ``run()`` the
        result (on any thread) to pool. With ``cols`` table ``which[j]``'s bags go to column
        ``cols[j]`` of ``out``, float32 ``[B, width, dim]`` (a batch's pooled features, the
        other columns left as they are)."""
        return self.plan(which, modes, cols).call(
            ids, bounds, weights=weights, out=out, threads=threads
        )

    def plan(
        self,
        which: Sequence[int] | np.ndarray,
        modes: Sequence[str] | str = "sum",
        cols: Sequence[int] | np.ndarray | None = None,
    ) -> PoolPlan:
        """What ``prepare`` checks of the tables, modes and columns, once: a caller that
        pools the same tables again and again (a shard's parts list) keeps the plan and
        binds each call's arrays with ``PoolPlan.call``."""
        # numpy reductions cost ~1 us each: checks here stay in take() and Python sets.
        try:
            layout = self.layout.take(which, axis=0)  # a copy: the mean flags are the plan's
        except (IndexError, TypeError, ValueError):
            raise KernelError(f"which {which!r} is outside a set of {len(self)} tables") from None
        if layout.ndim != 2 or layout.shape[0] == 0:
            raise KernelError("which must name at least one table of the set")
        dim = set_modes(layout, modes)
        if cols is None:
            layout[:, OUT] = np.arange(layout.shape[0])
            return PoolPlan(layout, dim, None)
        at = np.asarray(cols)
        if at.shape != (layout.shape[0],) or at.dtype.kind not in "iu":
            raise KernelError(f"cols must be {layout.shape[0]} integers, one per table")
        if int(at.min()) < 0:
            raise KernelError("cols must be columns of out, >= 0")
        layout[:, OUT] = at
        return PoolPlan(layout, dim, int(at.max()) + 1)


class PoolPlan:
    """Tables, modes and output columns checked once (``TableSet.plan``); ``call`` binds one
    call's ids, bounds, weights and output with only the checks that depend on them. A
    shard keeps one per kernel call of a parts list: a lookup's preparation then runs a
    few lines of Python, not the whole of ``prepare``, with its caches cold from pooling."""

    __slots__ = ("dim", "layout", "width")

    def __init__(self, layout: np.ndarray, dim: int, width: int | None) -> None:
        self.layout = layout
        self.dim = dim
        # None: out is [B, tables, dim], table j in column j; else out is [B, w, dim] with
        # w >= width and each table in its column (``layout[:, OUT]``).
        self.width = width

    def call(
        self,
        ids: np.ndarray,
        bounds: np.ndarray,
        *,
        weights: np.ndarray | None = None,
        out: np.ndarray | None = None,
        threads: int | None = None,
    ) -> PoolCall:
        """A checked call of the plan (as ``TableSet.prepare`` would make it)."""
        # A copy: a call's tables may be retargeted (``PoolCall.retarget``).
        return _prepare(self.layout.copy(), self.dim, ids, bounds, weights, out, threads,
                        self.width)  # fmt: skip


def pool_packed(
    tables: Sequence[Table],
    ids: np.ndarray,
    bounds: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    modes: Sequence[str] | str = "sum",
    out: np.ndarray | None = None,
    threads: int | None = None,
    first_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """Pool ``T`` tables' bags from one packed ids buffer into float32 ``[B, T, dim]``.

    ``bounds[t]`` holds the ``B + 1`` positions in ``ids`` delimiting table ``t``'s bags;
    tables may share or interleave positions. ``first_ids[t]`` (default 0) is the id of
    table ``t``'s first row: a shard passes a row-range part with global ids, no copy.
    All tables must share ``dim``. ``modes`` is one mode or one per table. Callers that
    pool the same tables again and again should keep a ``TableSet``.
    """
    if len(tables) == 0:
        raise KernelError("pool_packed needs at least one table")
    return TableSet(tables, first_ids).pool(
        range(len(tables)), ids, bounds, weights=weights, modes=modes, out=out, threads=threads
    )


class PoolCall:
    """A checked pooling call, ready to run: ``TableSet.prepare``'s result.

    Preparing (checks, output allocation, kernel choice) and running are split so a server
    can prepare on one thread and run on another: the thread that runs it does nothing but
    the compiled loop.
    """

    __slots__ = ("bounds", "ids", "kernel", "layout", "out", "threads", "weighted", "weights")

    def __init__(
        self,
        kernel: Any,
        layout: np.ndarray,
        ids: np.ndarray,
        bounds: np.ndarray,
        weights: np.ndarray | None,
        out: np.ndarray,
        threads: int,
    ) -> None:
        self.kernel = kernel  # None: nothing to pool (no bags or no dims)
        self.layout = layout
        self.ids = ids
        self.bounds = bounds
        self.weighted = weights is not None
        self.weights = _ONE if weights is None else weights
        self.out = out
        self.threads = threads

    def retarget(self, j: int, table: Table) -> None:
        """Read the ``j``-th table of the call from ``table`` instead (same dim and kind of
        pooling; ids are rows of ``table``): a shard's rows fetched for one lookup."""
        row = table_layout(table, _compiled().address)
        if row[DIM] != self.layout[j, DIM]:
            raise KernelError(f"dim {row[DIM]} != the call's {int(self.layout[j, DIM])}")
        for col in (KIND, ADDRESS, ROW_BYTES, SCALE_OFFSET, ROWS, FAR):
            self.layout[j, col] = row[col]
        self.layout[j, FIRST_ID] = 0

    def run(self) -> np.ndarray:
        """Pool into ``out`` and return it; raises ``IdOutOfRangeError`` on a bad id."""
        if self.kernel is None:
            return self.out
        if self.threads > 1:
            _use_threads(self.threads)  # numba's thread count is per calling thread
        if not self.kernel(
            self.layout, self.ids, self.bounds, self.weights, self.weighted, self.out
        ):
            _explain_bad(self.layout, self.ids, self.bounds)
            raise KernelError("invalid ids or bounds")  # unreachable: _explain_bad raises
        return self.out


def _prepare(
    layout: np.ndarray,
    dim: int,
    ids: np.ndarray,
    bounds: np.ndarray,
    weights: np.ndarray | None,
    out: np.ndarray | None,
    threads: int | None,
    width: int | None = None,
) -> PoolCall:
    """The call's checks; ``layout`` is the call's own, its OUT column set (``width``: as
    ``PoolPlan.width``)."""
    n_tables = layout.shape[0]
    ids = _ids_for_kernel(ids)
    if not (
        isinstance(bounds, np.ndarray) and bounds.dtype == np.int64 and bounds.flags.c_contiguous
    ):
        bounds = np.ascontiguousarray(bounds, dtype=np.int64)
    if bounds.ndim != 2 or bounds.shape[0] != n_tables or bounds.shape[1] < 1:
        raise KernelError(f"bounds must be [{n_tables}, B + 1], got {bounds.shape}")
    weights = check_weights(weights, ids.size)
    n_bags = bounds.shape[1] - 1
    if width is None:
        if out is None:
            out = np.empty((n_bags, n_tables, dim), np.float32)
        elif (
            out.shape != (n_bags, n_tables, dim)
            or out.dtype != np.float32
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise KernelError(
                f"out must be writable C-contiguous float32 {(n_bags, n_tables, dim)}"
            )
    else:
        out = _checked_placed(out, n_bags, dim, width)
    if threads is not None and threads < 1:
        raise KernelError(f"threads must be >= 1, got {threads}")
    if out.size == 0:
        _explain_bad(layout, ids, bounds)
        return PoolCall(None, layout, ids, bounds, weights, out, 1)
    kernel, want = _kernel(ids.size, threads)
    return PoolCall(kernel, layout, ids, bounds, weights, out, want)


def _kernel(n_ids: int, threads: int | None) -> tuple[Any, int]:
    """The compiled kernel for a call of ``n_ids`` ids, and the threads it runs on."""
    want = 1 if n_ids < SERIAL_BELOW else min(threads or default_threads(), MAX_THREADS)
    compiled = _compiled()
    return (compiled.pool_tables_serial if want == 1 else compiled.pool_tables_kernel), want


def _checked_placed(out: np.ndarray | None, bags: int, dim: int, width: int) -> np.ndarray:
    """``out``, checked as an output the layout's columns (all below ``width``) point into:
    the kernel writes where the layout says, unchecked."""
    if (
        out is None
        or out.ndim != 3
        or out.shape[0] != bags
        or out.shape[2] != dim
        or out.dtype != np.float32
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise KernelError(f"out must be writable C-contiguous float32 [{bags}, width, {dim}]")
    if width > out.shape[1]:
        raise KernelError(f"cols must be columns of out, in [0, {out.shape[1]})")
    return out


_THREADS = threading.local()


def _use_threads(n: int) -> None:
    """Set numba's thread count for this thread (numba's own getter costs ~1 us a call)."""
    n = min(n, MAX_THREADS)
    if getattr(_THREADS, "n", None) != n:
        numba.set_num_threads(n)
        _THREADS.n = n


def _explain_bad(layout: np.ndarray, ids: np.ndarray, bounds: np.ndarray) -> None:
    """The slow path after the kernel found bad input: raise the precise error."""
    if bounds.size and (
        bounds.min() < 0 or bounds.max() > ids.size or np.any(np.diff(bounds, axis=1) < 0)
    ):
        raise KernelError("bounds must be non-decreasing positions within ids")
    for t in range(layout.shape[0]):
        lo, hi, first = int(bounds[t, 0]), int(bounds[t, -1]), int(layout[t, FIRST_ID])
        check_ids(ids[lo:hi], int(layout[t, ROWS]), base=lo, first=first)


_FUSED: Any = None


def _compiled() -> Any:
    """The compiled module, compiled or loaded from numba's cache on first use."""
    global _FUSED
    if _FUSED is None:
        from kernels import fused

        _FUSED = fused
    return _FUSED


def pool_many(
    tables: Sequence[Table],
    ids: Sequence[np.ndarray],
    offsets: Sequence[np.ndarray],
    *,
    weights: Sequence[np.ndarray | None] | None = None,
    modes: Sequence[str] | str = "sum",
    include_last_offset: bool = False,
    threads: int | None = None,
) -> np.ndarray:
    """Pool several tables (same bag count, same dim) in one call: float32 ``[B, T, dim]``."""
    if not (len(tables) == len(ids) == len(offsets)):
        raise KernelError("tables, ids and offsets must have the same length")
    starts = np.cumsum([0, *[np.asarray(i).size for i in ids]])
    bounds = (
        np.stack(
            [
                bag_bounds(o, np.asarray(i).size, include_last_offset=include_last_offset) + s
                for o, i, s in zip(offsets, ids, starts, strict=False)
            ]
        )
        if tables
        else np.zeros((0, 1), np.int64)
    )
    if bounds.ndim != 2:
        raise KernelError("every table needs the same number of bags")
    packed_ids = (
        np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])
        if ids
        else np.zeros(0, np.int64)
    )
    packed_w = None
    if weights is not None and any(w is not None for w in weights):
        packed_w = np.concatenate(
            [
                np.ones(np.asarray(i).size, np.float32) if w is None else np.asarray(w, np.float32)
                for i, w in zip(ids, weights, strict=True)
            ]
        )
    return pool_packed(tables, packed_ids, bounds, weights=packed_w, modes=modes, threads=threads)


def pool(
    table: Table,
    ids: np.ndarray,
    offsets: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    mode: PoolMode = "sum",
    out: np.ndarray | None = None,
    include_last_offset: bool = False,
    threads: int | None = None,
) -> np.ndarray:
    """Pool bags of rows of ``table`` into float32 ``[B, dim]``.

    ``offsets`` holds the start of each bag (``B`` entries), or ``B + 1`` entries ending with
    ``len(ids)`` when ``include_last_offset`` is set, as in ``torch.nn.functional.embedding_bag``
    (the flag is explicit because ``[0, 3, 5]`` with five ids is either three bags, the last
    empty, or two). An empty bag pools to zeros; a repeated id counts once per occurrence;
    ``weights`` scales each id's row; ``mean`` divides by the bag's id count.
    """
    if weights is None and isinstance(table, np.ndarray) and type(mode) is str and mode in _MODES:
        pooled = _pool_f32(table, ids, offsets, mode, out, include_last_offset, threads)
        if pooled is not None:
            return pooled
    ids = _ids_for_kernel(ids)
    bounds = bag_bounds(offsets, ids.size, include_last_offset=include_last_offset, ordered=False)
    n_bags = bounds.size - 1
    packed_out = None
    if out is not None:
        dim = table_shape(table)[1]
        if (
            out.shape != (n_bags, dim)
            or out.dtype != np.float32
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise KernelError(
                f"out must be writable C-contiguous float32 {(n_bags, dim)}, "
                f"got {out.dtype} {out.shape}"
            )
        packed_out = out.reshape(n_bags, 1, dim)
    # One table: its layout row directly (a TableSet costs ~2.5 us more a call).
    layout = np.array([table_layout(table, _compiled().address)], np.int64)
    dim = set_modes(layout, mode)
    result = _prepare(layout, dim, ids, bounds.reshape(1, -1), weights, packed_out, threads).run()
    return result.reshape(n_bags, dim)


_F32, _I64, _I32 = np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.int32)
_MODES = {"sum": 0, "mean": 1}


def _pool_f32(
    table: np.ndarray,
    ids: Any,
    offsets: Any,
    mode: str,
    out: np.ndarray | None,
    last: bool,
    threads: int | None,
) -> np.ndarray | None:
    """``pool`` of a float32 table with ``offsets`` as int64, its bounds and layout row
    made by one compiled call (``fused.one_table``): ~3 us of Python a call where the checked
    path takes ~7, which is 5 % of pooling 5,000 rows from RAM. None when the call is not of
    that common case or its input is bad: ``pool``'s checked path then pools it or names
    what is wrong."""
    if not (
        table.dtype is _F32
        and table.ndim == 2
        and table.flags.c_contiguous
        and table.shape[0]
        and table.shape[1]
        and type(ids) is np.ndarray
        and ids.ndim == 1
        and (ids.dtype is _I64 or ids.dtype is _I32)
        and ids.flags.c_contiguous
        and type(offsets) is np.ndarray
        and offsets.ndim == 1
        and offsets.dtype is _I64
        and offsets.flags.c_contiguous
        and (threads is None or threads >= 1)
    ):
        return None
    n_bags = offsets.shape[0] - 1 if last else offsets.shape[0]
    if n_bags < 1:
        return None
    dim = table.shape[1]
    if out is None:
        out = np.empty((n_bags, dim), np.float32)
    elif not (
        type(out) is np.ndarray
        and out.shape == (n_bags, dim)
        and out.dtype is _F32
        and out.flags.c_contiguous
        and out.flags.writeable
    ):
        return None
    layout = np.zeros((1, COLUMNS), np.int64)
    bounds = np.empty((1, n_bags + 1), np.int64)
    if not _compiled().one_table(
        table, offsets, last, ids.shape[0], _MODES[mode], far_bytes(), layout, bounds
    ):
        return None
    kernel, want = _kernel(ids.shape[0], threads)
    if want > 1:
        _use_threads(want)
    if not kernel(layout, ids, bounds, _ONE, False, out.reshape(n_bags, 1, dim)):
        return None
    return out


assert TAIL_BYTES == 8  # the kernel reads scale at row + dim and bias right after it


def warm_up() -> float:
    """Compile the serial and parallel kernels for int64 and int32 ids, and the address
    getter for writable and read-only float32 and int8 tables (memory-mapped tables are
    read-only), or load them from numba's on-disk cache.

    Returns the seconds it took: ~16 s on a first run on a machine, ~0.2 s when cached.
    Daemons call it before reporting ready so no request pays for it.
    """
    import time

    start = time.perf_counter()
    tables: list[Table] = []
    for writable in (True, False):
        f32 = np.zeros((2, 4), np.float32)
        codes = quantize_rows(f32)
        f32.flags.writeable = codes.flags.writeable = writable
        tables += [f32, Int8RowwiseTable(codes)]
    for dtype in (np.int64, np.int32):
        for table in tables:
            pool(table, np.zeros(1, dtype), np.zeros(1, np.int64))
        if MAX_THREADS > 1:
            pool(tables[0], np.zeros(SERIAL_BELOW, dtype), np.zeros(1, np.int64), threads=2)
    bag_positions(np.zeros(1, np.int32), 0)  # a lookup's lengths, as the wire has them
    return time.perf_counter() - start
