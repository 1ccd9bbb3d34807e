"""Online updates on a shard: staged, committed versions of updated rows, durable in a log.

A version is, per part, the rows updated up to it as an ``Overlay`` (sorted global ids and
each row's difference from the table file, applied by ``kernels.overlay`` after pooling),
built in full at ``stage`` and never changed after: ``commit`` makes it the newest by putting
it in a dict, so a lookup that took the previous version's overlays keeps reading them, and
no row is ever read half-written. The table files are never written. The last ``KEEP``
versions stay readable: the gateway names the version each request reads, so a request never
mixes versions across shards while a commit reaches them one by one.

New rows are stored as the table stores them: int8 tables quantize each row as ``recserve
quantize`` does (``kernels.quantize_rows``), fp16 tables round to fp16, and the difference is
taken from those values.

Durability: ``stage`` returns only once the update is appended to ``updates.log`` in the
state directory and fsync'ed; ``commit`` and ``abort`` append their record the same way. At
start the log is replayed (a torn record at its end, from a crash mid-append, is cut off), so
a shard killed at any moment comes back with exactly the versions it acknowledged; a version
staged but neither committed nor aborted stays staged until the coordinator decides.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
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
from recserve.rpc.wire import StagePart

log = logging.getLogger(__name__)
KEEP = 16  # committed versions kept readable
MAGIC = 0x52535550  # "RSUP"
_HEAD = struct.Struct("<III")  # magic, payload length, crc32 of the payload


@dataclass(frozen=True)
class Overlay:
    keys: np.ndarray  # int64 global row ids, sorted
    deltas: np.ndarray  # float32 [len(keys), dim]: new value minus the file's


EMPTY: dict[int, Overlay] = {}


class UpdateLog:
    """Append-only records, each ``magic, length, crc32`` then a msgpack payload."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "ab")  # noqa: SIM115 - kept open for the daemon's life
        self.bytes = path.stat().st_size

    def append(self, record: dict[str, Any]) -> None:
        payload = msgpack.packb(record, use_bin_type=True)
        self.file.write(_HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.bytes += _HEAD.size + len(payload)

    def records(self, repair: bool = True) -> list[dict[str, Any]]:
        """Every whole record; with ``repair`` (at start) a torn or damaged tail is cut from
        the file."""
        data = self.path.read_bytes()
        out, at = [], 0
        while at + _HEAD.size <= len(data):
            magic, length, crc = _HEAD.unpack_from(data, at)
            payload = data[at + _HEAD.size : at + _HEAD.size + length]
            if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
                break
            out.append(msgpack.unpackb(payload, raw=False))
            at += _HEAD.size + length
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
    """The versions of one shard's parts; ``slots`` maps (table, row_start) to the store's
    part index, ``specs`` gives each part's table spec, rows and base table."""

    def __init__(self, parts: list[Any], state_dir: Path | None) -> None:
        self.parts = parts  # store Parts, by slot
        self.index = {(p.spec.name, p.row_start): i for i, p in enumerate(parts)}
        self.committed: dict[int, dict[int, Overlay]] = {0: EMPTY}
        self.current = 0
        self.staged: tuple[int, dict[int, Overlay]] | None = None
        self.rows_updated = 0
        self.lock = threading.Lock()  # stage/commit/abort, one at a time
        self.log = UpdateLog(state_dir / "updates.log") if state_dir is not None else None
        if self.log is not None:
            self._replay(self.log.records())

    @property
    def enabled(self) -> bool:
        return self.log is not None

    def overlays(self, version: int | None) -> dict[int, Overlay]:
        """The overlays of ``version`` (None: the newest); raises ``VersionUnavailable``."""
        if version is None:
            return self.committed[self.current]
        found = self.committed.get(version)
        if found is None:
            raise VersionUnavailable(
                f"this shard holds versions {min(self.committed)}..{self.current}, not {version}",
                field="version",
            )
        return found

    def stage(self, version: int, parts: list[StagePart]) -> None:
        """Check, build and durably log ``version``; nothing changes on any error."""
        with self.lock:
            self._check_stage(version)
            built = self._build(parts)
            self._append({"op": "stage", "version": version, "parts": _pack(parts)})
            self.staged = (version, built)

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
                self.staged = None

    def history(self, since: int) -> list[tuple[int, list[StagePart]]]:
        """The committed versions after ``since``, with their rows as staged (from the log),
        for a replica catching up."""
        with self.lock:
            if self.log is None:
                raise BadRequest("this shard keeps no update log", field="op")
            staged: dict[int, list[StagePart]] = {}
            out = []
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
                self.stage(version, parts)
            self.commit(version)
            applied += 1
        return applied

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.current,
            "staged": self.staged[0] if self.staged else None,
            "oldest": min(self.committed),
            "rows_updated": self.rows_updated,
            "log_bytes": self.log.bytes if self.log else 0,
        }

    # --- internals --------------------------------------------------------------------------

    def _check_stage(self, version: int) -> None:
        if self.log is None:
            raise BadRequest("this shard takes no updates: start it with --state-dir", field="op")
        if self.staged is not None:
            raise BadRequest(
                f"version {self.staged[0]} is staged here; commit or abort it first",
                field="version",
            )
        if version != self.current + 1:
            raise BadRequest(
                f"version {version} does not follow this shard's {self.current}", field="version"
            )

    def _build(self, parts: list[StagePart]) -> dict[int, Overlay]:
        out = dict(self.committed[self.current])
        for i, sp in enumerate(parts):
            slot = self.index.get((sp.table, sp.row_start))
            if slot is None:
                raise unknown_part(sp.table, sp.row_start, i)
            part = self.parts[slot]
            ids = np.asarray(sp.ids, np.int64)
            if ids.size and (int(ids.min()) < part.row_start or int(ids.max()) >= part.row_end):
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
            if np.unique(ids).size != ids.size:
                raise BadRequest(f"an id of table {sp.table} repeats", field=f"parts[{i}].ids")
            new = _stored(part.spec.dtype, sp.rows) - _base_rows(part, ids)
            out[slot] = _merge(out.get(slot), ids, new.astype(np.float32))
        return out

    def _commit(self, version: int) -> None:
        assert self.staged is not None
        built = self.staged[1]
        self.rows_updated = sum(o.keys.size for o in built.values())
        self.committed[version] = built  # readers of older versions keep theirs
        self.current = version
        self.staged = None
        for old in sorted(self.committed)[:-KEEP]:
            del self.committed[old]

    def _append(self, record: dict[str, Any]) -> None:
        assert self.log is not None
        try:
            self.log.append(record)
        except OSError as exc:
            raise RecserveError(f"writing the update log failed: {exc}") from exc

    def _replay(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            if r["op"] == "stage":
                self.staged = (r["version"], self._build(_unpack(r["parts"])))
            elif r["op"] == "commit" and self.staged and self.staged[0] == r["version"]:
                self._commit(r["version"])
            elif r["op"] == "abort":
                self.staged = None
        if records:
            log.info(
                "replayed %d update records: version %d%s",
                len(records),
                self.current,
                f", version {self.staged[0]} staged" if self.staged else "",
            )


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


def _base_rows(part: Any, ids: np.ndarray) -> np.ndarray:
    """The file's values of global rows ``ids`` of ``part``, float32."""
    local = ids - part.row_start
    base = part.base
    if isinstance(base, kernels.Int8RowwiseTable):
        return base.dequantize(local)
    return np.asarray(base[local], np.float32)


def _merge(old: Overlay | None, ids: np.ndarray, deltas: np.ndarray) -> Overlay:
    if old is not None and old.keys.size:
        keep = ~np.isin(old.keys, ids)
        ids = np.concatenate([old.keys[keep], ids])
        deltas = np.concatenate([old.deltas[keep], deltas])
    order = np.argsort(ids, kind="stable")
    return Overlay(np.ascontiguousarray(ids[order]), np.ascontiguousarray(deltas[order]))


def _pack(parts: list[StagePart]) -> list[dict[str, Any]]:
    return [
        {
            "table": p.table,
            "row_start": p.row_start,
            "ids": np.ascontiguousarray(p.ids, "<i8").tobytes(),
            "rows": np.ascontiguousarray(p.rows, "<f4").tobytes(),
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
