"""The row cache of a larger-than-memory shard: hot rows in memory, the rest read from disk.

``--cache-bytes`` is split over the shard's parts by their expected hits
(``recserve.planning.hits``: each part's Zipf exponent and traffic from the manifest). A
part the split gives all its rows is read whole at start and served resident, like a
preloaded part (no misses, no bookkeeping; see ``split_budget``); every other part gets an
arena of whole rows in the table's stored dtype (int8 rows are 4x as many per
byte as fp32) and the compiled W-TinyLFU bookkeeping of ``kernels.rowcache``, both inside
the budget. A lookup's ids of a cached part are mapped to arena slots in one compiled pass,
its misses (each row once) are read from the table file around the page cache
(``shardd.disk``) straight into their slots, and the pooling kernel then reads the arena
with the mapped ids: hits are never copied. Everything runs on the worker, never the loop.

One lock guards the bookkeeping and the reads of misses; pooling runs outside it with the
lookup's slots pinned. A lookup with more distinct rows of a part than the part's unpinned
slots is served around the cache for that part: its rows are read into a buffer of its own.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import kernels
from kernels import Int8RowwiseTable, Table
from kernels import rowcache as rc
from recserve.contracts.errors import ConfigError
from recserve.contracts.manifest import TableSpec
from recserve.contracts.units import format_size
from recserve.planning.hits import DEFAULT_ZIPF, SLOT_BYTES, CachedPart, split
from shardd.disk import ReadJob, RowReader, TableFile

log = logging.getLogger(__name__)


@dataclass
class PartCache:
    spec: TableSpec
    row_start: int
    row_end: int
    file: TableFile
    slots: int
    arena: np.ndarray  # uint8 [slots, row_bytes]
    state: rc.CacheState

    @property
    def key(self) -> str:
        return f"{self.spec.name}@{self.row_start}"

    @property
    def nbytes(self) -> int:
        return int(self.arena.nbytes) + rc.state_bytes(self.slots)

    def table(self) -> Table:
        """The arena as the kernel's table: slot ``s`` is row ``s``."""
        return _as_table(self.spec, self.arena)

    def occupied(self) -> int:
        return int(self.slots - self.state.meta[rc.FREE_TOP])


@dataclass
class Resident:
    """A part the budget holds whole: its rows, read at start (and after each compaction)."""

    spec: TableSpec
    row_start: int
    row_end: int
    rows: np.ndarray  # uint8 [row_end - row_start, row_bytes]


@dataclass
class Fetched:
    """One lookup's use of the cache, until ``CacheTier.release``."""

    pins: list[tuple[PartCache, np.ndarray]] = field(default_factory=list)
    bypass: dict[int, Table] = field(default_factory=dict)  # lookup part -> its own rows
    hits: int = 0  # ids served without reading their row for this lookup
    misses: int = 0  # rows read from disk into the cache
    bypassed: int = 0  # rows read from disk around the cache
    evictions: int = 0
    disk_s: float = 0.0
    gen: int = 0  # the generation of the files the rows came from (``CacheTier.gen``)
    published: Any = None  # that generation's versions (set by the store with it)


