"""The gateway serving real fixture models over HTTP, singular and on real shard daemons."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import ApiSettings, BatchSettings, GatewayConfig
from recserve.cli import main as cli
from recserve.contracts.plan import read_plan
from recserve.local.argv import gateway_argv
from tests.conftest import DEV_MODELS
from tests.integration.shards import start_shard, stop, wait_healthy


@pytest.fixture(scope="module")
def deployments(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Every dev fixture imported, planned over 3 shards (a table split by rows), served."""
    root = tmp_path_factory.mktemp("gw")
    out, procs = {}, []
    try:
        for name in DEV_MODELS:
            src = "torchrec" if "torchrec" in name else "dlrm"
            model = root / name
            assert (
                cli(
                    [
                        "import",
                        src,
                        "--checkpoint",
                        str(fixtures_dir / name / "model.pt"),
                        "--out",
                        str(model),
                    ]
                )
                == 0
            )
            plan = root / f"{name}.plan.json"
            assert (
                cli(
                    [
                        "plan",
                        "--model",
                        str(model),
                        "--shards",
                        "3",
                        "--strategy",
                        "capacity",
                        "--out",
                        str(plan),
                    ]
                )
                == 0
            )
            assert read_plan(plan).report["split_tables"], name
            doc = json.loads(plan.read_text())
            for s in doc["shards"]:  # private ipc endpoints for the test
                s["endpoints"] = [f"ipc://{root}/{name}-{s['id']}.sock"]
            plan.write_text(json.dumps(doc))
            for s in doc["shards"]:
                procs.append(
                    (s["endpoints"][0], start_shard(plan, model, s["id"], s["endpoints"][0]))
                )
            out[name] = (model, plan)
        for endpoint, proc in procs:
            wait_healthy(endpoint, proc)
        yield out
    finally:
        for _, proc in procs:
            stop(proc)


async def serve(
    config: GatewayConfig, fn: Callable[[aiohttp.ClientSession, str], Awaitable[Any]]
) -> Any:
    server = TestServer(create_app(config))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = str(server.make_url(""))
            async with asyncio.timeout(20):
                while True:
                    async with session.get(url + "/v2/health/ready") as r:
                        if r.status == 200:
                            break
                    await asyncio.sleep(0.05)
            return await fn(session, url)
    finally:
        await server.close()


