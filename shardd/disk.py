# numba-compiled bodies: numpy scalar types are numba's, not mypy's.
# mypy: disable-error-code="no-any-return"
"""Reading table rows from the artifact's files, around the page cache, many at a time.

A cached part's misses are read with ``O_DIRECT``: the kernel neither keeps nor charges a
page for them, so the cache alone decides what stays in memory (``posix_fadvise`` would let
every read land in the page cache first, charged to the shard's cgroup until it is dropped,
and ``madvise`` needs a mapping that faults whole readahead windows in). Direct reads must be
aligned to the device's block: each read covers the aligned blocks around a run of rows
and copies the rows out into their cache slots. Where the filesystem refuses ``O_DIRECT``
(tmpfs), reads are buffered and each span is dropped from the page cache right after it is
read (``POSIX_FADV_DONTNEED``).

The loop over reads is compiled and calls ``pread`` through ctypes without the GIL, so a
lookup's misses, sorted by offset and split across ``threads`` workers, are many reads in
flight at once, with no Python per row.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from recserve.contracts.errors import DiskReadError

log = logging.getLogger(__name__)
ALIGN = 4096  # O_DIRECT alignment of buffer, offset and length (the largest logical block)
SPAN = 128 << 10  # bytes one read may cover when rows lie close together
PARALLEL_BELOW = 8  # rows read by the calling thread alone

_libc = ctypes.CDLL(None, use_errno=True)
_pread = _libc.pread
_pread.restype = ctypes.c_ssize_t
_pread.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_ssize_t]
_fadvise = _libc.posix_fadvise
_fadvise.restype = ctypes.c_int
_fadvise.argtypes = [ctypes.c_int, ctypes.c_ssize_t, ctypes.c_ssize_t, ctypes.c_int]
DONTNEED = 4


@njit(nogil=True)  # not cached: numba cannot cache calls through ctypes pointers (~0.3 s)
def _read_rows(
    fd, base, row_bytes, rows, slots, lo, hi, arena, bounce, bounce_addr, align, span, drop
):
    """Read ``rows[lo:hi]`` (sorted file rows) into ``arena[slots[i]]``; returns -1, or the
    index of the first row whose read failed."""
    i = lo
    while i < hi:
        start = base + rows[i] * row_bytes
        a = start - start % align
        end = start + row_bytes
        j = i + 1
        while j < hi:  # extend the span over following rows close enough to share it
            nxt = base + rows[j] * row_bytes + row_bytes
            if nxt - a > span or base + rows[j] * row_bytes - end > align:
                break
            end = max(end, nxt)
            j += 1
        b = end + (align - end % align) % align
        got = _pread(fd, bounce_addr, b - a, a)
        if drop:
            _fadvise(fd, a, b - a, DONTNEED)
        for k in range(i, j):
            off = base + rows[k] * row_bytes - a
            if got < off + row_bytes:
                return k
            s = slots[k]
            for c in range(row_bytes):
                arena[s, c] = bounce[off + c]
        i = j
    return -1


class TableFile:
    """One table file opened for row reads (the rows start ``base`` bytes in); ``direct``
    False: buffered reads dropped after (the fallback where ``O_DIRECT`` is refused)."""

    def __init__(self, path: Path, base: int, row_bytes: int, *, direct: bool = True) -> None:
        self.path = path
        self.base = base
        self.row_bytes = row_bytes
        if row_bytes > SPAN // 2:
            raise ValueError(f"rows of {row_bytes} bytes are wider than reads of {SPAN // 2}")
        try:
            if not direct:
                raise OSError(errno.EINVAL, "buffered reads asked for")
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            self.direct = True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.direct = False
            if direct:
                log.warning("%s: no O_DIRECT here; reads are buffered and dropped after", path)

    def read_range(self, first: int, rows: int, chunk: int = 8 << 20) -> np.ndarray:
        """Rows ``[first, first + rows)`` read whole into memory of their own (``uint8
        [rows, row_bytes]``), in aligned chunks around the page cache, as the cache reads
        its misses. A failed or short read raises ``DiskReadError``."""
        start = self.base + first * self.row_bytes
        end = start + rows * self.row_bytes
        align = ALIGN if self.direct else 1
        a = start - start % align
        b = end + (align - end % align) % align
        buf = _aligned(b - a)
        chunk = max(ALIGN, chunk - chunk % ALIGN)  # each read's buffer stays aligned
        at = a
        while at < b:
            n = min(chunk, b - at)
            try:
                got = os.preadv(self.fd, [buf[at - a : at - a + n]], at)  # type: ignore[list-item]
            except OSError as exc:
                raise DiskReadError(f"reading {self.path.name} failed: {exc.strerror}") from None
            if not self.direct:
                _fadvise(self.fd, at, n, DONTNEED)
            if got < n:  # the end of the file: short only past the rows
                if at + got < end:
                    raise DiskReadError(f"reading {self.path.name} failed: the file ends early")
                break
            at += n
        return buf[start - a : end - a].reshape(rows, self.row_bytes)

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class ReadJob:
    """Rows of one file to read into ``arena[slots]``."""

    file: TableFile
    rows: np.ndarray  # int64 file rows
    slots: np.ndarray  # int32 arena rows
    arena: np.ndarray  # uint8 [*, row_bytes]


class RowReader:
    """Reads rows into cache slots with ``threads`` workers, each with its own aligned
    bounce buffer."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="shardd-io")
        self._bounce = [_aligned(SPAN + 2 * ALIGN) for _ in range(self.threads)]

    def read_all(self, jobs: list[ReadJob]) -> float:
        """Read every job's rows, all at once: each job's rows sorted by offset, the lot
        cut into one even share per thread; returns seconds. A failed or short read raises
        ``DiskReadError`` naming the row; rows read before it stay read."""
        begin = time.perf_counter()
        jobs = [j for j in jobs if j.rows.size]
        total = sum(j.rows.size for j in jobs)
        if not total:
            return 0.0
        for j in jobs:
            order = np.argsort(j.rows, kind="stable")
            j.rows, j.slots = j.rows[order], j.slots[order]
        shares: list[list[tuple[int, int, int]]] = [[]]  # per thread: (job, lo, hi)
        per = -(-total // self.threads) if total >= PARALLEL_BELOW else total
        room = per
        for k, j in enumerate(jobs):
            lo = 0
            while lo < j.rows.size:
                if room == 0:
                    shares.append([])
                    room = per
                hi = min(j.rows.size, lo + room)
                shares[-1].append((k, lo, hi))
                room -= hi - lo
                lo = hi
        if len(shares) == 1:
            failed = self._run(jobs, shares[0], 0)
        else:
            futures = [self.pool.submit(self._run, jobs, sh, t) for t, sh in enumerate(shares)]
            found = [f.result() for f in futures]
            failed = next((f for f in found if f is not None), None)
        if failed is not None:
            job, at = jobs[failed[0]], failed[1]
            row = int(job.rows[at])
            raise DiskReadError(
                f"reading row {row} of {job.file.path.name} failed: {_why(job.file, row)}"
            )
        return time.perf_counter() - begin

    def _run(
        self, jobs: list[ReadJob], share: list[tuple[int, int, int]], t: int
    ) -> tuple[int, int] | None:
        bounce = self._bounce[t]
        for k, lo, hi in share:
            j = jobs[k]
            bad = _read_rows(
                j.file.fd, j.file.base, j.file.row_bytes, j.rows, j.slots, lo, hi, j.arena,
                bounce, bounce.ctypes.data, ALIGN if j.file.direct else 1, SPAN,
                not j.file.direct,
            )  # fmt: skip
            if bad >= 0:
                return k, int(bad)
        return None

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _aligned(n: int) -> np.ndarray:
    raw = np.empty(n + ALIGN, np.uint8)
    skip = (-raw.ctypes.data) % ALIGN
    return raw[skip : skip + n]


def _why(file: TableFile, row: int) -> str:
    """Redo one read in Python for its errno (the compiled loop only sees -1)."""
    start = file.base + row * file.row_bytes
    try:
        with open(file.path, "rb", buffering=0) as f:
            f.seek(start)
            got = f.read(file.row_bytes)
    except OSError as exc:
        return exc.strerror or str(exc)
    return "the file ends before it" if len(got) < file.row_bytes else "the read failed"
