"""Online updates through the gateway: ``recserve push`` to 3 shards x 2 replicas (a table
split by rows) commits a version whose scores equal ``recserve predict`` on a copy of the
artifact with the same rows replaced; responses name their version, also while pushes run
concurrently; bad updates and bad tokens change nothing; a replica killed after a commit
comes back with it; dense arrays update with the rows."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from recserve.cli import main as cli
from recserve.contracts.manifest import DENSE_FILE, read_manifest
from recserve.local.cluster import LocalCluster, free_port
from recserve.local.offline import predict
from recserve.model.artifact import dense_bytes, open_table, read_dense
from recserve.model.scorer import Model
from recserve.model.workload import Workload
from recserve.rpc.curve import CurveKeys, keygen
from tests.integration.shards import header, raw

TOKEN = "s3cret-token-of-the-test-0123456789"
NPZ = "application/x-npz"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("updates")
    argv = ["synth", "--profile", "drm3", "--size", "4MiB", "--seed", "3"]
    assert cli([*argv, "--out", str(root / "m")]) == 0
    return root / "m"


def post(url: str, body: bytes, ctype: str, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": ctype, "Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def scores(url: str, samples: list) -> tuple[int, np.ndarray]:
    status, doc = post(url + "/v1/predict", json.dumps({"samples": samples}).encode(),
                       "application/json", None)  # fmt: skip
    assert status == 200, doc
    return doc["version"], np.asarray(doc["scores"])


@contextlib.contextmanager
def reading(url: str, samples: list, threads: int = 2) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Threads scoring ``samples`` back to back while the block runs; yields the (version,
    scores) they got. Any failed request fails the block once the threads have stopped."""
    seen: list[tuple[int, np.ndarray]] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                seen.append(scores(url, samples))
        except BaseException as exc:  # reported in the test's thread
            failed.append(exc)

    readers = [threading.Thread(target=read) for _ in range(threads)]
    for t in readers:
        t.start()
    try:
        yield seen
    finally:
        stop.set()
        for t in readers:
            t.join()
    if failed:
        raise failed[0]


