"""The ZeroMQ wire protocol between the gateway and the shard daemons: the one definition.

Every message is a multipart: frame 0 is a msgpack header, the following frames are raw
little-endian numpy buffers sent and received without copies. No pickle anywhere.

Request header: ``{"v": 2, "op": OP, "id": int, "deadline_ms": float | None, ...}`` where
``deadline_ms`` is absolute Unix time in milliseconds (hosts are assumed NTP-synchronised).

``lookup`` adds ``parts``, one list per field: ``{"table": [str], "row_start": [int],
"bags": [int], "mode": [str]}``, entry ``i`` of each describing part ``i`` (a part is
addressed by the table and the first row the shard serves of it; ``mode`` is ``sum`` or
``mean``), ``id_dtype`` (``"<i8"`` or ``"<i4"``) and ``weighted``; its frames are the ids of
all parts concatenated (global row ids), the int32 bag lengths of all parts concatenated,
and with ``weighted`` float32 weights, one per id. Version 1 sent a map per part: a shard
decoding 44 of them cold spent 0.2-0.3 ms on the header alone (version 2: four lists).

With ``shm`` (a shard on the client's host, ``recserve.rpc.shm``) a lookup sends no data
frames: ``shm`` is ``{"path", "key", "ids", "lengths", "weights"?, "out"}``, the arena's file,
its key (hex), and ``[offset, bytes]`` of each array in it and of the region the reply's
floats go to; the reply then has no frames either, and each of its ``groups`` names the
``offset`` its floats were written at. A shard that cannot map the file answers
``shm_unavailable``.

With ``into`` (shards on the gateway's host) parts are pooled straight into the batch's
``[rows, width, dim]`` float32 array in another arena the shards map: ``into`` is ``{"path",
"key", "at", "shape": [rows, width, dim], "cols": [c]}``: part ``i`` goes to column
``cols[i]`` of it (and must have ``rows`` bags and the array's dim), or with ``-1`` into a
group as usual. The reply's ``into`` lists the parts written there; its ``groups`` hold the
others. A shard that ignores ``into`` (older) answers every part in ``groups``.

``lookup`` may name the model ``version`` to read (an int, updates committed so far; absent:
the shard's newest). ``stage`` carries ``version`` and ``parts`` ``{"table", "row_start",
"rows": [n], "dim": [d]}`` lists, then two frames: every part's int64 global row ids, then
their new float32 rows, concatenated in part order; with ``dense`` (a byte count) a third
frame holds the model's whole new dense weights as ``.npz`` bytes, for the shard to keep.
``commit`` and ``abort`` carry the ``version`` only. ``log`` asks a replica for the committed
versions after ``since``: the reply lists ``versions`` and their ``parts`` (as ``stage``
does) with two frames per version (versions a replica compacted come as one: every row
changed up to it). ``dense`` asks for the newest committed dense weights: the reply's
``version`` (None: none were pushed) and one frame of ``.npz`` bytes. ``load`` (``version``,
``model``: an artifact directory) stages a deploy: the shard opens that artifact to serve
from ``version`` on, once committed (``shardd.models``).

Replies echo ``v``, ``op`` and ``id`` with ``"ok": true`` or ``"ok": false, "error":
{"kind", "message", "field"?}``. A ``lookup`` reply lists ``groups``: ``{"parts": [indices], "bags",
"dim"}``, one float32 frame ``[bags, len(parts), dim]`` each (parts with equal bag count and
dim are pooled by one kernel call and shipped as it wrote them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np

from recserve.contracts.errors import (
    BadRequest,
    RecserveError,
    TooLarge,
    UnknownOp,
    UnsupportedVersion,
)

VERSION = 2
VERSIONS_KEPT = 16  # committed versions a shard keeps readable, and a batch may lag the newest
OPS = ("lookup", "info", "health", "stats", "stage", "commit", "abort", "log", "dense", "load")
ID_DTYPES: dict[str, np.dtype[Any]] = {"<i8": np.dtype("<i8"), "<i4": np.dtype("<i4")}
MODES = ("sum", "mean")
MAX_HEADER = 1 << 20
MAX_FRAME = 256 << 20  # also each side's ZMQ MAXMSGSIZE: a larger frame drops the peer
MAX_REPLY_FLOATS = MAX_FRAME // 4  # pooled floats one lookup may ask for (too_large above)
MAX_PARTS = 4096
PARTS_KEPT = 256  # distinct parts lists whose checked form decode_lookup keeps
_PART_KEYS = frozenset({"table", "row_start", "bags", "mode"})

Buffer = (
    Any  # bytes, memoryview, numpy array or zmq.Frame buffer: anything with the buffer protocol
)


class PartRequest(NamedTuple):
    """One part of a lookup (a tuple: a shard builds dozens per lookup, at half the cost of
    a frozen dataclass)."""

    table: str
    row_start: int
    bags: int
    mode: str = "sum"


@dataclass(frozen=True)
class Lookup:
    """A decoded lookup request; arrays are read-only views of the received frames."""

    parts: tuple[PartRequest, ...]
    ids: np.ndarray
    lengths: np.ndarray  # int32, sum of bags entries
    weights: np.ndarray | None

    def spans(self) -> list[tuple[int, int, int, int]]:
        """Per part: (first length index, bag count, first id, id count)."""
        out, bag = [], 0
        bounds = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        for part in self.parts:
            first = int(bounds[bag])
            n = int(bounds[bag + part.bags]) - first
            out.append((bag, part.bags, first, n))
            bag += part.bags
        return out


def pack_header(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def request(op: str, req_id: int, deadline_ms: float | None, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "op": op, "id": req_id, "deadline_ms": deadline_ms, **fields}


def encode_lookup(
    req_id: int,
    deadline_ms: float | None,
    parts: Sequence[PartRequest],
    ids: np.ndarray,
    lengths: np.ndarray,
    weights: np.ndarray | None = None,
    version: int | None = None,
    shm: dict[str, Any] | None = None,
    into: dict[str, Any] | None = None,
    *,
    as_sent: bool = False,
) -> list[Buffer]:
    """A lookup's frames; with ``shm`` (its arrays already written to the arena it names,
    as ``lookup_arrays`` gives them) the header alone. ``as_sent``: the arrays are already
    as ``lookup_arrays`` gives them."""
    if not as_sent:
        ids, lengths, weights = lookup_arrays(ids, lengths, weights)
    extra: dict[str, Any] = {} if version is None else {"version": version}
    if shm is not None:
        extra["shm"] = shm
    if into is not None:
        extra["into"] = into
    frames: list[Buffer] = [
        pack_header(
            request(
                "lookup",
                req_id,
                deadline_ms,
                parts={
                    "table": [p.table for p in parts],
                    "row_start": [p.row_start for p in parts],
                    "bags": [p.bags for p in parts],
                    "mode": [p.mode for p in parts],
                },
                id_dtype=ids.dtype.str,
                weighted=weights is not None,
                **extra,
            )
        ),
    ]
    if shm is None:
        frames += [ids, lengths] if weights is None else [ids, lengths, weights]
    return frames


def lookup_arrays(
    ids: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A lookup's arrays as they travel: contiguous little-endian int32 or int64 ids, int32
    lengths, float32 weights."""
    ids = np.ascontiguousarray(ids)
    if ids.dtype.str not in ID_DTYPES:
        ids = ids.astype("<i8")
    lengths = np.ascontiguousarray(lengths, dtype="<i4")
    if weights is not None:
        weights = np.ascontiguousarray(weights, dtype="<f4")
    return ids, lengths, weights


