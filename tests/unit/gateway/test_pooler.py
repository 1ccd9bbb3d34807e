"""The gateway routes a batch to shards and packs each shard's parts into wire frames."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zmq

from gateway.config import ReplicaSettings
from gateway.metrics import GatewayMetrics
from gateway.pooler import ShardedPooler
from gateway.routing import Router, ShardRequest
from recserve.contracts.batch import Bags, Batch
from recserve.contracts.manifest import TableSpec
from recserve.contracts.plan import local_endpoints
from recserve.planning import build
from recserve.rpc.client import Into
from recserve.rpc.wire import PartRequest
from tests.models import manifest_of


def request(narrow: bool) -> ShardRequest:
    req = ShardRequest(narrow=narrow)
    for name, ids, lengths, weights in (
        ("a", np.array([5, 2**31 - 1, 0]), np.array([2, 1]), None),
        ("b", np.array([7]), np.array([0, 1]), np.array([0.5], np.float32)),
    ):
        req.parts.append(PartRequest(name, 0, len(lengths)))
        req.ids.append(ids.astype(np.int64))
        req.lengths.append(lengths.astype(np.int64))
        req.weights.append(weights)
    return req


def test_ids_travel_as_int32_when_every_table_fits() -> None:
    ids, lengths, weights = request(narrow=True).frames()
    assert ids.dtype == np.int32 and ids.tolist() == [5, 2**31 - 1, 0, 7]
    assert lengths.dtype == np.int32 and lengths.tolist() == [2, 1, 0, 1]
    assert weights is not None and weights.tolist() == [1.0, 1.0, 1.0, 0.5]


def test_ids_stay_int64_for_a_table_past_int32() -> None:
    ids, _, weights = request(narrow=False).frames()
    assert ids.dtype == np.int64 and ids.tolist() == [5, 2**31 - 1, 0, 7]
    assert weights is not None


def test_route_sends_int32_ids_unless_a_table_exceeds_int32() -> None:
    """The router decides per shard: int32 when every table it asks of the shard has at
    most 2**31 rows, int64 otherwise (no table file is needed to route)."""
    huge = 2**31 + 10
    manifest = manifest_of(
        (
            TableSpec("big", huge, 4, features=("fb",), net="user"),
            TableSpec("small", 100, 4, features=("fs",), net="item"),
        ),
        2,
    )
    per_shard = manifest.table("big").nbytes  # the big table fills one shard whole
    plan = build(manifest, 2, "net", local_endpoints(2, 1), shard_memory=per_shard)
    router = Router(manifest, plan)
    ids = {"fb": np.array([huge - 1, 3], np.int64), "fs": np.array([7, 99], np.int64)}
    b = Batch(
        np.zeros((2, 2), np.float32),
        {f: Bags(v, np.array([0, 1, 2], np.int64)) for f, v in ids.items()},
    )
    routes = router.route(b)
    by_table = {p.table: s for s, req in routes.items() for p in req.parts}
    assert by_table["big"] != by_table["small"]
    big_ids = routes[by_table["big"]].frames()
    small_ids = routes[by_table["small"]].frames()
    assert big_ids[0].dtype == np.int64 and big_ids[0].tolist() == [huge - 1, 3]
    assert small_ids[0].dtype == np.int32 and small_ids[0].tolist() == [7, 99]


def test_batches_get_arrays_in_an_arena_renewed_once_lost_lookups_hold_a_quarter() -> None:
    """Shards on this host (loopback): each batch gets its pooled array in the batch arena
    (a column per placeable part); with no room it is merged as before, and once arrays
    held for replies that never came are a quarter of the arena, a new arena replaces it
    and the clients stop holding the old one's."""
    manifest = manifest_of(
        tuple(TableSpec(f"t{i}", 50, 8, features=(f"f{i}",)) for i in range(3)), 2
    )
    plan = build(manifest, 2, "capacity", local_endpoints(2, 1))
    b = Batch(
        np.zeros((4, 2), np.float32),
        {f"f{i}": Bags(np.arange(4), np.arange(5)) for i in range(3)},
    )

    async def run(executor: ThreadPoolExecutor, ctx: zmq.Context) -> None:
        pooler = ShardedPooler(manifest, plan, ctx, executor, GatewayMetrics.create(),
                               ReplicaSettings(shm_bytes=1 << 20), batch_samples=4)  # fmt: skip
        try:
            assert pooler.arena is not None and pooler.arena.size == 1 << 20
            routes = pooler.prepare(b)
            for shard, req in routes.items():  # packed straight into the replica's arena
                assert req.lent is not None and req.packed is not None
                assert req.lent.arena is pooler.replicas[shard].replicas[0].client.arena
                want = req.frames()
                assert req.packed[2] is None and want[2] is None  # no weights
                for got, expected in zip(req.packed[:2], want[:2], strict=True):
                    assert got is not None and expected is not None
                    assert np.shares_memory(got, req.lent.base)
                    assert got.dtype == expected.dtype and np.array_equal(got, expected)
            half = Bags(np.arange(4), np.arange(5), np.full(4, 0.5, np.float32))
            weighted = pooler.prepare(Batch(b.dense, {**b.bags, "f1": half}))
            req = next(r for r in weighted.values() if any(w is not None for w in r.weights))
            assert req.lent is not None and req.packed is not None and req.packed[2] is not None
            assert np.shares_memory(req.packed[2], req.lent.base)
            assert np.array_equal(req.packed[2], req.frames()[2])  # unweighted parts' ids: 1
            into = pooler._into(b, routes)
            assert set(into) == set(routes)
            array = next(iter(into.values())).array
            assert array.shape == (4, 3, 8) and all(i.array is array for i in into.values())
            placed = sorted(c for i in into.values() for c in i.cols if c >= 0)
            assert placed == [0, 1, 2]  # every feature a column of its own
            # Fill the arena: a batch that finds no room is merged from the replies.
            held = [array]
            while got := pooler._into(b, routes):
                held.append(next(iter(got.values())).array)
            first = pooler.arena
            # Arrays held for lookups that were never answered: a quarter, then a new arena.
            client = pooler.clients[0]
            for k, a in enumerate(held[: len(held) // 4 + 1]):
                client.held[k] = Into(first, a, {}, (0,))
            again = pooler._into(b, routes)
            assert again and pooler.arena is not first and not client.held
            assert not first.path.exists()
        finally:
            await pooler.close()

    ctx: zmq.Context = zmq.Context()
    try:
        with ThreadPoolExecutor(1) as executor:
            asyncio.run(run(executor, ctx))
    finally:
        ctx.term()
