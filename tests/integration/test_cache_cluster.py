"""``recserve up --cache-bytes``: a cluster whose shards serve from row caches of ~10 % of
their rows scores as the model does offline, its shards' /metrics pass promtool with the
cache's series, and a shard restarted in place warms from the trace it wrote."""

from __future__ import annotations

import asyncio
import re
import signal
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest

from recserve.cli import main as cli
from recserve.client import Client, columns_of
from recserve.contracts.manifest import read_manifest
from recserve.contracts.plan import read_plan
from recserve.local.cluster import LocalCluster, free_port
from recserve.local.offline import predict
from recserve.model.scorer import Model
from recserve.model.workload import scatter, zipf_ranks
from recserve.rpc.wire import PartRequest
from tests.integration.shardd.helpers import lookup
from tests.integration.shards import header, raw, running
from tests.promtool import check_metrics


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cached-up")
    assert cli(["synth", "--profile", "drm1", "--size", "8MiB", "--out", str(root / "m")]) == 0
    return root / "m"


def samples(model: Path, n: int, seed: int) -> list[dict]:
    manifest = read_manifest(model)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sparse = {}
        for t in manifest.tables:
            for f in t.features:
                k = int(rng.integers(0, 6))
                sparse[f] = scatter(zipf_ranks(rng, k, t.rows, 1.05), t.rows).tolist()
        out.append({"dense": rng.random(manifest.dense_width).tolist(), "sparse": sparse})
    return out


def scores(client: Client, model: Path, batch: list[dict]) -> np.ndarray:
    features = [f for t in read_manifest(model).tables for f in t.features]
    return client.predict(*columns_of(batch, features))


def test_cached_cluster_scores_as_the_model(model: Path) -> None:
    offline = Model.open(model)
    cache = (8 << 20) // 20  # ~10 % of each shard's rows
    with LocalCluster(
        model, shards=2, strategy="capacity", port=free_port(), cache_bytes=cache
    ) as c:
        client = Client(c.url)
        for seed in range(6):
            batch = samples(model, 64, seed)
            got = scores(client, model, batch)
            np.testing.assert_allclose(got, predict(offline, batch), rtol=1e-5, atol=1e-6)
        endpoint = c.plan.shard(0).endpoints[0]
        before = msgpack.unpackb(raw(endpoint, [header("stats")])[0])["cache"]
        assert before["hits"] > 0 and before["misses"] > 0 and before["evictions"] > 0, before
        # Restart shard 0 in place: it writes its trace at SIGTERM and warms from it.
        c.shards[0].send_signal(signal.SIGTERM)
        assert c.shards[0].wait(30) == 0
        c.shards[0] = c.start_shard(0, 0)
        c.wait_ready(0, 0, c.shards[0], 60)
        info = msgpack.unpackb(raw(endpoint, [header("info")])[0])["cache"]
        assert info["rows_cached"] >= 0.9 * before["rows_cached"], (info, before)
        batch = samples(model, 64, 99)
        got = scores(client, model, batch)
        np.testing.assert_allclose(got, predict(offline, batch), rtol=1e-5, atol=1e-6)
        after = msgpack.unpackb(raw(endpoint, [header("stats")])[0])["cache"]
        assert after["hit_rate"] > 0.5 * before["hit_rate"], (after, before)


def test_cached_shard_metrics_pass_promtool(model: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    assert cli(["plan", "--model", str(model), "--shards", "1", "--out", str(plan)]) == 0
    port = free_port()
    endpoint = f"ipc://{tmp_path}/s.sock"
    with running(plan, model, 0, endpoint, "--cache-bytes", "4MiB", "--metrics-port", str(port)):
        part = read_plan(plan).shard(0).parts[0]
        ids = np.arange(part.row_start, min(part.row_end, part.row_start + 40))
        req = [PartRequest(part.table, part.row_start, ids.size)]
        asyncio.run(lookup(endpoint, req, ids, np.ones(ids.size, np.int32)))
        asyncio.run(lookup(endpoint, req, ids, np.ones(ids.size, np.int32)))  # hits
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    text = body.decode()
    hits = re.search(r"^recserve_shard_cache_hits_total (\S+)$", text, re.M)
    assert hits and float(hits.group(1)) > 0, text
    for name in (
        "recserve_shard_cache_hits_total",
        "recserve_shard_cache_misses_total",
        "recserve_shard_cache_evictions_total",
        "recserve_shard_cache_bytes",
        "recserve_shard_disk_read_seconds_bucket",
    ):
        assert name in text, name
    check_metrics(text)