async def post(
    session: aiohttp.ClientSession, url: str, doc: Any, fmt: str = "json", path: str = "/v1/predict"
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    if fmt == "json":
        data, ctype = json.dumps(doc).encode(), "application/json"
    elif fmt == "msgpack":
        data, ctype = msgpack.packb(doc), "application/msgpack"
    else:
        data, ctype = doc, "application/json"
    async with session.post(url + path, data=data, headers={"Content-Type": ctype}) as r:
        body = await r.read()
        parsed = (
            msgpack.unpackb(body) if r.content_type == "application/msgpack" else json.loads(body)
        )
        return r.status, parsed, r.headers


@pytest.mark.parametrize("mode", ["singular", "singular-hugepages", "sharded"])
@pytest.mark.parametrize("name", DEV_MODELS)
def test_fixture_scores_over_http(deployments, fixtures_dir: Path, name: str, mode: str) -> None:
    model, plan = deployments[name]
    config = GatewayConfig(
        model=model,
        plan=plan if mode == "sharded" else None,
        port=0,
        hugepages=mode == "singular-hugepages",
    )

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        for batch in (1, 17, 256):
            samples = json.loads(
                (fixtures_dir / name / f"batch_{batch}" / "request.json").read_text()
            )
            want = np.load(fixtures_dir / name / f"expected_{batch}.npy")[:, 0]
            for fmt in ("json", "msgpack"):
                status, body, _ = await post(session, url, {"samples": samples}, fmt)
                assert status == 200, body
                np.testing.assert_allclose(body["scores"], want, rtol=0, atol=1e-5)

    asyncio.run(serve(config, check))


def test_ranking_form_matches_flat_samples(deployments) -> None:
    model, plan = deployments["D1"]
    rng = np.random.default_rng(3)
    dense = rng.standard_normal(13).tolist()
    context = {"0": [5, 9, 9], "1": [1999, 0]}
    candidates = [
        {"sparse": {"2": [int(rng.integers(50))], "3": rng.integers(0, 9000, 3).tolist(), "4": []}}
        for _ in range(40)
    ]
    flat = [{"dense": dense, "sparse": {**context, **c["sparse"]}} for c in candidates]

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        s1, ranked, _ = await post(
            session, url, {"context": {"dense": dense, "sparse": context}, "candidates": candidates}
        )
        s2, plain, _ = await post(session, url, {"samples": flat})
        assert s1 == s2 == 200
        np.testing.assert_allclose(ranked["scores"], plain["scores"], rtol=0, atol=1e-6)
        s3, emb, _ = await post(session, url, {"samples": flat[:3]}, path="/v1/embeddings")
        assert s3 == 200 and len(emb["embeddings"]["3"]) == 3

    asyncio.run(serve(GatewayConfig(model=model, plan=plan, port=0), check))


@pytest.mark.parametrize(
    "body, status, kind, field",
    [
        (b"{nope", 400, "bad_request", "body"),
        ({"samples": [{"dense": [0.0] * 12}]}, 400, "bad_request", "samples[0].dense"),
        (
            {"samples": [{"dense": [0.0] * 13, "sparse": {"9": [1]}}]},
            422,
            "unknown_feature",
            "samples[0].sparse.9",
        ),
        (
            {"samples": [{"dense": [0.0] * 13, "sparse": {"3": [9000]}}]},
            422,
            "id_out_of_range",
            "samples[0].sparse.3[0]",
        ),
        ({"samples": [{"dense": [0.0] * 13}] * 9000}, 413, "too_large", "samples"),
        (
            {"samples": [{"dense": [0.0] * 13, "sparse": {"3": [1] * 1001}}]},
            413,
            "too_large",
            "sparse",
        ),
        ({"samples": [{"dense": [0.0] * 13}], "timeout_ms": -5}, 400, "bad_request", "timeout_ms"),
        (
            {
                "context": {"dense": [0.0] * 13, "sparse": {"0": [1]}},
                "candidates": [{"sparse": {"0": [2]}}],
            },
            400,
            "bad_request",
            "candidates[0].sparse.0",
        ),
        ({"rows": []}, 400, "bad_request", "rows"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(deployments, body, status, kind, field) -> None:
    model, plan = deployments["D1"]

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        got, doc, _ = await post(session, url, body, "raw" if isinstance(body, bytes) else "json")
        assert got == status, doc
        assert doc["error"]["kind"] == kind and doc["error"]["field"] == field, doc
        ok, _, _ = await post(session, url, {"samples": [{"dense": [0.0] * 13}]})
        assert ok == 200

    asyncio.run(
        serve(
            GatewayConfig(model=model, plan=plan, port=0, api=ApiSettings(max_request_ids=1000)),
            check,
        )
    )


def test_model_health_and_metrics(deployments) -> None:
    model, plan = deployments["D4_torchrec"]

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url + "/v1/model") as r:
            doc = await r.json()
        assert doc["dense_width"] == 13 and [f["name"] for f in doc["features"]] == [
            "0",
            "1",
            "2",
            "3",
        ]
        assert doc["plan"] == {
            "mode": "sharded",
            "strategy": "capacity",
            "shards": 3,
            "replicas": 1,
        }
        async with session.get(url + "/v2/health/live") as r:
            assert r.status == 200
        await post(session, url, {"samples": [{"dense": [0.0] * 13}]})
        async with session.get(url + "/metrics") as r:
            text = await r.text()
        assert 'recserve_gateway_requests_total{route="/v1/predict",status="200"}' in text
        assert "recserve_gateway_pooling_seconds_bucket" in text
        for shard in range(3):
            assert f'recserve_gateway_shard_rpc_seconds_count{{shard="{shard}"}} 1.0' in text
        assert "recserve_gateway_shards_contacted_count 1.0" in text
        assert 'recserve_gateway_shard_bytes_total{direction="received"}' in text

    asyncio.run(serve(GatewayConfig(model=model, plan=plan, port=0), check))


@pytest.mark.parametrize("fixture", DEV_MODELS)
def test_kserve_v2_with_tritonclient(deployments, fixtures_dir: Path, fixture: str) -> None:
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    model, plan = deployments[fixture]
    name = json.loads((model / "manifest.json").read_text())["name"]
    batch = fixtures_dir / fixture / "batch_17"
    want = np.load(fixtures_dir / fixture / "expected_17.npy")
    n_tables = np.load(batch / "lengths.npy").shape[0]

    def inputs(binary: bool, extra: str | None = None) -> list[Any]:
        dense = np.load(batch / "dense.npy")
        out = [tc.InferInput("dense", list(dense.shape), "FP32")]
        out[0].set_data_from_numpy(dense, binary_data=binary)
        for k in range(n_tables):
            ids = np.load(batch / f"indices_{k}.npy")
            lengths = np.load(batch / "lengths.npy")[k].astype(np.int32)
            feature = extra if (extra and k == n_tables - 1) else str(k)
            for suffix, arr, dtype in ((".values", ids, "INT64"), (".lengths", lengths, "INT32")):
                t = tc.InferInput(feature + suffix, list(arr.shape), dtype)
                t.set_data_from_numpy(arr, binary_data=binary)
                out.append(t)
        return out

    def run(host: str) -> None:
        client = tc.InferenceServerClient(url=host)
        try:
            assert client.is_server_live() and client.is_server_ready()
            assert client.is_model_ready(name)
            meta = client.get_model_metadata(name)
            assert meta["outputs"][0]["name"] == "score"
            assert len(meta["inputs"]) == 1 + 2 * n_tables
            for binary in (True, False):
                result = client.infer(
                    name,
                    inputs(binary),
                    outputs=[tc.InferRequestedOutput("score", binary_data=binary)],
                )
                np.testing.assert_allclose(result.as_numpy("score"), want, atol=1e-5)
            with pytest.raises(InferenceServerException, match="deadline_exceeded"):
                client.infer(name, inputs(True), timeout=1)  # one microsecond
            with pytest.raises(InferenceServerException, match="unknown_feature"):
                client.infer(name, inputs(True, extra="nine"))
        finally:
            client.close()

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        host = url.split("//", 1)[1].rstrip("/")
        await asyncio.get_running_loop().run_in_executor(None, run, host)

    asyncio.run(serve(GatewayConfig(model=model, plan=plan, port=0), check))


def mutate(value: Any, rng: np.random.Generator) -> Any:
    """``value`` with one random node replaced by something of another type."""
    junk = [
        None,
        True,
        -1,
        2**70,
        -(2**70),
        1.5,
        1e308,
        "x",
        "",
        [],
        {},
        [1, 2],
        {"a": 1},
        [[1]],
        {"dense": "no"},
        float("nan"),
    ]
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = list(value)[int(rng.integers(len(value)))]
        return {**value, key: mutate(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = int(rng.integers(len(value)))
        return [*value[:i], mutate(value[i], rng), *value[i + 1 :]]
    return junk[int(rng.integers(len(junk)))]


@pytest.mark.slow
def test_fuzz_never_a_5xx_then_a_correct_answer(deployments, fixtures_dir: Path) -> None:
    model, _ = deployments["D1"]
    samples = json.loads((fixtures_dir / "D1" / "batch_17" / "request.json").read_text())
    want = np.load(fixtures_dir / "D1" / "expected_17.npy")[:, 0]
    good = {"samples": samples[:3]}
    rng = np.random.default_rng(7)

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        statuses: dict[int, int] = {}
        for i in range(3000):
            kind = i % 4
            if kind == 0:  # random bytes, both content types
                body = rng.bytes(int(rng.integers(0, 200)))
                ctype = ["application/json", "application/msgpack"][i % 8 // 4]
            elif kind == 1:  # a mutated structure as JSON (NaN has no JSON form: null)
                doc = mutate(good, rng)
                body = json.dumps(doc).replace("NaN", "null").encode()
                ctype = "application/json"
            elif kind == 2:  # a mutated structure as msgpack (NaN included)
                doc = mutate(good, rng)
                try:
                    body = msgpack.packb(doc)
                except OverflowError:  # msgpack has no integers beyond 64 bits
                    body = msgpack.packb(str(doc))
                ctype = "application/msgpack"
            else:  # flipped or truncated bytes of a valid body
                raw = bytearray(json.dumps(good).encode())
                if rng.random() < 0.5:
                    raw[int(rng.integers(len(raw)))] = int(rng.integers(256))
                else:
                    del raw[int(rng.integers(len(raw))) :]
                body, ctype = bytes(raw), "application/json"
            async with session.post(
                url + "/v1/predict", data=body, headers={"Content-Type": ctype}
            ) as r:
                statuses[r.status] = statuses.get(r.status, 0) + 1
                assert r.status < 500, (r.status, await r.text(), body[:200])
                if r.status >= 400:
                    err = (
                        await r.json(content_type=None)
                        if r.content_type == "application/json"
                        else msgpack.unpackb(await r.read())
                    )
                    assert err["error"]["kind"] and err["error"]["message"]
        assert statuses.get(200, 0) > 0 and sum(statuses.values()) == 3000
        status, body, _ = await post(session, url, {"samples": samples})
        assert status == 200
        np.testing.assert_allclose(body["scores"], want, atol=1e-5)

    asyncio.run(serve(GatewayConfig(model=model, plan=None, port=0), check))


def test_overload_is_429_and_deadline_is_504(deployments) -> None:
    model, _ = deployments["D3"]

    config = GatewayConfig(
        model=model,
        plan=None,
        port=0,
        batching=BatchSettings(max_inflight_samples=64, max_queue_delay_us=20_000),
    )
    sample = {"dense": [0.1] * 13, "sparse": {"0": [1, 2], "1": [3]}}

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        results = await asyncio.gather(
            *(post(session, url, {"samples": [sample] * 17}) for _ in range(30))
        )
        codes = [r[0] for r in results]
        assert 200 in codes and 429 in codes, codes
        refused = next(r for r in results if r[0] == 429)
        assert refused[1]["error"]["kind"] == "overloaded"
        assert int(refused[2]["Retry-After"]) >= 1
        status, body, _ = await post(session, url, {"samples": [sample], "timeout_ms": 0.001})
        assert status == 504 and body["error"]["kind"] == "deadline_exceeded"

    asyncio.run(serve(config, check))


def test_dead_shard_is_503_naming_it_within_the_deadline_then_recovers(
    deployments, tmp_path: Path
) -> None:
    model, plan_path = deployments["D3"]
    doc = json.loads(plan_path.read_text())
    for s in doc["shards"]:
        s["endpoints"] = [f"ipc://{tmp_path}/{s['id']}.sock"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(doc))
    procs = [start_shard(plan, model, s["id"], s["endpoints"][0]) for s in doc["shards"]]
    try:
        for s, p in zip(doc["shards"], procs, strict=True):
            wait_healthy(s["endpoints"][0], p)
        sample = {"dense": [0.1] * 13, "sparse": {"0": [1], "1": [3], "2": [5]}}

        async def check(session: aiohttp.ClientSession, url: str) -> None:
            status, before, _ = await post(session, url, {"samples": [sample]})
            assert status == 200
            procs[1].kill()
            procs[1].wait()
            start = asyncio.get_running_loop().time()
            status, body, headers = await post(
                session, url, {"samples": [sample], "timeout_ms": 300}
            )
            elapsed = asyncio.get_running_loop().time() - start
            assert status == 503, body
            assert "shard 1/0" in body["error"]["message"] and "Retry-After" in headers
            assert elapsed < 1.5
            async with asyncio.timeout(10):  # readiness notices too
                while True:
                    async with session.get(url + "/v2/health/ready") as r:
                        if r.status == 503:
                            break
                    await asyncio.sleep(0.2)
            # The shard comes back on the same endpoint: the client reconnects by itself.
            endpoint = doc["shards"][1]["endpoints"][0]
            procs[1] = start_shard(plan, model, 1, endpoint)
            await asyncio.get_running_loop().run_in_executor(None, wait_healthy, endpoint, procs[1])
            async with asyncio.timeout(15):
                while True:
                    status, body, _ = await post(session, url, {"samples": [sample]})
                    if status == 200:
                        assert body["scores"] == before["scores"]
                        break
                    assert status == 503, body
                    await asyncio.sleep(0.2)
                while True:
                    async with session.get(url + "/v2/health/ready") as r:
                        if r.status == 200:
                            break
                    await asyncio.sleep(0.2)

        asyncio.run(serve(GatewayConfig(model=model, plan=plan, port=0), check))
    finally:
        for p in procs:
            stop(p)


def test_weighted_samples_match_offline_scoring(deployments) -> None:
    from recserve.local.offline import predict as offline
    from recserve.model.scorer import Model

    model, plan = deployments["D2"]
    rng = np.random.default_rng(9)
    samples = []
    for _ in range(20):
        ids = rng.integers(0, 9000, 4).tolist()
        samples.append(
            {
                "dense": rng.standard_normal(13).tolist(),
                "sparse": {"1": [7, 7, 1500], "3": ids},
                "weights": {"3": rng.random(4).tolist()},
            }
        )
    want = offline(Model.open(model), samples)
    for where in (None, plan):

        async def check(session: aiohttp.ClientSession, url: str) -> None:
            status, body, _ = await post(session, url, {"samples": samples}, "msgpack")
            assert status == 200, body
            np.testing.assert_allclose(body["scores"], want, atol=1e-5)

        asyncio.run(serve(GatewayConfig(model=model, plan=where, port=0), check))


def test_gateway_process_drains_on_sigterm(deployments, tmp_path: Path) -> None:
    import signal
    import subprocess
    import urllib.error
    import urllib.request

    from tests.integration.shards import free_port

    model, _ = deployments["D1"]
    port = free_port()
    proc = subprocess.Popen(
        gateway_argv(model, "--max-queue-delay-us", "200000", port=port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass

            time.sleep(0.05)
        sample = {"dense": [0.0] * 13, "sparse": {"0": [1]}}

        async def run() -> list[int]:
            async with aiohttp.ClientSession() as session:
                tasks = [
                    asyncio.ensure_future(post(session, url, {"samples": [sample] * 5}))
                    for _ in range(8)
                ]
                await asyncio.sleep(0.05)  # queued: the batcher waits up to 200 ms
                proc.send_signal(signal.SIGTERM)
                return [r[0] for r in await asyncio.gather(*tasks)]

        assert asyncio.run(run()) == [200] * 8
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_batch_limits_are_checked_at_start(tmp_path: Path, capsys) -> None:
    from gateway.main import main

    for flag, value in (("--max-concurrent-batches", "0"), ("--max-batch-samples", "0")):
        code = main(["--model", str(tmp_path), "--singular", flag, value])
        assert code == 2 and "must be >= 1" in capsys.readouterr().err