def an_update(model: Path, seed: int, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Rows for the split table (ids on both sides of the split) and one more table, of
    the scale of the tables' own rows."""
    manifest = read_manifest(model)
    rng = np.random.default_rng(seed)
    other = next(t for t in manifest.tables if t.name != split)
    out = {}
    for t in (manifest.table(split), other):
        ids = rng.choice(t.rows, min(t.rows, 300), replace=False).astype(np.int64)
        scale = float(np.std(np.asarray(open_table(model, t), np.float32)))  # a retraining's
        rows = rng.normal(0.0, scale, (ids.size, t.dim)).astype(np.float32)
        out[t.name] = (ids, rows)
    return out


def write_npz(path: Path, update: dict) -> Path:
    arrays = {}
    for name, (ids, rows) in update.items():
        arrays[f"{name}.ids"], arrays[f"{name}.rows"] = ids, rows
    np.savez(path, **arrays)
    return path


def replaced(model: Path, dest: Path, updates: list[dict]) -> Model:
    """A copy of the artifact with the updates' rows written into its tables."""
    shutil.copytree(model, dest)
    for update in updates:
        for name, (ids, rows) in update.items():
            table = np.load(dest / "tables" / f"{name}.npy", mmap_mode="r+")
            table[ids] = rows
            table.flush()
            del table
    return Model.open(dest)


def test_push_commits_one_version_on_every_shard(model: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    samples = Workload(read_manifest(model), seed=9).samples(48)
    original = predict(Model.open(model), samples)
    cluster = LocalCluster(
        model,
        shards=3,
        replicas=2,
        strategy="capacity",
        port=free_port(),
        admin_token_file=token,
        gateway_args=("--timeout-ms", "5000"),
    )
    with cluster as c:
        split = c.plan.report["split_tables"][0]
        version, got = scores(c.url, samples)
        assert version == 0
        np.testing.assert_allclose(got, original, rtol=1e-5, atol=1e-6)

        first = an_update(model, 1, split)
        argv = ["push", "--url", c.url, "--token-file", str(token)]
        assert cli([*argv, "--updates", str(write_npz(tmp_path / "u1.npz", first))]) == 0
        want1 = predict(replaced(model, tmp_path / "v1", [first]), samples)
        assert not np.allclose(want1, original)
        version, got = scores(c.url, samples)
        assert version == 1
        np.testing.assert_allclose(got, want1, rtol=1e-5, atol=1e-6)

        # Two pushes at once, with reads: each update gets a version of its own, and each
        # response matches the version it names.
        pushed = {2: an_update(model, 2, split), 3: an_update(model, 4, split)}
        got_versions: dict[int, int] = {}

        def push(key: int) -> None:
            body = write_npz(tmp_path / f"u{key}.npz", pushed[key]).read_bytes()
            status, doc = post(c.url + "/v1/updates", body, "application/x-npz")
            assert status == 200, doc
            got_versions[key] = doc["version"]

        with reading(c.url, samples) as seen:
            pushers = [threading.Thread(target=push, args=(k,)) for k in pushed]
            for t in pushers:
                t.start()
            for t in pushers:
                t.join()
        assert sorted(got_versions.values()) == [2, 3], got_versions
        order = [pushed[k] for k in sorted(pushed, key=got_versions.__getitem__)]
        want = {1: want1, 2: predict(replaced(model, tmp_path / "v2", [first, order[0]]), samples)}
        want[3] = predict(replaced(model, tmp_path / "v3", [first, *order]), samples)
        assert {v for v, _ in seen} <= {1, 2, 3} and seen
        for v, got in seen:
            np.testing.assert_allclose(got, want[v], rtol=1e-5, atol=1e-6)
        second = order[1]  # rows for the bad updates below

        # Bad updates and tokens: a 4xx naming the field, and nothing applied anywhere.
        ids, rows = second[split]
        nan = rows.copy()
        nan[5, 0] = np.nan
        cases = [
            ({"nope": (ids, rows)}, TOKEN, 422, "tables.nope"),
            ({split: (ids + 10**9, rows)}, TOKEN, 422, f"tables.{split}.ids[0]"),
            ({split: (ids, rows[:, :-1])}, TOKEN, 400, f"tables.{split}.rows"),
            ({split: (ids, nan)}, TOKEN, 400, f"tables.{split}.rows[5]"),
            (second, None, 401, "Authorization"),
            (second, "x" * 40, 403, "Authorization"),
        ]
        for update, tok, status_want, field in cases:
            body = write_npz(tmp_path / "bad.npz", update).read_bytes()
            status, doc = post(c.url + "/v1/updates", body, "application/x-npz", tok)
            assert status == status_want and doc["error"]["field"] == field, doc
        version, got = scores(c.url, samples)
        assert version == 3
        np.testing.assert_allclose(got, want[3], rtol=1e-5, atol=1e-6)

        # A replica killed after the commit comes back from its log with version 3.
        c.shards[0].send_signal(signal.SIGKILL)
        c.shards[0].wait(10)
        c.shards[0] = c.start_shard(0, 0)
        c.wait_ready(0, 0, c.shards[0], 60)
        for _ in range(4):  # both replicas of shard 0 answer in turn
            version, got = scores(c.url, samples)
            assert version == 3
            np.testing.assert_allclose(got, want[3], rtol=1e-5, atol=1e-6)

        # A replica down during an update: the update commits on the others, and the
        # replica fetches the version from its peer before it reports ready again.
        down = 3  # shard 1, replica 1
        c.shards[down].send_signal(signal.SIGKILL)
        c.shards[down].wait(10)
        time.sleep(4.5)  # the gateway's probe (every 2 s) takes it out of rotation
        fourth = an_update(model, 3, split)
        body = write_npz(tmp_path / "u4.npz", fourth).read_bytes()
        status, doc = post(c.url + "/v1/updates", body, "application/x-npz")
        assert status == 200 and doc["version"] == 4, doc
        want[4] = predict(replaced(model, tmp_path / "v4", [first, *order, fourth]), samples)
        c.shards[down] = c.start_shard(1, 1)
        c.wait_ready(1, 1, c.shards[down], 60)
        health = msgpack.unpackb(raw(c.plan.shard(1).endpoints[1], [header("health")])[0])
        assert health["version"] == 4, health
        for _ in range(6):
            version, got = scores(c.url, samples)
            assert version == 4
            np.testing.assert_allclose(got, want[4], rtol=1e-5, atol=1e-6)


def with_dense(model: Path, dest: Path, rows: list[dict], dense: list[dict]) -> Model:
    """A copy of the artifact with the updates' rows and dense arrays written in."""
    replaced(model, dest, rows)
    weights = read_dense(dest / DENSE_FILE)
    for d in dense:
        weights.update(d)
    (dest / DENSE_FILE).write_bytes(dense_bytes(weights))
    return Model.open(dest)


def test_dense_weights_update_with_the_rows(model: Path, tmp_path: Path) -> None:
    """An update's dense arrays score from its version on, with or without rows; bad ones
    change nothing; a gateway started later, and a replica that was down, get them from the
    shards."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    manifest = read_manifest(model)
    samples = Workload(manifest, seed=5).samples(32)
    current = read_dense(model / DENSE_FILE)
    rng = np.random.default_rng(8)

    def new(*keys: str) -> dict[str, np.ndarray]:
        return {k: rng.standard_normal(current[k].shape).astype(np.float32) * 0.1 for k in keys}

    cluster = LocalCluster(model, shards=2, replicas=2, strategy="capacity", port=free_port(),
                           admin_token_file=token, gateway_args=("--timeout-ms", "5000"),
                           )  # fmt: skip
    with cluster as c:
        split = c.plan.report["split_tables"][0]
        rows1, dense1 = an_update(model, 11, split), new("top.0.bias", "bottom.0.weight")
        arrays = {f"dense.{k}": v for k, v in dense1.items()}
        for name, (ids, rows) in rows1.items():
            arrays[f"{name}.ids"], arrays[f"{name}.rows"] = ids, rows
        np.savez(tmp_path / "u1.npz", **arrays)
        argv = ["push", "--url", c.url, "--token-file", str(token)]
        assert cli([*argv, "--updates", str(tmp_path / "u1.npz")]) == 0
        want1 = predict(with_dense(model, tmp_path / "v1", [rows1], [dense1]), samples)
        version, got = scores(c.url, samples)
        assert version == 1
        np.testing.assert_allclose(got, want1, rtol=1e-5, atol=1e-6)

        # Dense arrays alone (msgpack); then bad ones, refused with nothing applied.
        dense2 = new("top.1.weight")
        body = msgpack.packb({"dense": {k: v.tolist() for k, v in dense2.items()}})
        status, doc = post(c.url + "/v1/updates", body, "application/msgpack")
        assert status == 200 and doc["version"] == 2 and doc["dense"] == ["top.1.weight"], doc
        want2 = predict(with_dense(model, tmp_path / "v2", [rows1], [dense1, dense2]), samples)
        nan = current["top.0.bias"].copy()
        nan[0] = np.nan
        for arrays, field in [
            ({"dense.nope": current["top.0.bias"]}, "dense.nope"),
            ({"dense.top.0.bias": current["top.0.weight"]}, "dense.top.0.bias"),
            ({"dense.top.0.bias": nan}, "dense.top.0.bias"),
        ]:
            np.savez(tmp_path / "bad.npz", **arrays)
            status, doc = post(c.url + "/v1/updates", (tmp_path / "bad.npz").read_bytes(), NPZ)
            assert status == 400 and doc["error"]["field"] == field, doc
        version, got = scores(c.url, samples)
        assert version == 2
        np.testing.assert_allclose(got, want2, rtol=1e-5, atol=1e-6)

        # A replica of the dense shard down during a dense update catches up on it, and a
        # restarted gateway takes the dense weights from the shards.
        dense_shard = c.plan.shards[0].id
        down = c.shards[2 * dense_shard + 1]
        down.send_signal(signal.SIGKILL)
        down.wait(10)
        time.sleep(4.5)  # out of rotation
        dense3 = new("top.0.bias")
        np.savez(tmp_path / "u3.npz", **{f"dense.{k}": v for k, v in dense3.items()})
        status, doc = post(c.url + "/v1/updates", (tmp_path / "u3.npz").read_bytes(), NPZ)
        assert status == 200 and doc["version"] == 3, doc
        want3 = predict(with_dense(model, tmp_path / "v3", [rows1], [dense1, dense2, dense3]),
                        samples)  # fmt: skip
        c.shards[2 * dense_shard + 1] = c.start_shard(dense_shard, 1)
        c.wait_ready(dense_shard, 1, c.shards[2 * dense_shard + 1], 60)
        caught = raw(c.plan.shard(dense_shard).endpoints[1], [header("info")])[0]
        assert msgpack.unpackb(caught)["versions"]["dense"] == 3
        assert c.gateway is not None
        c.gateway.terminate()
        c.gateway.wait(30)
        c.start_gateway(time.monotonic() + 60)
        version, got = scores(c.url, samples)
        assert version == 3
        np.testing.assert_allclose(got, want3, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("curve", [False, True], ids=["plaintext", "curve"])
def test_replica_back_from_a_partition_catches_up(model: Path, tmp_path: Path, curve: bool) -> None:
    """A replica out of rotation for a while (stopped, not restarted) misses a version; asked
    to stage the next one it fetches the missed one from its peer first, so updates go on.
    Under CURVE too: the peers talk with the server pair every shard holds."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    keys = tmp_path / "curve" if curve else None
    if keys is not None:
        keygen(keys)
    samples = Workload(read_manifest(model), seed=4).samples(24)
    cluster = LocalCluster(model, shards=2, replicas=2, strategy="capacity", port=free_port(),
                           admin_token_file=token, gateway_args=("--timeout-ms", "5000"),
                           curve_keys=keys)  # fmt: skip
    with cluster as c:
        split = c.plan.report["split_tables"][0]
        pushed = [an_update(model, 20 + k, split) for k in range(3)]

        def push(k: int) -> None:
            body = write_npz(tmp_path / f"p{k}.npz", pushed[k]).read_bytes()
            status, doc = post(c.url + "/v1/updates", body, "application/x-npz")
            assert status == 200 and doc["version"] == k + 1, doc

        push(0)
        lagging = c.shards[1]  # shard 0, replica 1
        lagging.send_signal(signal.SIGSTOP)
        try:
            time.sleep(4.5)  # the gateway's probe takes it out of rotation
            push(1)
        finally:
            lagging.send_signal(signal.SIGCONT)
        time.sleep(4.5)  # and back in
        push(2)
        client = CurveKeys.for_client(keys) if keys is not None else None
        reply = raw(c.plan.shard(0).endpoints[1], [header("health")], keys=client)
        health = msgpack.unpackb(reply[0])
        assert health["version"] == 3, health
        want = predict(replaced(model, tmp_path / "v3", pushed), samples)
        for _ in range(6):
            version, got = scores(c.url, samples)
            assert version == 3
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
