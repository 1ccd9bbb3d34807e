"""The sharded pooler's route and merge against the singular model's pooling.

One layer in process: the shards are ``PartStore``s fed the frames ``route`` packs, through
the wire module's encode and decode; no sockets. The plan splits the largest table (mean
pooled) by rows; batches are flat, ranking (shared context bags) and merged rankings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.requests import merge, parse_request
from gateway.routing import Merger, Router
from recserve.contracts.batch import Batch
from recserve.contracts.manifest import Manifest, TableSpec
from recserve.contracts.plan import Plan, local_endpoints
from recserve.model.scorer import Model
from recserve.planning import build
from recserve.rpc.client import PooledGroup
from recserve.rpc.wire import decode_header, decode_lookup, encode_lookup
from shardd.store import PartStore
from tests.models import manifest_of, write_random

DIM = 4
TABLES = (
    TableSpec("big", 4000, DIM, pooling="mean", features=("f0",)),
    TableSpec("t1", 300, DIM, features=("f1", "f2")),
    TableSpec("t2", 200, DIM, pooling="mean", features=("f3",)),
    TableSpec("t3", 100, DIM, features=("f4",)),
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest, Plan]:
    root = tmp_path_factory.mktemp("merge")
    manifest = write_random(root, manifest_of(TABLES, 2, name="merge"))
    # A shard's memory just over the even share: the big table must be split by rows.
    total = sum(t.rows * t.row_bytes for t in TABLES)
    plan = build(manifest, 3, "capacity", local_endpoints(3, 1), shard_memory=total / 2.5)
    assert plan.report["split_tables"]
    return root, manifest, plan


def bag(rng: np.random.Generator, rows: int) -> list[int]:
    return rng.integers(0, rows, int(rng.integers(0, 6))).tolist()


def ranking(rng: np.random.Generator, candidates: int) -> dict:
    return {
        "context": {"dense": [0.5, -1.0], "sparse": {"f1": bag(rng, 300), "f3": bag(rng, 200)}},
        "candidates": [
            {"sparse": {"f0": bag(rng, 4000), "f2": bag(rng, 300), "f4": bag(rng, 100)}}
            for _ in range(candidates)
        ],
    }


def flat(rng: np.random.Generator, samples: int) -> dict:
    rows = {"f0": 4000, "f1": 300, "f2": 300, "f3": 200, "f4": 100}
    return {
        "samples": [
            {"dense": [1.0, 2.0], "sparse": {f: bag(rng, r) for f, r in rows.items()}}
            for _ in range(samples)
        ]
    }


def batches(manifest: Manifest) -> list[Batch]:
    rng = np.random.default_rng(7)
    one = parse_request(ranking(rng, 5), manifest)
    return [
        parse_request(flat(rng, 6), manifest),
        one,
        parse_request(ranking(rng, 1), manifest),  # one candidate: context and item bags alike
        merge(
            [one, parse_request(ranking(rng, 3), manifest), parse_request(flat(rng, 2), manifest)]
        ),
    ]


def test_merged_shard_replies_equal_the_singular_pooling(setup) -> None:
    root, manifest, plan = setup
    stores = {s.id: PartStore(root, manifest, s) for s in plan.shards}
    model = Model.open(root)

    router = Router(manifest, plan)
    merger = Merger(manifest, router)
    for batch in batches(manifest):
        routes = router.route(batch)
        replies = {}
        for shard_id, req in routes.items():
            frames = encode_lookup(1, None, req.parts, *req.frames())
            lookup = decode_lookup(decode_header(frames[0]), frames[1:])
            replies[shard_id] = [
                PooledGroup(g.parts, g.pooled) for g in stores[shard_id].pool(lookup)
            ]
        got = merger.merge(batch, routes, replies)
        np.testing.assert_allclose(got, model.pool(batch), rtol=1e-5, atol=1e-6)