class ShmSpec(NamedTuple):
    """A lookup's ``shm`` map, checked for shape (``recserve.rpc.shm`` checks the file)."""

    path: str
    key: str
    arrays: list[tuple[int, int]]  # [offset, bytes] of ids, lengths and (weighted) weights
    out: tuple[int, int]


def decode_shm(header: dict[str, Any]) -> ShmSpec | None:
    """A lookup's ``shm`` map, or None when its arrays came as frames."""
    spec = header.get("shm")
    if spec is None:
        return None
    names = ["ids", "lengths", *(["weights"] if header.get("weighted") is True else [])]
    if not isinstance(spec, dict) or spec.keys() != {"path", "key", "out", *names}:
        raise BadRequest(f"shm must map path, key, out and {', '.join(names)}", field="shm")
    spans = []
    for name in [*names, "out"]:
        span = spec[name]
        if not (isinstance(span, list) and len(span) == 2 and all(map(_natural, span))):
            raise BadRequest(f"shm.{name} must be [offset, bytes]", field=f"shm.{name}")
        spans.append((span[0], span[1]))
    return ShmSpec(spec["path"], spec["key"], spans[:-1], spans[-1])


class IntoSpec(NamedTuple):
    """A lookup's ``into`` map, checked for shape (``recserve.rpc.shm`` checks the file)."""

    path: str
    key: str
    at: int
    shape: tuple[int, int, int]  # rows, width, dim
    cols: tuple[int, ...]  # per part: its column, or -1


