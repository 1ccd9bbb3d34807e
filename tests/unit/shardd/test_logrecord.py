"""Update-log records written from their buffers: the bytes are the record msgpack reads
back, logs written the old way (one ``packb``) still replay, and ``write_all`` writes every
buffer in order however many there are."""

from __future__ import annotations

import errno
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from shardd.durable import IOV_MAX, replace_file, write_all
from shardd.logrecord import HEAD, MAGIC, pieces
from shardd.updates import UpdateLog


def encode(record: dict) -> bytes:
    """The record's buffers joined: the bytes a log holds."""
    return b"".join(bytes(p) for p in pieces(record))


def a_record(rng: np.random.Generator, parts: int = 3) -> dict:
    return {
        "op": "stage",
        "version": 7,
        "parts": [
            {
                "table": f"t{i}",
                "row_start": 1000 * i,
                "ids": np.sort(rng.choice(10**6, 5000 + i, replace=False)).astype("<i8"),
                "rows": rng.standard_normal((5000 + i, 32)).astype("<f4"),
                "dim": 32,
            }
            for i in range(parts)
        ],
        "dense": b"\x01\x02" * 10,  # small bytes stay bin too
    }


def as_bytes(record: dict) -> dict:
    """What msgpack reads back: arrays as their bytes."""
    out = dict(record)
    out["parts"] = [
        {k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in p.items()}
        for p in record["parts"]
    ]
    return out


def test_the_buffers_are_the_record_msgpack_reads_back() -> None:
    record = a_record(np.random.default_rng(0))
    data = encode(record)
    magic, length, crc = HEAD.unpack_from(data)
    payload = data[HEAD.size :]
    assert magic == MAGIC and length == len(payload) and crc == zlib.crc32(payload)
    assert msgpack.unpackb(payload, raw=False) == as_bytes(record)
    # The rows are referenced, not copied: some buffer is the array's own memory.
    rows = record["parts"][0]["rows"]
    assert any(
        isinstance(p, memoryview) and np.shares_memory(np.frombuffer(p, np.uint8), rows)
        for p in pieces(record)
    )


def test_logs_written_by_one_packb_still_replay(tmp_path: Path) -> None:
    old = as_bytes(a_record(np.random.default_rng(1), parts=1))
    payload = msgpack.packb(old, use_bin_type=True)
    (tmp_path / "updates.log").write_bytes(
        struct.pack("<III", MAGIC, len(payload), zlib.crc32(payload)) + payload
    )
    log = UpdateLog(tmp_path / "updates.log")
    new = {"op": "commit", "version": 7}
    log.append(new)
    assert log.records() == [old, new]
    assert log.bytes == (tmp_path / "updates.log").stat().st_size
    log.close()


def test_a_reset_log_holds_the_new_record_alone(tmp_path: Path) -> None:
    log = UpdateLog(tmp_path / "updates.log")
    first = a_record(np.random.default_rng(2), parts=2)
    log.append(first)
    carry = a_record(np.random.default_rng(3), parts=1) | {"op": "carry"}
    log.reset(carry)
    log.append({"op": "commit", "version": 8})
    assert log.records() == [as_bytes(carry), {"op": "commit", "version": 8}]
    log.close()


def write_and_check(path: Path, buffers: list[Any]) -> bytes:
    """``write_all`` of ``buffers`` to a new file at ``path``, checked against their bytes
    joined (returned)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        written = write_all(fd, buffers)
    finally:
        os.close(fd)
    expected = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
    assert written == len(expected) and path.read_bytes() == expected
    return expected


def test_write_all_writes_more_buffers_than_one_writev_takes(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    buffers: list[Any] = [rng.bytes(int(n)) for n in rng.integers(0, 300, IOV_MAX * 2 + 17)]
    buffers[5] = np.arange(100_000, dtype=np.float32)  # an array's memory, as a record has
    expected = write_and_check(tmp_path / "f", buffers)
    replace_file(tmp_path / "g", buffers)
    assert (tmp_path / "g").read_bytes() == expected


def test_write_all_goes_on_after_short_writes(tmp_path: Path, monkeypatch) -> None:
    """A writev may write less than it was given (a signal, a full disk's last bytes)."""
    real = os.writev

    def short(fd: int, views: list) -> int:  # at most 777 bytes a call
        taken, left = [], 777
        for v in views:
            if not left:
                break
            taken.append(v[:left])
            left -= len(taken[-1])
        return real(fd, taken)

    monkeypatch.setattr("shardd.durable.os.writev", short)
    buffers: list[Any] = [b"a" * 2000, b"", b"bc" * 100, np.arange(1000, dtype=np.int64)]
    write_and_check(tmp_path / "f", buffers)


def test_an_append_that_fails_leaves_no_torn_record(tmp_path: Path, monkeypatch) -> None:
    """A full disk mid-record: the append raises, the part written is cut off again, and
    the records appended after it replay."""
    log = UpdateLog(tmp_path / "updates.log")
    first = a_record(np.random.default_rng(5), parts=1)
    log.append(first)
    real = os.writev

    def full(fd: int, views: list) -> int:  # half of the first buffer, then no space
        real(fd, [views[0][: len(views[0]) // 2]])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("shardd.durable.os.writev", full)
    with pytest.raises(OSError):
        log.append(a_record(np.random.default_rng(6), parts=1))
    monkeypatch.setattr("shardd.durable.os.writev", real)
    log.append({"op": "commit", "version": 7})
    assert log.records(repair=False) == [as_bytes(first), {"op": "commit", "version": 7}]
    assert log.bytes == (tmp_path / "updates.log").stat().st_size
    log.close()


def test_empty_and_multidimensional_arrays_are_written_as_their_bytes() -> None:
    """A part with no rows (``[0, dim]``, which ``memoryview.cast`` refuses) and a 2-D one."""
    record = {"ids": np.zeros(0, "<i8"), "rows": np.zeros((0, 32), "<f4"),
              "more": np.ones((2, 3), "<f4")}  # fmt: skip
    data = encode(record)
    assert msgpack.unpackb(data[HEAD.size :], raw=False) == {
        k: v.tobytes() for k, v in record.items()
    }
