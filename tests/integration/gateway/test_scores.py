"""The gateway's scores over HTTP equal the reference models', in every form and mode."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from gateway.config import ApiSettings, GatewayConfig
from tests.conftest import DEV_MODELS
from tests.integration.gateway.helpers import post, serve


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

    config = GatewayConfig(model=model, plan=plan, port=0, api=ApiSettings(enable_embeddings=True))
    asyncio.run(serve(config, check))


@pytest.mark.parametrize("fixture", DEV_MODELS)
def test_kserve_v2_with_tritonclient(deployments, fixtures_dir: Path, fixture: str) -> None:
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    model, plan = deployments[fixture]
    name = json.loads((model / "manifest.json").read_text())["name"]
    batch = fixtures_dir / fixture / "batch_17"
    want = np.load(fixtures_dir / fixture / "expected_17.npy")
    # Columns from the request samples (every fixture has request.json; D5 no .npy inputs).
    samples = json.loads((batch / "request.json").read_text())
    n_tables = len(samples[0]["sparse"])
    dense = np.array([s["dense"] for s in samples], np.float32)
    columns = [
        (
            np.array([i for s in samples for i in s["sparse"][str(k)]], np.int64),
            np.array([len(s["sparse"][str(k)]) for s in samples], np.int32),
        )
        for k in range(n_tables)
    ]

    def inputs(binary: bool, extra: str | None = None) -> list[Any]:
        out = [tc.InferInput("dense", list(dense.shape), "FP32")]
        out[0].set_data_from_numpy(dense, binary_data=binary)
        for k, (ids, lengths) in enumerate(columns):
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
