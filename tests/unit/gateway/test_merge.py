"""The sharded pooler's route and merge against the singular model's pooling.

One layer in process: the shards are ``PartStore``s fed the frames ``route`` packs, through
the wire module's encode and decode; no sockets. The plan splits the largest table (mean
pooled) by rows; batches are flat, ranking (shared context bags) and merged rankings.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zmq

from gateway.metrics import GatewayMetrics
from gateway.pooler import ShardedPooler
from recserve.artifact import ArtifactWriter
from recserve.batch import Batch, merge, parse_request
from recserve.manifest import DenseSpec, InteractionSpec, Manifest, MLPSpec, TableSpec
from recserve.model import Model
from recserve.plan import Plan, local_endpoints
from recserve.planner import build
from recserve.shardclient import PooledGroup
from recserve.wire import decode_header, decode_lookup, encode_lookup
from shardd.store import PartStore

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
    n = sum(len(t.features) for t in TABLES)
    inter = InteractionSpec("dot")
    manifest = Manifest(
        "merge",
        "1",
        2,
        TABLES,
        DenseSpec(
            MLPSpec((2, DIM), ("relu",)),
            inter,
            MLPSpec((inter.kernel().output_width(DIM, n), 1), ("sigmoid",)),
        ),
    )
    writer = ArtifactWriter(root)
    rng = np.random.default_rng(0)
    for t in TABLES:
        writer.write_table_array(t, rng.standard_normal((t.rows, t.dim)).astype(np.float32))
    writer.write_dense(
        {
            "bottom.0.weight": rng.random((DIM, 2)),
            "bottom.0.bias": np.zeros(DIM),
            "top.0.weight": rng.random((1, manifest.dense.top.sizes[0])),
            "top.0.bias": np.zeros(1),
        }
    )
    manifest = writer.finish(manifest)
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

    async def run() -> None:
        ctx = zmq.Context()
        pooler = ShardedPooler(manifest, plan, ctx, ThreadPoolExecutor(1), GatewayMetrics.create())
        try:
            for batch in batches(manifest):
                routes = pooler.route(batch)
                replies = {}
                for shard_id, req in routes.items():
                    assert req.packed is not None
                    frames = encode_lookup(1, None, req.parts, *req.packed)
                    lookup = decode_lookup(decode_header(frames[0]), frames[1:])
                    replies[shard_id] = [
                        PooledGroup(g.parts, g.pooled) for g in stores[shard_id].pool(lookup)
                    ]
                got = pooler.merge(batch, routes, replies)
                np.testing.assert_allclose(got, model.pool(batch), rtol=1e-5, atol=1e-6)
        finally:
            await pooler.close()
            ctx.term()

    asyncio.run(run())