def decode_into(header: dict[str, Any], n_parts: int) -> IntoSpec | None:
    """A lookup's ``into`` map, or None without one."""
    spec = header.get("into")
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.keys() != {"path", "key", "at", "shape", "cols"}:
        raise BadRequest("into must map path, key, at, shape and cols", field="into")
    shape, cols, at = spec["shape"], spec["cols"], spec["at"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_natural(x) and x for x in shape)):
        raise BadRequest("into.shape must be [rows, width, dim], each >= 1", field="into.shape")
    if not _natural(at) or at % 4:
        raise BadRequest("into.at must be a float32 offset", field="into.at")
    width = shape[1]
    if not isinstance(cols, list) or len(cols) != n_parts:
        raise BadRequest(f"into.cols must list a column for each of {n_parts} parts",
                         field="into.cols")  # fmt: skip
    if not all(type(c) is int and -1 <= c < width for c in cols):
        raise BadRequest(f"into.cols must be columns in [0, {width}) or -1", field="into.cols")
    placed = [c for c in cols if c >= 0]
    if len(set(placed)) != len(placed):
        raise BadRequest("into.cols must not name a column twice", field="into.cols")
    return IntoSpec(spec["path"], spec["key"], at, (shape[0], shape[1], shape[2]), tuple(cols))


class StagePart(NamedTuple):
    table: str
    row_start: int
    ids: np.ndarray  # int64 global row ids
    rows: np.ndarray  # float32 [len(ids), dim]


def encode_stage(
    req_id: int,
    deadline_ms: float | None,
    version: int,
    parts: Sequence[StagePart],
    dense: bytes | None = None,
) -> list[Buffer]:
    """A ``stage``: the parts' columns and two frames, and with ``dense`` (the model's
    whole dense weights as ``.npz`` bytes, kept by the shard for the gateways) a third."""
    cols, frames = stage_columns(parts)
    extra = {} if dense is None else {"dense": len(dense)}
    head = pack_header(request("stage", req_id, deadline_ms, version=version, parts=cols, **extra))
    return [head, *frames, *([dense] if dense is not None else [])]


def split_dense(
    header: dict[str, Any], frames: Sequence[Buffer]
) -> tuple[Sequence[Buffer], bytes | None]:
    """A ``stage``'s row frames and its dense weights' bytes (None without)."""
    size = header.get("dense")
    if size is None:
        return frames, None
    if type(size) is not int or len(frames) != 3 or memoryview(frames[2]).nbytes != size:
        raise BadRequest("dense must be the byte size of a third frame", field="dense")
    return frames[:2], bytes(frames[2])


def stage_columns(parts: Sequence[StagePart]) -> tuple[dict[str, list[Any]], list[Buffer]]:
    """A version's parts as ``stage`` (and a ``log`` reply) sends them: the header's columns
    and the two frames."""
    cols: dict[str, list[Any]] = {
        "table": [p.table for p in parts],
        "row_start": [p.row_start for p in parts],
        "rows": [int(p.ids.size) for p in parts],
        "dim": [int(p.rows.shape[1]) if p.rows.ndim == 2 else 0 for p in parts],
    }
    ids = [np.ascontiguousarray(p.ids, "<i8") for p in parts]
    rows = [np.ascontiguousarray(p.rows, "<f4").reshape(-1) for p in parts]
    return cols, [
        np.concatenate(ids) if ids else np.zeros(0, "<i8"),
        np.concatenate(rows) if rows else np.zeros(0, "<f4"),
    ]


