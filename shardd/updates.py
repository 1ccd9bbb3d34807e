"""Online updates on a shard: staged, committed versions of updated rows, durable in a log.

A version is, per part, the rows updated up to it as corrections over the part's file:
a ``Patch``: a few ``Overlay`` s (sorted global ids and per row a difference), summed, applied
by ``kernels.overlay`` after pooling. The newest versions have two levels: a large one
shared by many versions and a small one each stage copies and extends; the small one is
folded into the large one once it reaches a quarter of it, so a stage costs what it adds,
not the whole history. A version is built in full at ``stage`` and never changed after:
``commit`` makes it the newest by publishing a new dict of versions, so a lookup that took
the previous version keeps reading it, and no row is ever read half-written. The last
``VERSIONS_KEPT`` versions stay readable: the gateway names the version each request reads,
so a request never mixes versions across shards while a commit reaches them one by one.

New rows are stored as the table stores them: int8 tables quantize each row as ``recserve
quantize`` does (``kernels.quantize_rows``), fp16 tables round to fp16, and the difference is
taken from those values.

Durability: ``stage`` returns only once the update is appended to ``updates.log`` in the
state directory and fsync'ed; ``commit`` and ``abort`` append their record the same way. At
start the log is replayed (a torn record at its end, from a crash mid-append, is cut off), so
a shard killed at any moment comes back with exactly the versions it acknowledged; a version
staged but neither committed nor aborted stays staged until the coordinator decides.
Compaction (``shardd.compaction``, driven by the store) folds the newest version's rows of
the most-updated parts into new part files; the versions still readable are then rebased on
the new files by one more level, the negated corrections the files absorbed. The other
parts' corrections stay in memory and are *carried*: a ``carry`` record of them at the
compacted version is appended to the log before ``base.json`` names that version, and the
log is then replaced by that record alone, so replay starts from the files plus the carried
corrections (a carry record of another version than ``base.json``'s, left by a compaction
that did not finish, is passed over: the records before it still hold its versions).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

import kernels
from recserve.contracts.errors import (
    BadRequest,
    IdOutOfRange,
    RecserveError,
    UnknownTable,
    VersionUnavailable,
)
from recserve.rpc.wire import VERSIONS_KEPT, StagePart
from shardd.durable import replace_file, write_all
from shardd.logrecord import HEAD, MAGIC, pieces

log = logging.getLogger(__name__)
FOLD_MIN = 4096  # rows the small level may hold before it is folded into the large one


@dataclass(frozen=True)
class Overlay:
    keys: np.ndarray  # int64 global row ids, sorted
    deltas: np.ndarray  # float32 [len(keys), dim]: new value minus the file's

    @property
    def size(self) -> int:
        return int(self.keys.size)


@dataclass(frozen=True)
class Patch:
    """A version's corrections of one part: levels, summed ((large, small) for the newest
    versions), and a bitmap of the part's rows any of them holds, so a lookup's id that is
    not updated is passed over without a search."""

    levels: tuple[Overlay, ...]
    bits: np.ndarray  # uint8 [(rows + 7) // 8]: bit r of local row r

    @property
    def size(self) -> int:
        return sum(lv.size for lv in self.levels)


class UpdateLog:
    """Append-only records, each ``magic, length, crc32`` then a msgpack payload
    (``shardd.logrecord``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "ab", buffering=0)  # noqa: SIM115 - kept for the daemon's life
        self.bytes = path.stat().st_size

    def reset(self, first: dict[str, Any] | None = None) -> None:
        """Replace the log by ``first`` alone (none: empty it), its other records being in
        compacted files now; a crash leaves the old log or the new one whole."""
        try:
            replace_file(self.path, pieces(first) if first is not None else b"")
        finally:  # appends go to whichever file the name holds now
            self.file.close()
            self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - as in __init__
            self.bytes = self.path.stat().st_size

    def append(self, record: dict[str, Any]) -> None:
        fd, start = self.file.fileno(), self.bytes
        try:
            self.bytes += write_all(fd, pieces(record))
            os.fsync(fd)
        except OSError:
            # A record cut short (a full disk) must not stay in front of the next one:
            # replay stops at the first damaged record.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            self.bytes = start
            raise

    def records(self, repair: bool = True) -> list[dict[str, Any]]:
        """Every whole record; with ``repair`` (at start) a torn or damaged tail is cut from
        the file."""
        data = self.path.read_bytes()
        out, at = [], 0
        while at + HEAD.size <= len(data):
            magic, length, crc = HEAD.unpack_from(data, at)
            payload = data[at + HEAD.size : at + HEAD.size + length]
            if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
                break
            out.append(msgpack.unpackb(payload, raw=False))
            at += HEAD.size + length
        if at != len(data) and repair:
            log.warning(
                "%s: cutting %d bytes of a torn record at its end", self.path, len(data) - at
            )
            self.file.truncate(at)
            os.fsync(self.file.fileno())
            self.bytes = at
        return out

    def close(self) -> None:
        self.file.close()


