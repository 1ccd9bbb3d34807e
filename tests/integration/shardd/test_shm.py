"""Lookups through shared memory with real shard daemons on this host (shard 0 over ipc,
shard 1 over loopback tcp): the same values as over the socket, the arena's regions
returned, hostile maps refused, and a shard that cannot map the arena falls back."""

from __future__ import annotations

import asyncio
import gc

import msgpack
import numpy as np
import pytest
import zmq

from recserve.contracts.manifest import read_manifest
from recserve.rpc.client import Into, ShardClient
from recserve.rpc.deadline import Deadline, now_ms
from recserve.rpc.shm import KEY_BYTES, Arena
from tests.integration.shardd.helpers import expect_error, make_lookup, reference
from tests.integration.shards import header, raw

DIM = 128  # the drm3 test model's (checked below)


async def through_shm(endpoint, request, deadline_ms=10_000, client_hook=None):
    """``request``'s groups from a shm client, its arena's lent bytes while they live and
    after, and whether the client still has its arena."""
    parts, ids, lengths, weights = request
    ctx = zmq.Context()
    client = ShardClient(endpoint, ctx, shm_bytes=1 << 20)
    assert client.arena is not None
    try:
        if client_hook is not None:
            client_hook(client)
        groups = await client.lookup(
            parts, ids, lengths, weights=weights, dim=DIM,
            deadline=Deadline(now_ms() + deadline_ms),
        )  # fmt: skip
        arena = client.arena
        lent = arena.lent if arena is not None else None
        values = [(g.parts, g.pooled.copy()) for g in groups]
        del groups
        gc.collect()
        return values, lent, arena.lent if arena is not None else None, arena is not None
    finally:
        await client.close()
        ctx.term()


@pytest.mark.parametrize("weighted, dtype", [(False, np.int64), (True, np.int32)])
def test_shm_lookups_equal_the_reference(shards, model_and_plan, weighted, dtype) -> None:
    endpoints, _, _ = shards
    model, _, plan = model_and_plan
    assert read_manifest(model).embedding_dim == DIM
    for k, endpoint in enumerate(endpoints):
        parts, ids, lengths, weights, ids_pp, len_pp, w_pp = make_lookup(
            plan, k, seed=10 + k, weighted=weighted, dtype=dtype
        )
        groups, lent, after, kept = asyncio.run(
            through_shm(endpoint, (parts, ids, lengths, weights))
        )
        assert kept and lent > 0, "the reply was read from the arena"
        assert after == 0, "the region came back once the reply's arrays were gone"
        want = reference(model, parts, ids_pp, len_pp, w_pp, weighted)
        seen = set()
        for idx, pooled in groups:
            for j, i in enumerate(idx):
                np.testing.assert_allclose(pooled[:, j, :], want[i], rtol=1e-5, atol=1e-5)
                seen.add(i)
        assert seen == set(range(len(parts)))


@pytest.mark.parametrize("weighted", [False, True])
def test_placed_parts_are_pooled_straight_into_the_batch_array(
    shards, model_and_plan, weighted
) -> None:
    """A lookup with ``into``: the parts given a column are pooled into that column of the
    batch's array (another arena), the others answered in groups; every other column of
    the array is left as it was, and the array's region comes back once it is let go."""
    endpoint = shards[0][0]
    model, _, plan = model_and_plan
    parts, ids, lengths, weights, ids_pp, len_pp, w_pp = make_lookup(
        plan, 0, seed=31, weighted=weighted
    )
    width = len(parts) + 2
    cols = tuple(width - 1 - i if i % 2 == 0 else -1 for i in range(len(parts)))
    batch = Arena(1 << 20)

    async def run():
        ctx = zmq.Context()
        client = ShardClient(endpoint, ctx, shm_bytes=1 << 20)
        try:
            got = batch.array((9, width, DIM))
            assert got is not None
            array, spec = got
            array[:] = -3.0
            groups = await client.lookup(
                parts, ids, lengths, weights=weights, dim=DIM,
                deadline=Deadline.after(10_000), into=Into(batch, array, spec, cols),
            )  # fmt: skip
            return array.copy(), [(g.parts, g.pooled.copy()) for g in groups], groups.into
        finally:
            await client.close()
            ctx.term()

    try:
        array, groups, placed = asyncio.run(run())
        gc.collect()
        assert batch.lent == 0
    finally:
        batch.close()
    want = reference(model, parts, ids_pp, len_pp, w_pp, weighted)
    assert placed == {i for i, c in enumerate(cols) if c >= 0}
    for i in placed:
        np.testing.assert_allclose(array[:, cols[i], :], want[i], rtol=1e-5, atol=1e-5)
    untouched = set(range(width)) - {cols[i] for i in placed}
    assert all((array[:, c, :] == -3.0).all() for c in untouched)
    answered = {i for idx, _ in groups for i in idx}
    assert answered == set(range(len(parts))) - placed
    for idx, pooled in groups:
        for j, i in enumerate(idx):
            np.testing.assert_allclose(pooled[:, j, :], want[i], rtol=1e-5, atol=1e-5)


def test_a_shard_that_cannot_map_the_arena_is_asked_over_the_socket(shards, model_and_plan) -> None:
    """The arena's file is gone before the first lookup (as on another host): the shard
    answers shm_unavailable, the client drops its arena and asks again with frames."""
    endpoint = shards[0][0]
    model, _, plan = model_and_plan
    parts, ids, lengths, _, ids_pp, len_pp, w_pp = make_lookup(plan, 0, seed=21)
    groups, _, _, kept = asyncio.run(
        through_shm(endpoint, (parts, ids, lengths, None), client_hook=lambda c: c.arena.close())
    )
    assert not kept
    want = reference(model, parts, ids_pp, len_pp, w_pp, False)
    for idx, pooled in groups:
        for j, i in enumerate(idx):
            np.testing.assert_allclose(pooled[:, j, :], want[i], rtol=1e-5, atol=1e-5)