class CacheTier:
    def __init__(
        self,
        parts: list[tuple[TableSpec, int, int, Path, int]],
        budget: int,
        io_threads: int,
    ) -> None:
        """``parts``: (table, row_start, row_end, table file, offset of row 0 in it)."""
        self.budget = budget
        self.lock = threading.Lock()
        self.epoch = 0
        self.gen = 0  # bumped by the store when compaction swaps a part's file
        self.published: Any = None
        self.reader = RowReader(io_threads)
        whole, sizes = split_budget([(spec, start, end) for spec, start, end, _, _ in parts],
                                    budget)  # fmt: skip
        self.parts: list[PartCache] = []
        self.by_index: list[PartCache | None] = []  # None: the part is resident
        self.resident: dict[int, Resident] = {}  # by part index
        begin = time.perf_counter()
        for i, (spec, start, end, path, base) in enumerate(parts):
            if whole[i]:
                self.resident[i] = Resident(spec, start, end, _read_whole(spec, start, end,
                                                                          path, base))  # fmt: skip
                self.by_index.append(None)
                continue
            slots = sizes[i]
            pc = PartCache(
                spec,
                start,
                end,
                TableFile(path, base, spec.row_bytes),
                slots,
                np.zeros((slots, spec.row_bytes), np.uint8),
                rc.new_state(slots),
            )
            self.parts.append(pc)
            self.by_index.append(pc)
        if self.resident:
            log.info("read %d parts of %s whole into the cache's budget in %.2f s",
                     len(self.resident), format_size(self.resident_bytes()),
                     time.perf_counter() - begin)  # fmt: skip

    def table(self, index: int) -> Table:
        """Part ``index``'s rows as the kernel reads them: a resident part's own rows
        (row ``i`` is the part's ``i``), or a cached part's arena (row ``s`` is slot ``s``)."""
        pc = self.by_index[index]
        if pc is None:
            r = self.resident[index]
            return _as_table(r.spec, r.rows)
        return pc.table()

    def reload(self, index: int, path: Path, base: int) -> Table:
        """A resident part's rows read again from its new file (after compaction). Lookups on
        the old generation keep the old rows until they finish: meanwhile the part is held
        twice, beyond the budget by its size (README, online updates)."""
        r = self.resident[index]
        r.rows = _read_whole(r.spec, r.row_start, r.row_end, path, base)
        return self.table(index)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts) + self.resident_bytes()

    def resident_bytes(self) -> int:
        return sum(r.rows.nbytes for r in self.resident.values())

    def rows_cached(self) -> int:
        resident = sum(r.row_end - r.row_start for r in self.resident.values())
        return sum(p.occupied() for p in self.parts) + resident

    def bytes_cached(self) -> int:
        return sum(p.occupied() * p.spec.row_bytes for p in self.parts) + self.resident_bytes()

    @property
    def direct(self) -> bool:
        return all(p.file.direct for p in self.parts)

    def fetch(
        self,
        ids: np.ndarray,
        mapped: np.ndarray,
        spans: list[tuple[int, PartCache, int, int]],
    ) -> Fetched:
        """Map the ids of cached parts (``spans``: lookup part, cache, first position, count)
        into ``mapped`` and have every row they need in memory: each part's slots resolved,
        then every part's misses read at once. The caller pools, then calls ``release``. An
        id outside its part's rows raises ``kernels.IdOutOfRangeError`` (its position in
        ``ids``) with nothing left changed."""
        got = Fetched()
        with self.lock:
            got.gen, got.published = self.gen, self.published
            self.epoch += 1
            jobs: list[ReadJob] = []
            misses: list[tuple[PartCache, np.ndarray]] = []
            try:
                for i, pc, lo, n in spans:
                    self._resolve(got, jobs, misses, ids, mapped, (i, pc, lo, n))
                got.disk_s += self.reader.read_all(jobs)
            except BaseException:
                for pc, rows in misses:  # slots that never got their rows
                    st = pc.state
                    rc.forget(st.keys, st.vals, st.slot_id, st.ref, rows)
                self._unpin(got)
                raise
        return got

    def _resolve(
        self,
        got: Fetched,
        jobs: list[ReadJob],
        misses: list[tuple[PartCache, np.ndarray]],
        ids: np.ndarray,
        mapped: np.ndarray,
        span: tuple[int, PartCache, int, int],
    ) -> None:
        i, pc, lo, n = span
        st = pc.state
        status = rc.OVERFLOW
        reads = 0
        if pc.slots:
            rows = np.empty(n, np.int64)
            slots = np.empty(n, np.int32)
            pinned = np.empty(n, np.int32)
            counts = np.zeros(4, np.int64)
            before = int(st.meta[rc.EVICTIONS])
            status = rc.resolve(
                ids, lo, lo + n, pc.row_start, pc.row_end - pc.row_start, mapped, self.epoch,
                st.keys, st.vals, st.slot_id, st.ref, st.seg, st.pins, st.stamp, st.window,
                st.free, st.sketch, st.meta, rows, slots, pinned, counts,
            )  # fmt: skip
            if status >= 0:  # nothing of this part changed; earlier parts are undone by fetch
                rows_ = pc.row_end - pc.row_start
                raise kernels.IdOutOfRangeError(status, int(ids[status]), rows_, pc.row_start)
            got.pins.append((pc, pinned[: counts[2]]))
            got.evictions += int(st.meta[rc.EVICTIONS]) - before
            n_miss = int(counts[1])
            got.misses += n_miss
            reads += n_miss
            misses.append((pc, rows[:n_miss]))
            jobs.append(ReadJob(pc.file, rows[:n_miss] + pc.row_start, slots[:n_miss], pc.arena))
        if status == rc.OVERFLOW:
            # Too many distinct rows for the slots not pinned: this part around the cache.
            unique, inverse = np.unique(ids[lo : lo + n], return_inverse=True)
            own = np.empty((unique.size, pc.spec.row_bytes), np.uint8)
            slots = np.arange(unique.size, dtype=np.int32)
            jobs.append(ReadJob(pc.file, unique.astype(np.int64), slots, own))
            mapped[lo : lo + n] = inverse
            got.bypass[i] = _as_table(pc.spec, own)
            got.bypassed += int(unique.size)
            reads += int(unique.size)
        got.hits += max(0, n - reads)  # (an overflowing part may read a row twice)

    def swap_file(self, pc: PartCache, file: TableFile, rows: np.ndarray) -> None:
        """Read ``pc``'s misses from ``file`` from now on, and drop its local ``rows`` (which
        differ there) from the cache; lookups under way keep the slots they pinned. The
        caller holds ``lock``."""
        st = pc.state
        rc.forget(st.keys, st.vals, st.slot_id, st.ref, np.ascontiguousarray(rows, np.int64))
        old, pc.file = pc.file, file
        old.close()

    def release(self, got: Fetched) -> None:
        with self.lock:
            self._unpin(got)

    @staticmethod
    def _unpin(got: Fetched) -> None:
        for pc, pinned in got.pins:
            st = pc.state
            rc.unpin(st.pins, pinned, pinned.size, st.keys, st.vals, st.slot_id, st.seg,
                     st.free, st.meta)  # fmt: skip
        got.pins.clear()

    # --- warm-up traces --------------------------------------------------------------------

    def save_trace(self, path: Path, digest: str) -> int:
        """Write the cached rows, hottest first, with their sketch counts (atomically);
        returns how many."""
        arrays: dict[str, np.ndarray] = {"model_digest": np.array(digest)}
        total = 0
        snapshot = []
        with self.lock:  # copies only: lookups wait for no sort and no disk
            for pc in self.parts:
                st = pc.state
                est = np.zeros(pc.slots, np.int64)
                rc.estimates(st.sketch, st.slot_id, est)
                snapshot.append((pc, st.slot_id.copy(), st.ref.copy(), est))
        for pc, slot_id, ref, est in snapshot:
            used = np.flatnonzero(slot_id != rc.EMPTY)
            order = used[np.lexsort((-ref[used].astype(np.int64), -est[used]))]
            arrays[f"{pc.key}.ids"] = slot_id[order] + pc.row_start
            arrays[f"{pc.key}.counts"] = est[order]
            total += order.size
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return total

    def warm(self, path: Path, digest: str) -> tuple[int, float]:
        """Load the rows a trace lists, hottest first, until the parts are full; returns
        (rows, seconds). A trace of another model is ignored with a warning."""
        begin = time.perf_counter()
        try:
            trace = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--warm-from {path}: not a readable trace ({exc})") from None
        with trace:
            if str(trace.get("model_digest", "")) != digest:
                log.warning("%s is a trace of another model; starting cold", path)
                return 0, 0.0
            total = 0
            jobs = []
            with self.lock:
                for pc in self.parts:
                    if f"{pc.key}.ids" not in trace or not pc.slots:
                        continue
                    ids = np.asarray(trace[f"{pc.key}.ids"], np.int64)
                    counts = np.asarray(trace[f"{pc.key}.counts"], np.int64)
                    keep = (ids >= pc.row_start) & (ids < pc.row_end)
                    rows = ids[keep] - pc.row_start
                    st = pc.state
                    slots = np.empty(pc.slots, np.int32)
                    placed = rc.admit(
                        rows, counts[keep], st.keys, st.vals, st.slot_id, st.ref, st.seg,
                        st.window, st.free, st.sketch, st.meta, slots,
                    )  # fmt: skip
                    rows = st.slot_id[slots[:placed]] + pc.row_start
                    jobs.append(ReadJob(pc.file, rows, slots[:placed], pc.arena))
                    total += placed
                self.reader.read_all(jobs)  # a failed read here stops the start (exit 2)
        return total, time.perf_counter() - begin

    def compile(self) -> None:
        """Compile (or load from numba's cache) every function a lookup uses, on a small
        cache over a file of its own, so the first lookup does not pay for it."""
        spec = TableSpec("compile", 64, 4)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rows"
            path.write_bytes(bytes(spec.nbytes))
            pc = PartCache(spec, 0, spec.rows, TableFile(path, 0, spec.row_bytes), 2,
                           np.zeros((2, spec.row_bytes), np.uint8), rc.new_state(2))  # fmt: skip
            try:
                for dtype in (np.int64, np.int32):
                    for ids in (np.array([0, 1, 1], dtype), np.arange(40, dtype=dtype)):
                        self.release(self.fetch(ids, ids.copy(), [(0, pc, 0, ids.size)]))
                st = pc.state
                rc.estimates(st.sketch, st.slot_id, np.zeros(2, np.int64))
                rc.forget(st.keys, st.vals, st.slot_id, st.ref, np.zeros(1, np.int64))
                rc.admit(np.zeros(1, np.int64), np.ones(1, np.int64), st.keys, st.vals,
                         st.slot_id, st.ref, st.seg, st.window, st.free, st.sketch, st.meta,
                         np.zeros(2, np.int32))  # fmt: skip
            finally:
                pc.file.close()

    def close(self) -> None:
        self.reader.close()
        for pc in self.parts:
            pc.file.close()


