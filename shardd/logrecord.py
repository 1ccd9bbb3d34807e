"""One update-log record as the buffers to write: ``magic, length, crc32`` then a msgpack
payload, with byte fields (ids, rows, dense weights) referenced rather than copied.

``msgpack.packb`` of a stage or carry record copies its megabytes of rows twice with the GIL
held (into the packer, then behind the record's head), and the shard's loop waits for the
GIL meanwhile. Here the small values are packed and each byte field is its ``bin 32`` head
plus the field's own buffer, so the rows reach the file by one ``writev`` (the GIL released)
and are read once more only by ``zlib.crc32`` (which releases it too). The bytes are valid
msgpack, read back by ``msgpack.unpackb`` as before.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import msgpack
import numpy as np

from shardd.durable import byte_view

MAGIC = 0x52535550  # "RSUP"
HEAD = struct.Struct("<III")  # magic, payload length, crc32 of the payload
JOIN_BELOW = 1 << 16  # buffers smaller than this are joined into their neighbours


def pieces(record: dict[str, Any]) -> list[Any]:
    """``record`` (dicts, lists, scalars, ``bytes`` and contiguous numpy arrays, stored as
    msgpack ``bin``) as buffers whose concatenation is the whole record, head included."""
    packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    out: list[Any] = []
    _encode(record, packer, out)
    payload = _join_small(out)
    crc = 0
    for piece in payload:
        crc = zlib.crc32(piece, crc)
    return [HEAD.pack(MAGIC, sum(map(len, payload)), crc), *payload]


def _encode(obj: Any, packer: msgpack.Packer, out: list[Any]) -> None:
    """Appends ``obj`` to ``out`` as ``bytes`` and byte views (``len`` is their size)."""
    if isinstance(obj, dict):
        out.append(packer.pack_map_header(len(obj)))
        for key, value in obj.items():
            out.append(packer.pack(key))
            _encode(value, packer, out)
    elif isinstance(obj, list | tuple):
        out.append(packer.pack_array_header(len(obj)))
        for value in obj:
            _encode(value, packer, out)
    elif isinstance(obj, bytes | bytearray | memoryview | np.ndarray):
        view = byte_view(obj)
        out.append(b"\xc6" + view.nbytes.to_bytes(4, "big"))  # bin 32
        out.append(view)
    else:
        out.append(packer.pack(obj))


def _join_small(parts: list[Any]) -> list[Any]:
    """Runs of small buffers joined into one (``writev`` takes at most IOV_MAX)."""
    out: list[Any] = []
    run: list[Any] = []
    for part in parts:
        if len(part) < JOIN_BELOW:
            run.append(part)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(part)
    if run:
        out.append(b"".join(run))
    return out