def decode_stage(header: dict[str, Any], frames: Sequence[Buffer]) -> list[StagePart]:
    """The parts of a ``stage``, as views of ``frames``, after checking their shape (the
    shard checks ids against its parts and rows for NaN)."""
    cols = header.get("parts")
    keys = {"table", "row_start", "rows", "dim"}
    if not isinstance(cols, dict) or cols.keys() != keys:
        raise BadRequest(
            "parts must be a map of table, row_start, rows and dim lists", field="parts"
        )
    n = len(cols["table"]) if isinstance(cols["table"], list) else -1
    if not 0 <= n <= MAX_PARTS or not all(
        isinstance(cols[k], list) and len(cols[k]) == n for k in keys
    ):
        raise BadRequest(f"parts must list 0..{MAX_PARTS} parts, every field alike", field="parts")
    _check_column("table", cols["table"], lambda t: type(t) is str)
    for name in ("row_start", "rows", "dim"):
        _check_column(name, cols[name], _natural)
    if len(frames) != 2:
        raise BadRequest(f"a stage needs 2 data frames, got {len(frames)}", field="frames")
    ids = _array(frames[0], np.dtype("<i8"), "ids")
    rows = _array(frames[1], np.dtype("<f4"), "rows")
    if ids.size != sum(cols["rows"]) or rows.size != sum(
        r * d for r, d in zip(cols["rows"], cols["dim"], strict=True)
    ):
        raise BadRequest("the frames do not hold the rows the parts list", field="frames")
    out, at, at_rows = [], 0, 0
    for t, start, k, d in zip(
        cols["table"], cols["row_start"], cols["rows"], cols["dim"], strict=True
    ):
        out.append(
            StagePart(t, start, ids[at : at + k], rows[at_rows : at_rows + k * d].reshape(k, d))
        )
        at, at_rows = at + k, at_rows + k * d
    return out


def check_version(header: dict[str, Any], *, required: bool) -> int | None:
    version = header.get("version")
    if version is None and not required:
        return None
    if not isinstance(version, int) or not _natural(version):
        raise BadRequest("version must be an integer >= 0", field="version")
    return version


def decode_header(frame: Buffer) -> dict[str, Any]:
    """A request or reply header, checked for shape; raises ``BadRequest`` kinds."""
    raw = memoryview(frame).cast("B") if not isinstance(frame, bytes) else frame
    if len(raw) > MAX_HEADER:
        raise TooLarge(f"header of {len(raw)} bytes exceeds {MAX_HEADER}", field="header")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadRequest(
            f"header is not valid msgpack ({type(exc).__name__})", field="header"
        ) from None
    if not isinstance(header, dict):
        raise BadRequest("header must be a map", field="header")
    if header.get("v") != VERSION:
        raise UnsupportedVersion(
            f"protocol version {header.get('v')!r} is not supported (this side speaks {VERSION})",
            field="v",
        )
    if header.get("op") not in OPS:
        raise UnknownOp(f"unknown op {header.get('op')!r} (known: {', '.join(OPS)})", field="op")
    req_id = header.get("id")
    if type(req_id) is not int:
        raise BadRequest("id must be an integer", field="id")
    deadline = header.get("deadline_ms")
    if deadline is not None and type(deadline) not in (int, float):
        raise BadRequest("deadline_ms must be a number or null", field="deadline_ms")
    return header


def decode_lookup(
    header: dict[str, Any], frames: Sequence[Buffer], *, check_lengths: bool = True
) -> Lookup:
    """The arrays of a lookup, as views of ``frames`` (no copies), after checking them.
    ``check_lengths=False`` leaves the bag lengths' values (not their count) to a caller
    that checks them as it reads them (a shard, in one compiled pass), with
    ``lengths_error`` for the message."""
    cols = header.get("parts")
    if not isinstance(cols, dict) or cols.keys() != _PART_KEYS:
        raise BadRequest(
            "parts must be a map of table, row_start, bags and mode lists", field="parts"
        )
    tables, starts, bags, modes = cols["table"], cols["row_start"], cols["bags"], cols["mode"]
    n = len(tables) if isinstance(tables, list) else 0
    if not 1 <= n <= MAX_PARTS or not all(
        isinstance(c, list) and len(c) == n for c in (starts, bags, modes)
    ):
        raise BadRequest(
            f"parts must list 1..{MAX_PARTS} parts, every field as long as table",
            field="parts",
        )
    columns = (tuple(tables), tuple(starts), tuple(bags), tuple(modes))
    try:  # the types too: True == 1 and 1.0 == 1, and those must still be refused
        parts, n_bags = _checked_parts(*columns, tuple(map(type, starts)),
                                       tuple(map(type, bags)))  # fmt: skip
    except TypeError:  # an unhashable value (a list, a map): the checks name it
        parts, n_bags = _check_parts(*columns)
    dtype = ID_DTYPES.get(str(header.get("id_dtype")))
    if dtype is None:
        raise BadRequest(f"id_dtype must be one of {', '.join(ID_DTYPES)}", field="id_dtype")
    weighted = header.get("weighted")
    if not isinstance(weighted, bool):
        raise BadRequest("weighted must be a boolean", field="weighted")
    want = 3 if weighted else 2
    if len(frames) != want:
        raise BadRequest(f"a lookup needs {want} data frames, got {len(frames)}", field="frames")
    ids = _array(frames[0], dtype, "ids")
    lengths = _array(frames[1], np.dtype("<i4"), "lengths")
    if lengths.size != n_bags:
        raise BadRequest(f"{lengths.size} bag lengths for {n_bags} bags", field="lengths")
    if check_lengths and (error := lengths_error(lengths, ids.size)) is not None:
        raise error
    weights = None
    if weighted:
        weights = _array(frames[2], np.dtype("<f4"), "weights")
        if weights.size != ids.size:
            raise BadRequest(f"{weights.size} weights for {ids.size} ids", field="weights")
        if not np.isfinite(weights).all():
            raise BadRequest("weights must be finite", field="weights")
    return Lookup(parts, ids, lengths, weights)


