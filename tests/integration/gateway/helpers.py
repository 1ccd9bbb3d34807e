"""Helpers of the gateway integration tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgpack
import numpy as np
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import GatewayConfig


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
    elif fmt == "raw-msgpack":
        data, ctype = doc, "application/msgpack"
    else:
        data, ctype = doc, "application/json"
    async with session.post(url + path, data=data, headers={"Content-Type": ctype}) as r:
        body = await r.read()
        parsed = (
            msgpack.unpackb(body) if r.content_type == "application/msgpack" else json.loads(body)
        )
        return r.status, parsed, r.headers


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
