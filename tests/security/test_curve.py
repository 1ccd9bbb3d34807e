"""CURVE between gateway and shards: a shard started with keys answers only known clients;
a gateway (through ``recserve up``) with the right keys scores as the reference model."""

from __future__ import annotations

import json
import stat
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from recserve.cli import main as cli
from recserve.contracts.plan import local_endpoints
from recserve.local.cluster import LocalCluster, free_port
from recserve.planning import build
from recserve.rpc.curve import CurveKeys, keygen
from recserve.rpc.deadline import Deadline
from recserve.rpc.probe import health
from recserve.rpc.wire import decode_header, pack_header, request
from tests.integration.shards import start_shard, stop
from tests.models import tiny_manifest, write_random


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    assert cli(["keygen", "--out", str(out)]) == 0
    return out


def test_keygen_writes_both_pairs_with_private_secrets(keys: Path) -> None:
    names = sorted(p.name for p in keys.iterdir())
    assert names == ["client.key", "client.key_secret", "server.key", "server.key_secret"]
    for secret in keys.glob("*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    with pytest.raises(Exception, match="exists"):
        keygen(keys)


@pytest.fixture(scope="module")
def curve_shard(keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("curve")
    manifest = write_random(root / "m", tiny_manifest())
    (root / "plan.json").write_bytes(
        build(manifest, 1, "capacity", local_endpoints(1, 1)).to_json()
    )
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_shard(root / "plan.json", root / "m", 0, endpoint, "--curve-keys", str(keys))
    try:
        client = CurveKeys.for_client(keys)
        for _ in range(200):
            if health(endpoint, 0.2, client):
                break
            assert proc.poll() is None, "the CURVE shard exited"
        else:
            raise TimeoutError("the CURVE shard did not answer its client")
        yield endpoint
    finally:
        stop(proc)


def ask_health(endpoint: str, secure) -> bool:
    """Whether a health request on a fresh DEALER, set up by ``secure``, gets an answer."""
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        secure(sock)
        sock.connect(endpoint)
        sock.send(pack_header(request("health", 1, Deadline.after(5000).at_ms)))
        if not sock.poll(1500):
            return False
        return bool(decode_header(sock.recv()).get("ok"))


def test_only_known_clients_are_answered(curve_shard: str, keys: Path, tmp_path: Path) -> None:
    assert ask_health(curve_shard, CurveKeys.for_client(keys).secure_client)
    assert not ask_health(curve_shard, lambda sock: None)  # plaintext
    stranger = tmp_path / "stranger"
    keygen(stranger)
    known_server = CurveKeys.for_client(keys).server_public
    unknown = CurveKeys.for_client(stranger)
    impostor = CurveKeys(stranger, unknown.public, unknown.secret, known_server)
    assert not ask_health(curve_shard, impostor.secure_client)


def test_a_gateway_with_the_keys_scores_as_the_reference(
    keys: Path, fixtures_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    checkpoint = fixtures_dir / "D1" / "model.pt"
    assert cli(["import", "dlrm", "--checkpoint", str(checkpoint), "--out", str(model)]) == 0
    batch = fixtures_dir / "D1" / "batch_17"
    body = json.dumps({"samples": json.loads((batch / "request.json").read_text())}).encode()
    want = np.load(fixtures_dir / "D1" / "expected_17.npy")[:, 0]
    with LocalCluster(model, shards=2, port=free_port(), curve_keys=keys) as cluster:
        req = urllib.request.Request(
            cluster.url + "/v1/predict", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            got = json.loads(r.read())["scores"]
        for shard in cluster.plan.shards:  # the daemons really are CURVE servers
            assert health(shard.endpoints[0], 0.5) is None
    np.testing.assert_allclose(got, want, atol=1e-5)
