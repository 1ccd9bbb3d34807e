"""Deploying a new artifact to a running cluster (``recserve deploy``): no request fails
while it switches, each response's scores are those of the artifact its version names, and
the new artifact stays served after restarts: of the gateway, of a replica (its state
directory records it) and of a replica that was down during the deploy (its peers serve it)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import msgpack
import numpy as np

from recserve.cli import main as cli
from recserve.contracts.manifest import read_manifest
from recserve.local.cluster import LocalCluster, free_port
from recserve.local.offline import predict
from recserve.model.scorer import Model
from recserve.model.workload import Workload
from tests.integration.shards import header, raw
from tests.integration.test_updates import (
    TOKEN,
    an_update,
    post,
    reading,
    replaced,
    scores,
    write_npz,
)


def get_json(url: str) -> tuple[int, dict]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, json.loads(r.read())


def test_deploy_switches_with_no_failed_request(models, tmp_path: Path) -> None:
    a, b, other = models
    token = tmp_path / "token"
    token.write_text(TOKEN)
    samples = Workload(read_manifest(a), seed=2).samples(32)
    want = {0: predict(Model.open(a), samples), 1: predict(Model.open(b), samples)}
    assert not np.allclose(want[0], want[1])
    cluster = LocalCluster(a, shards=2, replicas=2, strategy="capacity", port=free_port(),
                           admin_token_file=token, gateway_args=("--timeout-ms", "5000"),
                           )  # fmt: skip
    with cluster as c:
        deploy = ["deploy", "--url", c.url, "--token-file", str(token)]
        for bad in (other, tmp_path / "missing", a):  # another shape, none, the one served
            body = json.dumps({"model": str(bad)}).encode()
            status, doc = post(c.url + "/v1/deploy", body, "application/json")
            assert status == 400 and doc["error"]["field"] == "model", doc
        status, doc = post(c.url + "/v1/deploy", json.dumps({"model": str(b)}).encode(),
                           "application/json", "x" * 40)  # fmt: skip
        assert status == 403, doc

        # A replica down during the deploy serves the new artifact when it starts again.
        c.shards[3].send_signal(signal.SIGKILL)
        c.shards[3].wait(10)
        time.sleep(4.5)  # the gateway's probe takes it out of rotation

        with reading(c.url, samples) as seen:  # every response a 200
            assert cli([*deploy, "--model", str(b)]) == 0
            time.sleep(0.3)
        assert {v for v, _ in seen} == {0, 1}, {v for v, _ in seen}
        for v, got in seen:
            np.testing.assert_allclose(got, want[v], rtol=1e-5, atol=1e-6)

        c.shards[3] = c.start_shard(1, 1)
        c.wait_ready(1, 1, c.shards[3], 60)
        info = msgpack.unpackb(raw(c.plan.shard(1).endpoints[1], [header("info")])[0])
        assert info["model"]["digest"] == read_manifest(b).digest()
        assert info["model"]["since"] == 1 and info["versions"]["version"] == 1

        # Updates apply to the new artifact.
        rows = an_update(b, 7, c.plan.report["split_tables"][0])
        assert cli(["push", "--url", c.url, "--token-file", str(token), "--updates",
                    str(write_npz(tmp_path / "u.npz", rows))]) == 0  # fmt: skip
        want[2] = predict(replaced(b, tmp_path / "b2", [rows]), samples)

        # Restarts: a replica (its state directory), then the gateway (from the shards).
        c.shards[0].send_signal(signal.SIGKILL)
        c.shards[0].wait(10)
        c.shards[0] = c.start_shard(0, 0)
        c.wait_ready(0, 0, c.shards[0], 60)
        assert c.gateway is not None
        c.gateway.terminate()
        c.gateway.wait(30)
        c.start_gateway(time.monotonic() + 60)
        for _ in range(4):  # every replica answers in turn
            version, got = scores(c.url, samples)
            assert version == 2
            np.testing.assert_allclose(got, want[2], rtol=1e-5, atol=1e-6)
        status, doc = get_json(c.url + "/v1/model")
        assert status == 200 and doc["digest"] == read_manifest(b).digest(), doc
