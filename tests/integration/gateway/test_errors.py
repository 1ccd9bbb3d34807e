"""Bad input, overload and deadlines: clear 4xx/429/504 answers, never a 5xx."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import msgpack
import numpy as np
import pytest

from gateway.config import ApiSettings, BatchSettings, GatewayConfig
from tests.integration.gateway.helpers import mutate, post, serve


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