class Versions:
    """The versions of one shard's parts (the store's ``Part`` s, by slot).

    ``state`` is ``(generation, committed)``: the committed versions' ``Patch`` es by slot,
    over the part files of that generation; both are replaced, never changed, so a reader
    takes one consistent pair (the store bumps the generation when compaction swaps files).
    """

    def __init__(
        self,
        parts: list[Any],
        state_dir: Path | None,
        *,
        base_version: int = 0,
        snapshot: Callable[[], list[StagePart]] | None = None,
        dense: tuple[int, bytes] | None = None,
    ) -> None:
        self.parts = parts
        self.index = {(p.spec.name, p.row_start): i for i, p in enumerate(parts)}
        self.base_version = base_version  # what the compacted files hold
        self.snapshot = snapshot  # every row changed up to base_version, from those files
        # Corrections at base_version the files do not hold (parts a compaction left), by slot.
        self.carried: dict[int, Overlay] = {}
        self.state: tuple[int, dict[int, dict[int, Patch]]] = (0, {base_version: {}})
        self.current = base_version
        self.staged: tuple[int, dict[int, Patch]] | None = None
        self.staged_dense: bytes | None = None
        # The newest committed dense weights (version, .npz bytes), kept for the gateways.
        self.dense: tuple[int, bytes] | None = dense
        self.rows_updated = 0
        self.compactions = 0  # by this process
        self.compacted_bytes = 0  # part files written by this process's compactions
        self.lock = threading.Lock()  # stage/commit/abort/compaction, one at a time
        self.log = UpdateLog(state_dir / "updates.log") if state_dir is not None else None
        if self.log is not None:
            self._replay(self.log.records())

    @property
    def enabled(self) -> bool:
        return self.log is not None

    @property
    def committed(self) -> dict[int, dict[int, Patch]]:
        return self.state[1]

    def stage(
        self,
        version: int,
        parts: list[StagePart],
        *,
        dense: bytes | None = None,
        jump: bool = False,
    ) -> None:
        """Check, build and durably log ``version`` (with ``dense``: the model's new dense
        weights, kept as they are); nothing changes on any error. ``jump``: ``version`` may
        skip versions (a peer's compacted snapshot, when catching up)."""
        with self.lock:
            self._check_stage(version, jump)
            built = self._build(parts)
            record = {"op": "stage", "version": version, "parts": _pack(parts)}
            if dense is not None:
                record["dense"] = dense
            self._append(record)
            self.staged, self.staged_dense = (version, built), dense

    def commit(self, version: int) -> None:
        with self.lock:
            if self.current >= version and version in self.committed:
                return  # a retried commit
            if self.staged is None or self.staged[0] != version:
                raise BadRequest(f"version {version} is not staged here", field="version")
            self._append({"op": "commit", "version": version})
            self._commit(version)

    def abort(self, version: int) -> None:
        with self.lock:
            if self.staged is not None and self.staged[0] == version:
                self._append({"op": "abort", "version": version})
                self.staged, self.staged_dense = None, None

    def adopt_dense(self, version: int, dense: bytes) -> bool:
        """Keep a peer's newer dense weights (a replica catching up), logged; whether they
        were newer."""
        with self.lock:
            if (self.dense is not None and self.dense[0] >= version) or version > self.current:
                return False
            self._append({"op": "dense", "version": version, "dense": dense})
            self.dense = (version, dense)
            return True

    def history(self, since: int) -> list[tuple[int, list[StagePart]]]:
        """The committed versions after ``since``, with their rows as staged (from the log),
        for a replica catching up; versions already compacted come as one snapshot of
        every row changed up to the compacted version."""
        with self.lock:
            if self.log is None:
                raise BadRequest("this shard keeps no update log", field="op")
            out = []
            if since < self.base_version and self.snapshot is not None:
                out.append((self.base_version, self.snapshot()))
            staged: dict[int, list[StagePart]] = {}
            for r in self.log.records(repair=False):
                if r["op"] == "stage":
                    staged[r["version"]] = _unpack(r["parts"])
                elif r["op"] == "commit" and r["version"] > since and r["version"] in staged:
                    out.append((r["version"], staged.pop(r["version"])))
            return out

    def catch_up(self, history: list[tuple[int, list[StagePart]]]) -> int:
        """Stage and commit (logging both) every version that follows this shard's."""
        applied = 0
        for version, parts in history:
            if version <= self.current:
                continue
            if self.staged is not None and self.staged[0] != version:
                self.abort(self.staged[0])  # a version the others never committed
            if self.staged is None:
                self.stage(version, parts, jump=True)
            self.commit(version)
            applied += 1
        return applied

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.current,
            "staged": self.staged[0] if self.staged else None,
            "oldest": min(self.committed),
            "compacted": self.base_version,
            "compactions": self.compactions,
            "compacted_bytes": self.compacted_bytes,
            "dense": self.dense[0] if self.dense else None,
            "rows_updated": self.rows_updated,
            "log_bytes": self.log.bytes if self.log else 0,
        }

    # --- compaction (the store holds ``lock`` throughout) ---------------------------------

    def flat(self, slot: int) -> Overlay:
        """The newest version's corrections of ``slot`` as one level."""
        patch = self.committed[self.current].get(slot)
        return _flatten(patch.levels) if patch else _EMPTY

    def rebased(self, flats: dict[int, Overlay]) -> dict[int, dict[int, Patch]]:
        """The committed versions over new files holding the newest version's rows of the
        slots of ``flats`` (their corrections there): the newest has none left, the older
        ones subtract what the files absorbed."""
        out = {}
        negated = {
            s: Patch((Overlay(f.keys, -f.deltas),), self.committed[self.current][s].bits)
            for s, f in flats.items()
        }
        for v, patches in self.committed.items():
            mine = dict(patches)
            for slot, neg in negated.items():
                if v == self.current:
                    mine.pop(slot, None)
                elif (p := mine.get(slot)) is not None:
                    mine[slot] = Patch((*p.levels, *neg.levels), p.bits | neg.bits)
                else:
                    mine[slot] = neg
            out[v] = mine
        return out

    def carry(self, version: int, carried: dict[int, Overlay]) -> dict[str, Any] | None:
        """Log the corrections of ``version`` a compaction leaves in memory (``carried``, by
        slot), before ``base.json`` names ``version``; returns the record (None: nothing
        carried)."""
        if not carried:
            return None
        record = {"op": "carry", "version": version, "parts": _pack([
            StagePart(self.parts[s].spec.name, self.parts[s].row_start, o.keys, o.deltas)
            for s, o in sorted(carried.items())
        ])}  # fmt: skip
        self._append(record)
        return record

    def compacted(
        self,
        version: int,
        carried: dict[int, Overlay],
        record: dict[str, Any] | None,
        written: int,
    ) -> None:
        """``base.json`` names ``version`` now (and ``state`` is rebased on its files, of
        ``written`` bytes): the log becomes ``record`` alone, the corrections ``carried``
        over the files."""
        assert self.log is not None and version == self.current and self.staged is None
        try:
            self.log.reset(record)
        except OSError as exc:  # the log keeps its records, the carried ones at its end
            log.warning("could not shorten the update log after compaction: %s", exc)
        # Then what ``describe`` reports (read on the loop, unlocked): once it names the
        # version compacted, the log is already short.
        self.carried = carried
        self.rows_updated = sum(o.size for o in carried.values())
        self.compactions += 1
        self.compacted_bytes += written
        self.base_version = version

    # --- internals --------------------------------------------------------------------------

    def _check_stage(self, version: int, jump: bool) -> None:
        if self.log is None:
            raise BadRequest("this shard takes no updates: start it with --state-dir", field="op")
        if self.staged is not None:
            raise BadRequest(
                f"version {self.staged[0]} is staged here; commit or abort it first",
                field="version",
            )
        if version != self.current + 1 and not (jump and version > self.current):
            raise BadRequest(
                f"version {version} does not follow this shard's {self.current}", field="version"
            )

    def _build(self, parts: list[StagePart]) -> dict[int, Patch]:
        out = dict(self.committed[self.current])
        for i, sp in enumerate(parts):
            slot = self.index.get((sp.table, sp.row_start))
            if slot is None:
                raise unknown_part(sp.table, sp.row_start, i)
            part = self.parts[slot]
            order = np.argsort(sp.ids, kind="stable")  # sorted: merges and reads in order
            ids = np.asarray(sp.ids, np.int64)[order]
            if ids.size and (int(ids[0]) < part.row_start or int(ids[-1]) >= part.row_end):
                bad = int(ids[(ids < part.row_start) | (ids >= part.row_end)][0])
                raise IdOutOfRange(
                    f"id {bad} of table {sp.table} is outside [{part.row_start}, {part.row_end})",
                    field=f"parts[{i}].ids",
                )
            if sp.rows.shape != (ids.size, part.spec.dim):
                raise BadRequest(
                    f"rows of table {sp.table} must be [{ids.size}, {part.spec.dim}]",
                    field=f"parts[{i}].rows",
                )
            if not np.isfinite(sp.rows).all():
                raise BadRequest(
                    f"rows of table {sp.table} hold NaN or Inf", field=f"parts[{i}].rows"
                )
            if (ids[1:] == ids[:-1]).any():
                raise BadRequest(f"an id of table {sp.table} repeats", field=f"parts[{i}].ids")
            prev = out.get(slot)
            large, small = prev.levels if prev else (_EMPTY, _EMPTY)
            rows = part.row_end - part.row_start
            bits = prev.bits.copy() if prev else np.zeros((rows + 7) // 8, np.uint8)
            set_bits(bits, ids - part.row_start)
            # Relative to the file and the large level (a row's small entry is replaced, not
            # added to: its error does not grow with the times it was updated).
            below = base_rows(part, ids).astype(np.float64) + corrections(
                (large,), ids, part.spec.dim
            )
            small = _put(small, ids, _stored(part.spec.dtype, sp.rows[order]) - below)
            if small.size > max(FOLD_MIN, large.size // 4):
                large, small = _add(large, small.keys, small.deltas), _EMPTY
            out[slot] = Patch((large, small), bits)
        return out

    def _commit(self, version: int) -> None:
        assert self.staged is not None
        built = self.staged[1]
        self.rows_updated = sum(p.size for p in built.values())
        gen, old = self.state
        committed = {v: old[v] for v in sorted(old)[-(VERSIONS_KEPT - 1) :]}
        committed[version] = built
        self.state = (gen, committed)  # readers of older versions keep theirs
        self.current = version
        if self.staged_dense is not None:
            self.dense = (version, self.staged_dense)
        self.staged, self.staged_dense = None, None

    def _carry(self, parts: list[StagePart]) -> None:
        """The corrections a compaction carried over its files, as ``base_version``."""
        patches: dict[int, Patch] = {}
        for i, sp in enumerate(parts):
            slot = self.index.get((sp.table, sp.row_start))
            if slot is None:
                raise unknown_part(sp.table, sp.row_start, i)
            part = self.parts[slot]
            bits = np.zeros((part.row_end - part.row_start + 7) // 8, np.uint8)
            keys = np.array(sp.ids, np.int64)
            set_bits(bits, keys - part.row_start)
            self.carried[slot] = flat = Overlay(keys, np.array(sp.rows, np.float32))
            patches[slot] = Patch((flat, _EMPTY), bits)
        self.state = (self.state[0], {self.base_version: patches})
        self.current = self.base_version
        self.rows_updated = sum(o.size for o in self.carried.values())

    def _append(self, record: dict[str, Any]) -> None:
        assert self.log is not None
        try:
            self.log.append(record)
        except OSError as exc:
            raise RecserveError(f"writing the update log failed: {exc}") from exc

    def _replay(self, records: list[dict[str, Any]]) -> None:
        records = [r for r in records if r["version"] > self.base_version
                   or (r["op"] == "carry" and r["version"] == self.base_version)]  # fmt: skip
        for r in records:
            if r["op"] == "carry":
                if r["version"] == self.base_version:
                    self._carry(_unpack(r["parts"]))
            elif r["op"] == "stage":
                self.staged = (r["version"], self._build(_unpack(r["parts"])))
                self.staged_dense = r.get("dense")
            elif r["op"] == "commit" and self.staged and self.staged[0] == r["version"]:
                self._commit(r["version"])
            elif r["op"] == "abort":
                self.staged, self.staged_dense = None, None
            elif r["op"] == "dense":
                self.dense = (r["version"], r["dense"])
        if records:
            log.info(
                "replayed %d update records: version %d%s",
                len(records),
                self.current,
                f", version {self.staged[0]} staged" if self.staged else "",
            )


def patches_at(committed: dict[int, dict[int, Patch]], version: int | None) -> dict[int, Patch]:
    """The patches of ``version`` (None: the newest) by slot among ``committed`` versions;
    raises ``VersionUnavailable``."""
    if version is None:
        return committed[max(committed)]
    found = committed.get(version)
    if found is None:
        raise VersionUnavailable(
            f"this shard holds versions {min(committed)}..{max(committed)}, not {version}",
            field="version",
        )
    return found


def unknown_part(table: str, row_start: int, i: int) -> UnknownTable:
    return UnknownTable(
        f"this shard serves no part of table {table!r} starting at row {row_start}",
        field=f"parts[{i}]",
    )


def _stored(dtype: str, rows: np.ndarray) -> np.ndarray:
    """``rows`` as the table would store them, back in float32."""
    if dtype == "int8":
        return kernels.Int8RowwiseTable(kernels.quantize_rows(rows)).dequantize()
    if dtype == "fp16":
        return rows.astype(np.float16).astype(np.float32)
    return np.asarray(rows, np.float32)


def base_rows(part: Any, ids: np.ndarray) -> np.ndarray:
    """The file's values of global rows ``ids`` of ``part``, float32."""
    local = ids - part.row_start
    base = part.base
    if isinstance(base, kernels.Int8RowwiseTable):
        return base.dequantize(local)
    return np.asarray(base[local], np.float32)


_EMPTY = Overlay(np.zeros(0, np.int64), np.zeros((0, 0), np.float32))


def corrections(levels: tuple[Overlay, ...], ids: np.ndarray, dim: int) -> np.ndarray:
    """The summed corrections of ``levels`` at rows ``ids``, float32 ``[n, dim]``."""
    out = np.zeros((ids.size, dim), np.float32)
    for lv in levels:
        if lv.size:
            pos = np.minimum(np.searchsorted(lv.keys, ids), lv.size - 1)
            found = lv.keys[pos] == ids
            out[found] += lv.deltas[pos[found]]
    return out


def _add(old: Overlay, ids: np.ndarray, deltas: np.ndarray) -> Overlay:
    """A new level: ``old`` plus ``deltas`` at ``ids`` (unique), added where both hold a
    row."""
    deltas = np.asarray(deltas, np.float32)
    if old.size == 0:
        order = np.argsort(ids, kind="stable")
        return Overlay(np.ascontiguousarray(ids[order]), np.ascontiguousarray(deltas[order]))
    pos = np.minimum(np.searchsorted(old.keys, ids), old.size - 1)
    found = old.keys[pos] == ids
    summed = old.deltas.copy()
    summed[pos[found]] += deltas[found]
    if found.all():
        return Overlay(old.keys, summed)
    keys = np.concatenate([old.keys, ids[~found]])
    order = np.argsort(keys, kind="stable")
    return Overlay(
        np.ascontiguousarray(keys[order]),
        np.ascontiguousarray(np.concatenate([summed, deltas[~found]])[order]),
    )


def set_bits(bits: np.ndarray, rows: np.ndarray) -> None:
    """Set the bits of local ``rows`` (sorted, unique) in ``bits``."""
    if rows.size == 0:
        return
    byte = rows >> 3
    starts = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
    masks = np.left_shift(1, rows & 7).astype(np.uint8)
    bits[byte[starts]] |= np.bitwise_or.reduceat(masks, starts)


def _put(old: Overlay, ids: np.ndarray, deltas: np.ndarray) -> Overlay:
    """A new level: ``old`` with the rows ``ids`` (unique) set to ``deltas``."""
    keep = ~np.isin(old.keys, ids) if old.size else np.zeros(0, bool)
    keys = np.concatenate([old.keys[keep], ids])
    order = np.argsort(keys, kind="stable")
    values = np.concatenate([old.deltas[keep].reshape(-1, deltas.shape[1]), deltas])
    return Overlay(np.ascontiguousarray(keys[order]),
                   np.ascontiguousarray(values[order], dtype=np.float32))  # fmt: skip


def _flatten(levels: tuple[Overlay, ...]) -> Overlay:
    out = _EMPTY
    for lv in levels:
        if lv.size:
            out = _add(out, lv.keys, lv.deltas)
    return out


def _pack(parts: list[StagePart]) -> list[dict[str, Any]]:
    return [
        {
            "table": p.table,
            "row_start": p.row_start,
            "ids": np.ascontiguousarray(p.ids, "<i8"),  # written from these buffers
            "rows": np.ascontiguousarray(p.rows, "<f4"),
            "dim": int(p.rows.shape[1]),
        }
        for p in parts
    ]


def _unpack(parts: list[dict[str, Any]]) -> list[StagePart]:
    return [
        StagePart(
            p["table"],
            p["row_start"],
            np.frombuffer(p["ids"], "<i8"),
            np.frombuffer(p["rows"], "<f4").reshape(-1, p["dim"]),
        )
        for p in parts
    ]
