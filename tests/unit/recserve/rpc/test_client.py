"""The shard client against an in-process fake shard: replies that do not answer the request
are the shard's failure (ShardUnavailable, which may fail over), and any error kind a shard
reports comes back as our class of that kind."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from recserve.contracts.errors import (
    ArtifactError,
    IdOutOfRange,
    RecserveError,
    ShardUnavailable,
)
from recserve.rpc.client import ShardClient, _on_shard
from recserve.rpc.deadline import Deadline
from recserve.rpc.wire import PartRequest, decode_header, pack_header

PARTS = [PartRequest("a", 0, 2), PartRequest("b", 0, 2)]


async def ask(answer: Any) -> Any:
    """One lookup of PARTS against a ROUTER that replies ``answer(header)`` (frames)."""
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = ShardClient(f"tcp://127.0.0.1:{port}", ctx)

    async def serve() -> None:
        while not server.poll(0):
            await asyncio.sleep(0.005)
        ident, head, *_ = server.recv_multipart()
        server.send_multipart([ident, *answer(decode_header(head))])

    try:
        task = asyncio.ensure_future(serve())
        lookup = client.lookup(
            PARTS,
            np.zeros(0, np.int64),
            np.zeros(4, np.int32),
            deadline=Deadline.after(5000),
            dim=3,
        )
        result = await lookup
        await task
        return result
    finally:
        await client.close()
        server.close()
        ctx.term()


def reply(header: dict[str, Any], groups: Any, *frames: bytes, **extra: Any) -> list[bytes]:
    head = {"v": 2, "op": "lookup", "id": header["id"], "ok": True, "groups": groups, **extra}
    return [pack_header(head), *frames]


def floats(n: int) -> bytes:
    return np.zeros(n, np.float32).tobytes()


def test_a_well_formed_reply_is_accepted() -> None:
    groups = asyncio.run(
        ask(lambda h: reply(h, [{"parts": [0, 1], "bags": 2, "dim": 3}], floats(12)))
    )
    assert groups[0].parts == (0, 1) and groups[0].pooled.shape == (2, 2, 3)


@pytest.mark.parametrize(
    "groups, frames",
    [
        ([{"parts": [0, 1], "bags": 2, "dim": 4}], [floats(16)]),  # wrong dim
        ([{"parts": [0, 1], "bags": 3, "dim": 3}], [floats(18)]),  # wrong bag count
        ([{"parts": [0], "bags": 2, "dim": 3}], [floats(6)]),  # a part unanswered
        ([{"parts": [0, 0], "bags": 2, "dim": 3}], [floats(12)]),  # a part twice
        ([{"parts": [0, 7], "bags": 2, "dim": 3}], [floats(12)]),  # an unknown part
        ([{"parts": [0, 1], "bags": "2", "dim": 3}], [floats(12)]),  # not an integer
        ([{"parts": [0, 1], "bags": 2, "dim": 3}], [floats(11)]),  # short frame
        ([{"parts": [0, 1]}], [floats(12)]),  # keys missing
        ("nope", [floats(12)]),
    ],
)
def test_a_reply_that_does_not_answer_the_request_is_shard_unavailable(groups, frames) -> None:
    with pytest.raises(ShardUnavailable, match="malformed"):
        asyncio.run(ask(lambda h: reply(h, groups, *frames)))


@pytest.mark.parametrize(
    "kind, cls",
    [("id_out_of_range", IdOutOfRange), ("artifact", ArtifactError), ("??", RecserveError)],
)
def test_error_replies_of_any_kind_come_back_typed(kind: str, cls: type) -> None:
    def error(h: dict[str, Any]) -> list[bytes]:
        err = {"kind": kind, "message": "no", "field": "parts[0]"}
        return [msgpack.packb({"v": 2, "op": "lookup", "id": h["id"], "ok": False, "error": err})]

    with pytest.raises(cls) as info:
        asyncio.run(ask(error))
    assert type(info.value) is cls and info.value.field == "parts[0]"


def test_shared_memory_lost_to_a_silent_shard_is_replaced() -> None:
    """Lookups through shared memory to a shard that takes them and never answers (killed
    with them in flight) hold their regions; once a quarter of the arena waits so, the
    client starts a new arena and unlinks the old one."""

    async def run() -> None:
        ctx = zmq.Context()
        server = ctx.socket(zmq.ROUTER)  # receives, never replies
        server.setsockopt(zmq.LINGER, 0)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client = ShardClient(f"tcp://127.0.0.1:{port}", ctx, shm_bytes=1 << 20)
        first = client.arena
        assert first is not None
        parts = [PartRequest("a", 0, 512)]  # 128 KiB of reply room each
        ids, lengths = np.zeros(512, np.int64), np.ones(512, np.int32)

        async def lost() -> None:
            with pytest.raises(ShardUnavailable):
                await client.lookup(parts, ids, lengths, dim=64, deadline=Deadline.after(20))

        try:
            await lost()
            each = client.abandoned[1].base.nbytes
            held = (first.size // 4) // each + 1  # just over a quarter
            for _ in range(held - 1):
                await lost()
            assert client.arena is first and len(client.abandoned) == held
            await lost()
            assert client.arena is not first and not first.path.exists()
            assert list(client.abandoned) == [held + 1]  # the new arena's lookup
        finally:
            await client.close()
            server.close()
            ctx.term()

    asyncio.run(run())


def test_shared_memory_of_a_lookup_never_sent_is_returned_at_once() -> None:
    """No shard listens: the lookup never leaves, so no one can write its region."""

    async def run() -> None:
        ctx = zmq.Context()
        client = ShardClient("ipc:///nonexistent/recserve-test.sock", ctx, shm_bytes=1 << 20)
        assert client.arena is not None
        try:
            # A task of its own, as a request's: its timeout's CancelledError (and the
            # frames it holds) lives as long as the task does.
            task = asyncio.ensure_future(
                client.lookup(
                    [PartRequest("a", 0, 4)], np.zeros(4, np.int64), np.ones(4, np.int32),
                    dim=8, deadline=Deadline.after(20),
                )
            )  # fmt: skip
            await asyncio.wait([task])
            assert isinstance(task.exception(), ShardUnavailable)
            del task
            gc.collect()
            assert not client.abandoned and client.arena.lent == 0
        finally:
            await client.close()
            ctx.term()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ({"queue_ms": 0.25, "work_ms": 1.5}, 0.00175),
        ({"queue_ms": 0, "work_ms": 2}, 0.002),
        ({"work_ms": 1.5}, None),  # a shard that does not say
        ({"queue_ms": -1.0, "work_ms": 1.5}, None),
        ({"queue_ms": float("nan"), "work_ms": 1.5}, None),
        ({"queue_ms": True, "work_ms": 1.5}, None),
        ({"queue_ms": "1", "work_ms": 1.5}, None),
        ({"queue_ms": 1e300, "work_ms": 1.5}, None),
    ],
)
def test_the_time_a_reply_says_it_spent_on_the_shard(header: dict, seconds: float | None) -> None:
    """A peer's numbers are checked before they reach a histogram."""
    got = _on_shard(header)
    assert got == pytest.approx(seconds) if seconds is not None else got is None