def split_budget(
    parts: list[tuple[TableSpec, int, int]], budget: int
) -> tuple[list[bool], list[int]]:
    """Which parts (table, row_start, row_end) the budget holds whole, and slots for the
    others. A part the split by expected hits (``slots_for``) gives all its rows is read
    whole at start and served as a resident part: no misses, no map, and no bookkeeping
    (its rows cost only their bytes, which leaves the other parts more); the rest are split
    again until no further part fits whole, or the rest of the budget holds them all."""
    rows = [end - start for _, start, end in parts]
    raw = [n * spec.row_bytes for (spec, _, _), n in zip(parts, rows, strict=True)]
    whole = [False] * len(parts)
    while True:
        rest = budget - sum(b for b, w in zip(raw, whole, strict=True) if w)
        others = [i for i, w in enumerate(whole) if not w]
        if sum(raw[i] for i in others) <= rest:
            return [True] * len(parts), rows  # the rest holds every remaining part
        sizes = slots_for([parts[i] for i in others], rest) if rest > 0 else [0] * len(others)
        fits = [i for i, n in zip(others, sizes, strict=True) if n >= rows[i] > 0]
        if not fits:
            slots = [n if w else 0 for n, w in zip(rows, whole, strict=True)]
            for i, n in zip(others, sizes, strict=True):
                slots[i] = n
            return whole, slots
        for i in fits:
            whole[i] = True