def _check_parts(
    tables: tuple[Any, ...], starts: tuple[Any, ...], bags: tuple[Any, ...], modes: tuple[Any, ...]
) -> tuple[tuple[PartRequest, ...], int]:
    """A lookup's parts, checked, and their bag count."""
    _check_column("table", tables, lambda t: type(t) is str)
    _check_column("row_start", starts, _natural)
    _check_column("bags", bags, _natural)
    _check_column("mode", modes, lambda m: type(m) is str and m in MODES)
    parts = tuple(map(PartRequest, tables, starts, bags, modes))
    return parts, sum(p.bags for p in parts)


@functools.lru_cache(maxsize=PARTS_KEPT)
def _checked_parts(
    tables: tuple[Any, ...],
    starts: tuple[Any, ...],
    bags: tuple[Any, ...],
    modes: tuple[Any, ...],
    start_types: tuple[type, ...],
    bag_types: tuple[type, ...],
) -> tuple[tuple[PartRequest, ...], int]:
    """``_check_parts``, kept for the last ``PARTS_KEPT`` parts lists (with their values'
    types): a gateway asks a shard for the same few again and again, and checking one
    costs a shard ~13 us a 7-part lookup with its caches cold (a refused one raises, and
    nothing is kept)."""
    return _check_parts(tables, starts, bags, modes)


def lengths_error(lengths: np.ndarray, n_ids: int) -> BadRequest | None:
    """What is wrong with a lookup's bag lengths (negative, or not adding up to its
    ``n_ids`` ids), or None."""
    # The ufuncs' own reductions: lengths.min() and .sum() add ~1.5 us each of Python.
    if lengths.size and int(np.minimum.reduce(lengths)) < 0:
        return BadRequest("bag lengths must not be negative", field="lengths")
    total = int(np.add.reduce(lengths, dtype=np.int64))
    if total != n_ids:
        return BadRequest(
            f"bag lengths add up to {total}, not to the {n_ids} ids sent", field="lengths"
        )
    return None


def _natural(x: Any) -> bool:
    return type(x) is int and x >= 0


def _check_column(name: str, values: Sequence[Any], ok: Callable[[Any], bool]) -> None:
    if not all(map(ok, values)):
        i = next(i for i, x in enumerate(values) if not ok(x))
        raise BadRequest(f"parts.{name}[{i}] is not a valid {name}", field=f"parts.{name}[{i}]")


def _array(frame: Buffer, dtype: np.dtype, name: str) -> np.ndarray:
    buf = memoryview(frame).cast("B") if not isinstance(frame, np.ndarray) else frame
    size = buf.nbytes
    if size > MAX_FRAME:
        raise TooLarge(f"{name} frame of {size} bytes exceeds {MAX_FRAME}", field=name)
    if size % dtype.itemsize:
        raise BadRequest(
            f"{name} frame of {size} bytes is not a whole number of {dtype} values", field=name
        )
    return np.frombuffer(buf, dtype=dtype)


def reply(header: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "op": header.get("op"), "id": header.get("id"), "ok": True, **fields}


def error_reply(header: dict[str, Any] | None, exc: RecserveError) -> bytes:
    header = header or {}
    return pack_header(
        {
            "v": VERSION,
            "op": header.get("op"),
            "id": header.get("id"),
            "ok": False,
            "error": exc.to_dict(),  # kind, message and, when known, the field
        }
    )
