"""Compaction: a shard's updated rows folded into new part files in its state directory.

Online updates keep a version's rows as corrections over the table files (``shardd.updates``)
and every update in a log; both grow with every version. Compaction writes, for each part
with updated rows, a new file holding the part's rows at the newest committed version (the
artifact's ``.npy`` format, the part's rows only) beside the old one, fsyncs it, records the
files and their version in ``base.json`` (written to a temporary name, fsync'ed and renamed
into place: the commit point), and only then empties the log. The artifact's files are never
written; a compacted file replaced by a newer one is deleted.

At start a shard opens its compacted files instead of the artifact's for those parts and
replays only the log records after ``base.json``'s version, so a crash at any point of a
compaction comes back with exactly the acknowledged versions: before the rename the old
files and the whole log still hold them; after it the new files and the log's later records.

Files are read and written with plain ``pread``/``write`` and dropped from the page cache
after (``POSIX_FADV_DONTNEED``): a larger-than-memory shard's cgroup is not charged for
copying its parts.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import kernels
from recserve.contracts.errors import ArtifactError
from recserve.contracts.manifest import TableSpec
from recserve.model.artifact import storage
from shardd.durable import replace_file
from shardd.updates import set_bits

BASE = "base.json"
TABLES = "tables"
CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class PartFile:
    """Where a part's rows are: global row ``r`` starts at byte ``origin + r * row_bytes``
    of ``path`` (an artifact file holds every row; a compacted one the part's only)."""

    path: Path
    origin: int


@dataclass(frozen=True)
class Base:
    """What ``base.json`` records: the version the compacted files hold, and per part key
    (``table@row_start``) its file and the file of the ids changed since the artifact."""

    version: int
    files: dict[str, str]
    changed: dict[str, str]
    dense: tuple[int, str] | None = None  # the newest dense weights: version, file


def part_key(table: str, row_start: int) -> str:
    return f"{table}@{row_start}"


def read_base(state_dir: Path, digest: str) -> Base | None:
    """``base.json`` of this model (None: never compacted, or compacted for another model,
    whose files are then left alone)."""
    try:
        raw = json.loads((state_dir / BASE).read_text())
    except FileNotFoundError:
        return None
    if raw.get("model_digest") != digest:
        return None
    dense = raw.get("dense")
    return Base(int(raw["version"]), dict(raw["files"]), dict(raw["changed"]),
                (int(dense[0]), str(dense[1])) if dense else None)  # fmt: skip


def write_base(state_dir: Path, base: Base, digest: str) -> None:
    body = {"model_digest": digest, "version": base.version, "files": base.files,
            "changed": base.changed, "dense": base.dense}  # fmt: skip
    replace_file(state_dir / BASE, json.dumps(body, indent=1).encode())


def open_part(state_dir: Path, name: str, spec: TableSpec, rows: int, row_start: int) -> PartFile:
    """A compacted part file, checked against the part's shape."""
    path = state_dir / TABLES / name
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise ArtifactError(f"a compacted part base.json names is unreadable ({exc})",
                            path=str(path)) from None  # fmt: skip
    dtype, width = storage(spec)
    if array.dtype != dtype or array.shape != (rows, width):
        raise ArtifactError(f"holds {array.dtype} {array.shape}, not {dtype} {(rows, width)}",
                            path=str(path))  # fmt: skip
    assert isinstance(array, np.memmap)
    return PartFile(path, int(array.offset) - row_start * spec.row_bytes)


def write_part(
    src: PartFile,
    spec: TableSpec,
    row_start: int,
    rows: int,
    ids: np.ndarray,
    values: np.ndarray,
    dest: Path,
    *,
    keep_cached: bool = False,
) -> PartFile:
    """Write the part's ``rows`` rows from ``src`` to ``dest`` with global rows ``ids``
    (sorted) replaced by ``values`` (float32, stored as the table stores them); fsync'ed,
    under a temporary name until whole; the caller syncs the directory (``sync_dir``, once
    for all the files it writes) before anything names the file. ``keep_cached``: leave
    the new file's pages in the page cache (a resident part maps it next)."""
    dtype, width = storage(spec)
    encoded = _encode(spec.dtype, values)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": (rows, width)}  # fmt: skip
    tmp = dest.with_name(dest.name + ".tmp")
    dest.parent.mkdir(parents=True, exist_ok=True)
    per_chunk = max(1, CHUNK_BYTES // spec.row_bytes)
    buf = np.empty((min(rows, per_chunk), spec.row_bytes), np.uint8)  # read into, then written
    src_fd = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with open(tmp, "wb", buffering=0) as out:
            np.lib.format.write_array_header_1_0(out, header)
            offset = out.tell()
            local = ids - row_start
            for lo in range(0, rows, per_chunk):
                hi = min(rows, lo + per_chunk)
                chunk = buf[: hi - lo]
                at = src.origin + (row_start + lo) * spec.row_bytes
                if os.preadv(src_fd, [chunk], at) != chunk.nbytes:  # type: ignore[list-item]
                    raise OSError(f"{src.path}: short read at byte {at}")
                os.posix_fadvise(src_fd, at, chunk.nbytes, os.POSIX_FADV_DONTNEED)
                a, b = np.searchsorted(local, [lo, hi])
                chunk[local[a:b] - lo] = encoded[a:b]
                view = chunk.data.cast("B")
                while view:  # an unbuffered write may take less than it was given
                    view = view[out.write(view) :]
            out.flush()
            os.fsync(out.fileno())
            if not keep_cached:
                os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.replace(tmp, dest)
    finally:
        os.close(src_fd)
    return PartFile(dest, offset - row_start * spec.row_bytes)


def write_changed(dest: Path, bits: np.ndarray) -> None:
    """The set of a part's rows changed since the artifact, as a bitmap (bit ``r`` of the
    part's local row ``r``, little-endian within each byte): an ``OR`` merges a compaction's
    rows into it, where a sorted id list had to be merged and rewritten whole. The caller
    syncs the directory, as for ``write_part``."""
    replace_file(dest, _npy_bytes(np.ascontiguousarray(bits, np.uint8)), sync_parent=False)


def changed_bits(path: Path | None, row_start: int, rows: int) -> np.ndarray:
    """A part's changed-rows bitmap from ``path`` (None: no row changed yet). A list of
    global ids (``*.ids.npy``, as compactions wrote it before the bitmaps) is read too."""
    bits = np.zeros((rows + 7) // 8, np.uint8)
    if path is None:
        return bits
    saved = np.load(path)
    if path.name.endswith(".ids.npy"):  # sorted and unique (np.union1d wrote them)
        set_bits(bits, np.asarray(saved, np.int64) - row_start)
        return bits
    if saved.dtype != np.uint8 or saved.shape != bits.shape:
        raise ArtifactError(f"holds {saved.dtype} {saved.shape}, not a bitmap of {rows} rows",
                            path=str(path))  # fmt: skip
    return np.asarray(saved)


def changed_ids(path: Path, row_start: int, rows: int) -> np.ndarray:
    """The global ids (sorted) a part's changed-rows file holds."""
    bits = changed_bits(path, row_start, rows)
    return np.flatnonzero(np.unpackbits(bits, bitorder="little")[:rows]) + row_start


def write_bytes(dest: Path, data: bytes, *, sync_parent: bool = True) -> None:
    replace_file(dest, data, sync_parent=sync_parent)


def read_rows(src: PartFile, spec: TableSpec, ids: np.ndarray) -> np.ndarray:
    """Global rows ``ids`` of ``src`` as float32 ``[n, dim]`` (for a replica catching up)."""
    out = np.empty((ids.size, spec.row_bytes), np.uint8)
    fd = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for i, r in enumerate(ids.tolist()):
            at = src.origin + r * spec.row_bytes
            out[i] = np.frombuffer(os.pread(fd, spec.row_bytes, at), np.uint8)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if spec.dtype == "int8":
        return kernels.Int8RowwiseTable(out).dequantize()
    return out.view(np.float16 if spec.dtype == "fp16" else np.float32).astype(np.float32)


def _encode(dtype: str, values: np.ndarray) -> np.ndarray:
    """Float32 rows as the table's stored bytes ``[n, row_bytes]``."""
    values = np.ascontiguousarray(values, np.float32)
    if dtype == "int8":
        return kernels.quantize_rows(values)
    stored = values.astype(np.float16) if dtype == "fp16" else values
    return stored.view(np.uint8).reshape(values.shape[0], -1)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
