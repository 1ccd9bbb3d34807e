"""``--admin-port``: updates go to an admin worker of their own; two serving workers follow
its versions, rows and dense weights alike, each response at the scores of the version it
names (against ``recserve predict`` on a copy of the artifact with the changes written in),
a deploy too; the serving port refuses updates with 421 naming the admin port."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest

from recserve.cli import main as cli
from recserve.contracts.manifest import DENSE_FILE, read_manifest
from recserve.local.cluster import LocalCluster, free_port
from recserve.local.offline import predict
from recserve.model.artifact import read_dense
from recserve.model.scorer import Model
from recserve.model.workload import Workload
from tests.integration.test_updates import (
    NPZ,
    TOKEN,
    an_update,
    post,
    reading,
    replaced,
    scores,
    with_dense,
    write_npz,
)
from tests.promtool import check_metrics


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("follow")
    argv = ["synth", "--profile", "drm3", "--size", "4MiB", "--seed", "5"]
    assert cli([*argv, "--out", str(root / "m")]) == 0
    return root / "m"


def test_serving_workers_follow_the_admin_workers_versions(model: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    manifest = read_manifest(model)
    samples = Workload(manifest, seed=2).samples(24)
    admin_port = free_port()
    cluster = LocalCluster(
        model, shards=3, strategy="capacity", port=free_port(), admin_token_file=token,
        admin_port=admin_port, gateway_args=("--workers", "2", "--timeout-ms", "5000"),
    )  # fmt: skip
    with cluster as c:
        split = c.plan.report["split_tables"][0]
        first = an_update(model, 1, split)
        body = write_npz(tmp_path / "u1.npz", first).read_bytes()
        status, doc = post(c.url + "/v1/updates", body, NPZ)
        assert status == 421 and doc["error"]["field"] == "port", doc
        assert str(admin_port) in doc["error"]["message"]

        argv = ["push", "--url", c.admin_url, "--token-file", str(token)]
        assert cli([*argv, "--updates", str(tmp_path / "u1.npz")]) == 0
        want1 = predict(replaced(model, tmp_path / "v1", [first]), samples)
        for _ in range(4):  # a connection each: the two workers in turn
            version, got = scores(c.url, samples)
            assert version == 1
            np.testing.assert_allclose(got, want1, rtol=1e-5, atol=1e-6)

        # New dense weights: the admin answers once both workers hold them.
        current = read_dense(model / DENSE_FILE)
        rng = np.random.default_rng(3)
        dense = {k: rng.standard_normal(current[k].shape).astype(np.float32) * 0.1
                 for k in ("top.0.bias", "bottom.0.weight")}  # fmt: skip
        body = msgpack.packb({"dense": {k: v.tolist() for k, v in dense.items()}})
        status, doc = post(c.admin_url + "/v1/updates", body, "application/msgpack")
        assert status == 200 and doc["version"] == 2, doc
        want2 = predict(with_dense(model, tmp_path / "v2", [first], [dense]), samples)
        assert not np.allclose(want2, want1)
        for _ in range(4):
            version, got = scores(c.url, samples)
            assert version == 2
            np.testing.assert_allclose(got, want2, rtol=1e-5, atol=1e-6)

        # Pushes while both workers serve: every response matches the version it names.
        pushed = [an_update(model, 10 + k, split) for k in range(3)]
        with reading(c.url, samples) as seen:
            for k, update in enumerate(pushed):
                body = write_npz(tmp_path / f"p{k}.npz", update).read_bytes()
                status, doc = post(c.admin_url + "/v1/updates", body, NPZ)
                assert status == 200 and doc["version"] == 3 + k, doc
        want = {2: want2}
        for k in range(3):
            copy = with_dense(model, tmp_path / f"w{k}", [first, *pushed[: k + 1]], [dense])
            want[3 + k] = predict(copy, samples)
        assert seen and {v for v, _ in seen} <= set(want)
        for v, got in seen:
            np.testing.assert_allclose(got, want[v], rtol=1e-5, atol=1e-6)
        version, got = scores(c.url, samples)
        assert version == 5
        np.testing.assert_allclose(got, want[5], rtol=1e-5, atol=1e-6)

        # Either port's /metrics: every worker's, the admin's updates among them.
        for url in (c.url, c.admin_url):
            with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                text = r.read().decode()
            check_metrics(text)
            assert re.search(r"^recserve_gateway_versions_committed_total 5\.0$", text, re.M)
            assert re.search(r"^recserve_gateway_model_version 5\.0$", text, re.M)


def test_a_deploy_through_the_admin_port_reaches_every_serving_worker(
    models, tmp_path: Path
) -> None:
    a, b, _ = models
    token = tmp_path / "token"
    token.write_text(TOKEN)
    samples = Workload(read_manifest(a), seed=4).samples(16)
    want = {0: predict(Model.open(a), samples), 1: predict(Model.open(b), samples)}
    cluster = LocalCluster(
        a, shards=2, strategy="capacity", port=free_port(), admin_token_file=token,
        admin_port=free_port(), gateway_args=("--workers", "2", "--timeout-ms", "5000"),
    )  # fmt: skip
    with cluster as c:
        with reading(c.url, samples) as seen:  # every response a 200
            deploy = ["deploy", "--url", c.admin_url, "--token-file", str(token)]
            assert cli([*deploy, "--model", str(b)]) == 0
            time.sleep(0.3)
        assert {v for v, _ in seen} == {0, 1}, {v for v, _ in seen}
        for v, got in seen:
            np.testing.assert_allclose(got, want[v], rtol=1e-5, atol=1e-6)
        for _ in range(4):  # both workers: the new artifact's scores and description
            version, got = scores(c.url, samples)
            assert version == 1
            np.testing.assert_allclose(got, want[1], rtol=1e-5, atol=1e-6)
            with urllib.request.urlopen(c.url + "/v1/model", timeout=10) as r:
                assert json.loads(r.read())["digest"] == read_manifest(b).digest()