def slots_for(parts: list[tuple[TableSpec, int, int]], budget: int) -> list[int]:
    """Slots per part (table, row_start, row_end) for ``budget`` bytes: split by expected
    hits (``recserve.planning.hits``) after each part's fixed bookkeeping, each share then
    fitted exactly (``SLOT_BYTES`` bounds the bookkeeping per slot, so a part gets at least
    the rows the split gave it)."""
    fixed = rc.state_bytes(1)
    wants = [
        CachedPart(
            rows=end - start,
            zipf=spec.stats.zipf if spec.stats.zipf is not None else DEFAULT_ZIPF,
            traffic=(spec.stats.pooling_factor or 1.0)
            * max(1, len(spec.features))
            * (end - start)
            / max(1, spec.rows),
            row_cost=spec.row_bytes + SLOT_BYTES,
        )
        for spec, start, end in parts
    ]
    rows = split(wants, max(0, budget - fixed * len(parts)))
    return [
        fit_slots(spec.row_bytes, int(n * want.row_cost) + fixed if n else 0, end - start)
        for (spec, start, end), want, n in zip(parts, wants, rows, strict=True)
    ]


def fit_slots(row_bytes: int, budget: int, rows: int) -> int:
    """The most slots (at most ``rows``) whose rows and bookkeeping fit ``budget`` bytes."""
    lo, hi = 0, max(0, min(rows, budget // max(1, row_bytes)))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid * row_bytes + rc.state_bytes(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _read_whole(spec: TableSpec, start: int, end: int, path: Path, base: int) -> np.ndarray:
    file = TableFile(path, base, spec.row_bytes)
    try:
        return file.read_range(start, end - start)
    finally:
        file.close()


def _as_table(spec: TableSpec, data: np.ndarray) -> Table:
    if spec.dtype == "int8":
        return Int8RowwiseTable(data)
    return data.view(np.float16 if spec.dtype == "fp16" else np.float32)
