"""The columnar request form and the light client against a real gateway: the reference
model's scores from arrays, in msgpack typed arrays and JSON lists, and typed errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest

from gateway.config import ApiSettings, GatewayConfig
from recserve.client import AsyncClient, Client, columns_of
from recserve.contracts import columns
from recserve.contracts.columns import columns_body
from recserve.contracts.errors import IdOutOfRange, UnknownFeature
from tests.integration.gateway.helpers import post, serve

FIXTURE = "D2"


def reference(fixtures_dir: Path) -> tuple[list[Any], np.ndarray]:
    batch = fixtures_dir / FIXTURE / "batch_17"
    samples = json.loads((batch / "request.json").read_text())
    return samples, np.load(fixtures_dir / FIXTURE / "expected_17.npy")[:, 0]


@pytest.mark.parametrize("mode", ["singular", "sharded"])
def test_columns_and_the_client_score_as_the_reference(
    deployments, fixtures_dir: Path, mode: str
) -> None:
    model, plan = deployments[FIXTURE]
    samples, want = reference(fixtures_dir)
    features = [str(k) for k in range(len(samples[0]["sparse"]))]
    dense, sparse = columns_of(samples, features)

    narrow = columns_body(dense, sparse)
    assert {c["values"]["dtype"] for c in narrow["columns"]["sparse"].values()} == {"<i4"}
    wide = columns_body(dense, sparse)
    for f, (v, _) in sparse.items():
        wide["columns"]["sparse"][f]["values"] = columns.typed(np.asarray(v, np.int64))

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        for doc in (narrow, wide):  # ids as int32 (the client's) and int64
            async with session.post(
                url + "/v1/predict",
                data=msgpack.packb(doc, use_bin_type=True),
                headers={"Content-Type": "application/msgpack"},
            ) as r:
                assert r.status == 200
                scores = msgpack.unpackb(await r.read())["scores"]
                np.testing.assert_allclose(scores, want, atol=1e-5)
        lists = {
            "columns": {
                "dense": dense.tolist(),
                "sparse": {
                    f: {"values": v.tolist(), "lengths": n.tolist()} for f, (v, n) in sparse.items()
                },
            }
        }
        status, doc, _ = await post(session, url, lists)
        assert status == 200, doc
        np.testing.assert_allclose(doc["scores"], want, atol=1e-5)
        async with AsyncClient(url) as client:
            np.testing.assert_allclose(await client.predict(dense, sparse), want, atol=1e-5)
            pooled = await client.embeddings(dense, sparse)
            assert pooled["0"].shape == (len(samples), 8)  # D2's dim
            with pytest.raises(IdOutOfRange) as info:
                await client.predict(dense, {"0": (np.array([10**6]), np.array([1] + [0] * 16))})
            assert info.value.field == "columns.sparse.0.values[0]"
        blocking = await asyncio.get_running_loop().run_in_executor(
            None, lambda: Client(url).predict(dense, sparse, timeout_ms=5000)
        )
        np.testing.assert_allclose(blocking, want, atol=1e-5)

    config = GatewayConfig(
        model=model,
        plan=plan if mode == "sharded" else None,
        port=0,
        api=ApiSettings(enable_embeddings=True),
    )
    asyncio.run(serve(config, check))


ROW = [[0.0] * 13]
WRAPPED = "columns.sparse.0.lengths"  # lengths whose int64 sum wraps to 0


def bag(values: Any, lengths: Any) -> dict[str, Any]:
    return {"values": values, "lengths": lengths}


def typed(dtype: str, shape: list[int], data: bytes) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data": data}


@pytest.mark.parametrize(
    "columns, status, field",
    [
        ({"dense": typed("<i8", [1, 13], b"\0" * 104)}, 400, "columns.dense.dtype"),
        ({"dense": typed("<f4", [1, 13], b"\0" * 10)}, 400, "columns.dense.data"),
        ({"dense": typed("<f4", [2**32, 2**32], b"")}, 400, "columns.dense.data"),
        ({"dense": ROW, "sparse": {"zz": bag([1], [1])}}, 422, "columns.sparse.zz"),
        ({"dense": ROW, "sparse": {"0": bag([True], [1])}}, 400, "columns.sparse.0.values"),
        (
            {"dense": ROW * 4, "sparse": {"0": bag([], [2**62] * 4)}},
            400,
            "columns.sparse.0.lengths",
        ),
        ({"dense": [[0.0] * 12]}, 400, "columns.dense"),
    ],
)
def test_bad_columns_name_the_field(deployments, columns, status: int, field: str) -> None:
    model, _ = deployments[FIXTURE]

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        body = msgpack.packb({"columns": columns}, use_bin_type=True)
        got, doc, _ = await post(session, url, body, fmt="raw-msgpack")
        assert got == status and doc["error"]["field"] == field, doc

    asyncio.run(serve(GatewayConfig(model=model, plan=None, port=0), check))


def test_client_errors_are_typed(deployments) -> None:
    model, _ = deployments[FIXTURE]

    async def check(session: aiohttp.ClientSession, url: str) -> None:
        def call() -> None:
            Client(url).predict(np.zeros((1, 13)), {"nine": (np.array([1]), np.array([1]))})

        with pytest.raises(UnknownFeature):
            await asyncio.get_running_loop().run_in_executor(None, call)

    asyncio.run(serve(GatewayConfig(model=model, plan=None, port=0), check))