def test_a_timed_out_lookups_region_waits_for_the_shards_late_reply(shards, model_and_plan) -> None:
    endpoint = shards[0][0]
    _, _, plan = model_and_plan
    parts, ids, lengths, *_ = make_lookup(plan, 0, seed=22)

    batch = Arena(1 << 20)

    async def run():
        ctx = zmq.Context()
        client = ShardClient(endpoint, ctx, shm_bytes=1 << 20)
        try:
            await client.simple("health", Deadline.after(5000))  # connected: the next is sent
            # In a task of its own, as a request's (its timeout's traceback, which holds
            # the lookup's frames, lives as long as the task).
            got = batch.array((9, len(parts), DIM))
            assert got is not None
            into = Into(batch, *got, tuple(range(len(parts))))
            task = asyncio.ensure_future(
                client.lookup(
                    parts, ids, lengths, dim=DIM, deadline=Deadline(now_ms() - 1), into=into
                )
            )  # sent, then given up at once
            del got, into
            await asyncio.wait([task])
            assert "did not answer" in str(task.exception())
            del task  # held until the shard's reply (deadline_exceeded): the rotation
            # test of the client shows a region held while no reply comes
            gc.collect()
            assert batch.lent and list(client.held)  # the batch array too
            async with asyncio.timeout(5):
                while client.arena.lent or batch.lent:  # its reply frees both
                    await asyncio.sleep(0.01)
                    gc.collect()
            assert not client.held
        finally:
            await client.close()
            ctx.term()

    try:
        asyncio.run(run())
    finally:
        batch.close()


def test_hostile_shm_maps_get_typed_errors(shards, model_and_plan) -> None:
    endpoint = shards[0][0]
    _, _, plan = model_and_plan
    part = plan.shard(0).parts[0]
    arena = Arena(1 << 16)
    try:
        arena.map[64:72] = np.int64(part.row_start).tobytes()  # one id
        arena.map[128:132] = np.array([1], np.int32).tobytes()  # in one bag
        good = {"path": str(arena.path), "key": arena.key.hex(), "ids": [64, 8],
                "lengths": [128, 4], "out": [256, 4 * DIM]}  # fmt: skip

        def lookup(**shm):
            return header(
                "lookup",
                parts={"table": [part.table], "row_start": [part.row_start], "bags": [1],
                       "mode": ["sum"]},
                id_dtype="<i8", weighted=False, shm={**good, **shm},
            )  # fmt: skip

        reply = msgpack.unpackb(raw(endpoint, [lookup()])[0])
        assert reply["ok"] and reply["groups"][0]["offset"] == 256, reply
        for shm, kind, field in [
            ({"path": "/etc/passwd"}, "bad_request", "shm"),
            ({"path": f"{arena.path}/../x"}, "bad_request", "shm"),
            ({"key": "00" * KEY_BYTES}, "shm_unavailable", None),
            ({"out": [1 << 20, 64]}, "bad_request", "shm.out"),
            ({"out": [256, 8]}, "bad_request", "shm.out"),
            ({"ids": [-8, 8]}, "bad_request", "shm.ids"),
            ({"lengths": [0, 4]}, "bad_request", "shm.lengths"),
        ]:
            reply = msgpack.unpackb(raw(endpoint, [lookup(**shm)])[0])
            assert not reply["ok"] and reply["error"]["kind"] == kind, (shm, reply)
            assert reply["error"].get("field") == field, (shm, reply)
        expect_error(endpoint, [lookup(), b"a frame too many"], "bad_request")
        into = {"path": str(arena.path), "key": arena.key.hex(), "at": 1024,
                "shape": [1, 2, DIM], "cols": [1]}  # fmt: skip

        def pooled_into(**bad):
            return msgpack.packb({**msgpack.unpackb(lookup()), "into": {**into, **bad}})

        reply = msgpack.unpackb(raw(endpoint, [pooled_into()])[0])
        assert reply["ok"] and reply["into"] == [0] and reply["groups"] == [], reply
        for bad, kind, field in [
            ({"shape": [2, 2, DIM]}, "bad_request", "into.shape"),  # 1 bag, not 2 rows
            ({"shape": [1, 2, DIM // 2]}, "bad_request", "into.shape"),  # another dim
            ({"shape": [1, 2]}, "bad_request", "into.shape"),
            ({"cols": [2]}, "bad_request", "into.cols"),
            ({"cols": [0, 1]}, "bad_request", "into.cols"),
            ({"cols": ["0"]}, "bad_request", "into.cols"),
            ({"at": 1 << 16}, "bad_request", "into"),  # past the arena's end
            ({"at": 8}, "bad_request", "into"),  # over its key
            ({"at": 1026}, "bad_request", "into.at"),
            ({"key": "00" * KEY_BYTES}, "shm_unavailable", None),
            ({"path": "/etc/passwd"}, "bad_request", "shm"),
            ({"extra": 1}, "bad_request", "into"),
        ]:
            reply = msgpack.unpackb(raw(endpoint, [pooled_into(**bad)])[0])
            assert not reply["ok"] and reply["error"]["kind"] == kind, (bad, reply)
            assert reply["error"].get("field") == field, (bad, reply)
        assert msgpack.unpackb(raw(endpoint, [header("health")])[0])["ready"]
    finally:
        arena.close()
