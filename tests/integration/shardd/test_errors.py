"""Bad input, deadlines and overload: typed errors on the wire, and the daemon keeps serving."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from recserve.contracts.errors import (
    IdOutOfRange,
    Overloaded,
    RecserveError,
    UnknownTable,
)
from recserve.rpc.client import ShardClient
from recserve.rpc.deadline import Deadline, now_ms
from recserve.rpc.wire import VERSION, PartRequest, encode_lookup
from tests.integration.shardd.helpers import (
    big_lookup,
    expect_error,
    lookup,
    make_lookup,
    reference,
)
from tests.integration.shards import (
    free_port,
    header,
    raw,
    running,
)


def test_errors_are_typed_and_the_daemon_keeps_serving(shards, model_and_plan) -> None:
    endpoint = shards[0][0]
    _, _, plan = model_and_plan
    part = plan.shard(0).parts[0]
    good = encode_lookup(
        1,
        now_ms() + 10_000,
        [PartRequest(part.table, part.row_start, 1)],
        np.array([part.row_start]),
        np.array([1]),
    )
    hdr = msgpack.unpackb(good[0])
    bad_version = msgpack.packb({**hdr, "v": 99})
    expect_error(endpoint, [bad_version, *good[1:]], "unsupported_version")
    expect_error(endpoint, [header("explode")], "unknown_op")
    expect_error(endpoint, [b"\xc1garbage"], "bad_request")
    expect_error(endpoint, [header("health"), b"extra"], "bad_request")
    wrong_dtype = msgpack.packb({**hdr, "id_dtype": "<f8"})
    expect_error(endpoint, [wrong_dtype, *good[1:]], "bad_request")
    expect_error(endpoint, [good[0], good[1]], "bad_request")  # missing lengths
    expect_error(endpoint, [good[0], good[1], np.array([2], "<i4")], "bad_request")
    expect_error(endpoint, [good[0], b"\x01\x02\x03", good[2]], "bad_request")
    # Bag lengths' values are checked in the shard's compiled pass over them, not on decode.
    two = [PartRequest(part.table, part.row_start, 2)]
    for lengths, message in (([-1, 2], "must not be negative"), ([1, 1], "add up to 2, not")):
        frames = encode_lookup(1, now_ms() + 10_000, two, np.array([part.row_start]),
                               np.array(lengths))  # fmt: skip
        reply = msgpack.unpackb(raw(endpoint, frames)[0])
        assert reply["error"]["kind"] == "bad_request", reply
        assert reply["error"]["field"] == "lengths" and message in reply["error"]["message"]
    for parts, field in (
        ({**hdr["parts"], "bags": [-1]}, "parts.bags[0]"),
        ({**hdr["parts"], "mode": ["max"]}, "parts.mode[0]"),
        ({**hdr["parts"], "row_start": [0, 0]}, "parts"),
        ([hdr["parts"]], "parts"),
    ):
        reply = msgpack.unpackb(
            raw(endpoint, [msgpack.packb({**hdr, "parts": parts}), *good[1:]])[0]
        )
        assert reply["error"]["kind"] == "bad_request" and reply["error"]["field"] == field, reply
    unknown = encode_lookup(
        1, now_ms() + 10_000, [PartRequest(part.table, 7777777, 1)], np.array([1]), np.array([1])
    )
    expect_error(endpoint, unknown, "unknown_table")
    outside = encode_lookup(
        1,
        now_ms() + 10_000,
        [PartRequest(part.table, part.row_start, 1)],
        np.array([part.row_end]),
        np.array([1]),
    )
    expect_error(endpoint, outside, "id_out_of_range")
    negative = encode_lookup(
        1,
        now_ms() + 10_000,
        [PartRequest(part.table, part.row_start, 1)],
        np.array([-1]),
        np.array([1]),
    )
    expect_error(endpoint, negative, "id_out_of_range")
    reply = raw(endpoint, good)
    assert msgpack.unpackb(reply[0])["ok"] is True
    with pytest.raises(IdOutOfRange, match=r"outside the rows this part serves"):
        asyncio.run(
            lookup(
                endpoint,
                [PartRequest(part.table, part.row_start, 1)],
                np.array([part.row_end]),
                np.array([1]),
            )
        )
    with pytest.raises(UnknownTable):
        asyncio.run(lookup(endpoint, [PartRequest("nope", 0, 1)], np.array([0]), np.array([1])))


@pytest.mark.slow
def test_fuzz_then_a_correct_lookup(shards, model_and_plan) -> None:
    endpoint, proc = shards[0][0], shards[1][0]
    model, _, plan = model_and_plan
    rng = np.random.default_rng(1234)
    parts, ids, lengths, _, ids_pp, len_pp, w_pp = make_lookup(plan, 0, seed=5)
    good = encode_lookup(1, now_ms() + 60_000, parts, ids, lengths)
    good_bytes = [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in good]
    ctx = zmq.Context.instance()
    sent = 0
    with ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        for i in range(3000):
            choice = i % 6
            if choice == 0:  # random bytes in every frame
                frames = [rng.bytes(int(rng.integers(0, 64))) for _ in range(rng.integers(1, 5))]
            elif choice == 1:  # a valid header, corrupted data frames
                frames = [good_bytes[0]] + [
                    rng.bytes(int(rng.integers(0, 200))) for _ in range(rng.integers(0, 4))
                ]
            elif choice == 2:  # one flipped byte anywhere
                frames = [bytearray(f) for f in good_bytes]
                f = frames[int(rng.integers(0, len(frames)))]
                if f:
                    f[int(rng.integers(0, len(f)))] ^= 0xFF
                frames = [bytes(f) for f in frames]
            elif choice == 3:  # truncated frames
                frames = [f[: int(rng.integers(0, len(f) + 1))] for f in good_bytes]
            elif choice == 4:  # random msgpack structures as header
                bags = int(rng.integers(-5, 5))
                value = {
                    "v": VERSION,
                    "op": "lookup",
                    "id": int(rng.integers(0, 9)),
                    "parts": [
                        {"table": ["x"], "row_start": [0], "bags": [bags], "mode": ["sum"]},
                        {"table": "x", "bags": [bags]},
                        {"table": ["x"], "row_start": [0, 1], "bags": [bags], "mode": ["sum"]},
                        {"table": [1], "row_start": [0], "bags": [bags], "mode": [["sum"]]},
                        [{"table": "x", "bags": bags}],
                    ][int(rng.integers(0, 5))],
                    "id_dtype": ["<i8", "<i4", 3, None][int(rng.integers(0, 4))],
                    "weighted": [True, False, "no"][int(rng.integers(0, 3))],
                }
                frames = [msgpack.packb(value), *good_bytes[1:]]
            else:  # frames dropped or repeated
                frames = good_bytes[: int(rng.integers(1, 4))] * int(rng.integers(1, 3))
            sock.send_multipart(frames)
            sent += 1
        replies = 0
        while replies < sent and sock.poll(10_000):
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            assert isinstance(reply, dict) and "ok" in reply
            if not reply["ok"]:
                assert reply["error"]["kind"] and reply["error"]["message"]
            replies += 1
    assert replies == sent
    assert proc.poll() is None
    groups = asyncio.run(lookup(endpoint, parts, ids, lengths))
    want = reference(model, parts, ids_pp, len_pp, w_pp, False)
    for g in groups:
        for j, i in enumerate(g.parts):
            np.testing.assert_allclose(g.pooled[:, j, :], want[i], rtol=1e-5, atol=1e-5)


def test_deadline_in_the_past_is_refused_without_work(shards, model_and_plan) -> None:
    endpoint = shards[0][0]
    _, _, plan = model_and_plan
    parts, ids, lengths, *_ = make_lookup(plan, 0, seed=1)
    frames = encode_lookup(1, now_ms() - 1, parts, ids, lengths)
    expect_error(endpoint, frames, "deadline_exceeded")


def test_client_deadline_against_a_silent_endpoint() -> None:
    # Nothing listens: the call must fail within its deadline, naming the shard.
    start = time.monotonic()
    with pytest.raises(RecserveError, match="did not answer within"):
        asyncio.run(
            lookup(
                f"tcp://127.0.0.1:{free_port()}",
                [PartRequest("t", 0, 1)],
                np.array([0]),
                np.array([1]),
                deadline_ms=now_ms() + 300,
            )
        )
    assert time.monotonic() - start < 2.0


def test_overload_is_refused_at_once(model_and_plan, tmp_path: Path) -> None:
    """One large lookup holds the only slot; lookups sent meanwhile are refused at once."""
    model, plan_path, plan = model_and_plan
    endpoint = f"ipc://{tmp_path}/busy.sock"
    big = big_lookup(plan, 4_000_000)
    small = big_lookup(plan, 1, bags=1)

    async def run() -> tuple[object, list[object]]:
        ctx = zmq.Context()
        client = ShardClient(endpoint, ctx)
        try:
            held = asyncio.ensure_future(
                client.lookup(*big[:2], big[2], deadline=Deadline.after(60_000))
            )
            async with asyncio.timeout(20):
                while (await client.simple("health", Deadline.after(5000)))["inflight"] < 1:
                    await asyncio.sleep(0.001)
            start = time.monotonic()
            refused = await asyncio.gather(
                *(
                    client.lookup(*small[:2], small[2], deadline=Deadline.after(60_000))
                    for _ in range(5)
                ),
                return_exceptions=True,
            )
            assert time.monotonic() - start < 1.0
            return await held, refused
        finally:
            await client.close()
            ctx.term()

    with running(plan_path, model, 0, endpoint, "--queue-limit", "1", "--kernel-threads", "1"):
        done, refused = asyncio.run(run())
    assert isinstance(done, list)
    assert all(isinstance(r, Overloaded) for r in refused), refused
