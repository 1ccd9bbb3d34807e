"""The gateway routes a batch to shards and packs each shard's parts into wire frames."""

from __future__ import annotations

import numpy as np

from gateway.routing import Router, ShardRequest
from recserve.contracts.batch import Bags, Batch
from recserve.contracts.manifest import TableSpec
from recserve.contracts.plan import local_endpoints
from recserve.planning import build
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
    big_ids = routes[by_table["big"]].packed
    small_ids = routes[by_table["small"]].packed
    assert big_ids is not None and small_ids is not None
    assert big_ids[0].dtype == np.int64 and big_ids[0].tolist() == [huge - 1, 3]
    assert small_ids[0].dtype == np.int32 and small_ids[0].tolist() == [7, 99]
