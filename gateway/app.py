"""The gateway's HTTP API (aiohttp).

- ``POST /v1/predict``: ``{"samples": [...]}`` or ``{"context": ..., "candidates": [...]}``,
  JSON or msgpack by ``Content-Type``; the reply uses ``Accept`` (default: the request's type).
  Returns ``{"scores": [...], "model": ..., "version": ...}``.
- ``POST /v1/embeddings``: the same input; pooled vectors per feature per sample.
- ``GET /v1/model``; ``GET /v2/health/live``, ``GET /v2/health/ready``; ``GET /metrics``.

Errors are ``{"error": {"kind", "message", "field"}}`` with the status of their kind
(``recserve.errors.http_status``), and ``Retry-After`` on 429 and 503. Parsing and all
numpy work run in the executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.batcher import Batcher
from gateway.metrics import GatewayMetrics
from gateway.pooler import Pooler
from recserve.batch import Batch, parse_request
from recserve.errors import BadRequest, NotReady, RecserveError, TooLarge, http_status
from recserve.manifest import Manifest
from recserve.plan import Plan
from recserve.shardclient import now_ms

log = logging.getLogger(__name__)
JSON, MSGPACK = "application/json", "application/msgpack"
MSGPACK_TYPES = {MSGPACK, "application/x-msgpack"}


@dataclass(frozen=True)
class ApiSettings:
    default_timeout_ms: float = 1000.0
    max_timeout_ms: float = 30_000.0
    max_request_samples: int = 8192
    max_request_ids: int = 4_000_000
    max_body_bytes: int = 64 << 20


@dataclass
class Gateway:
    manifest: Manifest
    plan: Plan | None
    pooler: Pooler
    batcher: Batcher
    executor: Executor
    metrics: GatewayMetrics
    settings: ApiSettings
    ready: bool = False
    draining: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


GATEWAY = web.AppKey("gateway", Gateway)


def decode(body: bytes, content_type: str) -> Any:
    try:
        if content_type in MSGPACK_TYPES:
            return msgpack.unpackb(
                body, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0
            )
        return orjson.loads(body)
    except (
        orjson.JSONDecodeError,
        ValueError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        TypeError,
    ) as exc:
        kind = "msgpack" if content_type in MSGPACK_TYPES else "JSON"
        raise BadRequest(f"the body is not valid {kind}: {exc}", field="body") from None


def encode(
    doc: dict[str, Any],
    request: web.Request,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    accept = request.headers.get("Accept", "")
    want_msgpack = any(t in accept for t in MSGPACK_TYPES) or (
        (not accept or accept == "*/*") and request.content_type in MSGPACK_TYPES
    )
    if want_msgpack:
        return web.Response(
            body=msgpack.packb(doc, use_bin_type=True),
            status=status,
            content_type=MSGPACK,
            headers=headers,
        )
    return web.Response(
        body=orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        content_type=JSON,
        headers=headers,
    )


def error_response(exc: RecserveError, request: web.Request) -> web.Response:
    status = http_status(exc)
    headers = {}
    if status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(getattr(exc, "retry_after", 1.0))))
    return encode({"error": exc.to_dict()}, request, status, headers)


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    start = time.perf_counter()
    route = (
        request.match_info.route.resource.canonical
        if request.match_info.route.resource
        else "unknown"
    )
    try:
        response = await handler(request)
    except RecserveError as exc:
        response = error_response(exc, request)
    except web.HTTPRequestEntityTooLarge:
        response = error_response(
            TooLarge("the body is larger than the gateway accepts", field="body"), request
        )
    except web.HTTPException as exc:
        response = encode({"error": {"kind": "http", "message": exc.reason}}, request, exc.status)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = error_response(RecserveError("internal error; see the gateway log"), request)
    gw.metrics.requests.labels(route=route, status=str(response.status)).inc()
    if route.startswith("/v1/"):
        gw.metrics.latency.observe(time.perf_counter() - start)
    return response


async def read_batch(request: web.Request) -> tuple[Batch, float]:
    """The request's batch (parsed in the executor) and its deadline."""
    gw = request.app[GATEWAY]
    if gw.draining:
        raise NotReady("the gateway is shutting down")
    body = await request.read()
    ctype = request.content_type
    loop = asyncio.get_running_loop()

    def parse() -> tuple[Batch, float]:
        doc = decode(body, ctype)
        timeout = gw.settings.default_timeout_ms
        if isinstance(doc, dict) and "timeout_ms" in doc:
            t = doc["timeout_ms"]
            if type(t) not in (int, float) or not 0 < t <= gw.settings.max_timeout_ms:
                raise BadRequest(
                    f"timeout_ms must be a number in (0, {gw.settings.max_timeout_ms:.0f}]",
                    field="timeout_ms",
                )
            timeout = min(timeout, float(t))
        batch = parse_request(doc, gw.manifest)
        check_limits(batch, gw.settings)
        return batch, timeout

    started = now_ms()
    batch, timeout = await loop.run_in_executor(gw.executor, parse)
    return batch, started + timeout


def check_limits(batch: Batch, settings: ApiSettings) -> None:
    if batch.size > settings.max_request_samples:
        raise TooLarge(
            f"{batch.size} samples exceed the limit of {settings.max_request_samples}",
            field="samples",
        )
    ids = sum(b.ids.size for b in batch.bags.values())
    if ids > settings.max_request_ids:
        raise TooLarge(f"{ids} ids exceed the limit of {settings.max_request_ids}", field="sparse")


async def predict(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    batch, deadline = await read_batch(request)
    scores = await gw.batcher.score(batch, deadline)
    return encode(
        {
            "scores": scores.astype(float).tolist(),
            "model": gw.manifest.name,
            "version": gw.manifest.version,
        },
        request,
    )


async def embeddings(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    batch, deadline = await read_batch(request)
    names = [f for f, _ in gw.manifest.features()]

    def document(pooled: np.ndarray) -> dict[str, Any]:  # B x F x dim floats: not on the loop
        return {
            "embeddings": {
                f: np.ascontiguousarray(pooled[:, k, :]).tolist() for k, f in enumerate(names)
            },
            "model": gw.manifest.name,
            "version": gw.manifest.version,
        }

    prepared = await asyncio.get_running_loop().run_in_executor(
        gw.executor, gw.pooler.prepare, batch
    )
    doc = await gw.pooler.pool(batch, prepared, deadline, document)
    return encode(doc, request)


async def model_info(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    m = gw.manifest
    features = [
        {
            "name": f,
            "table": t.name,
            "dim": t.dim,
            "rows": t.rows,
            "pooling": t.pooling,
            "net": t.net,
            "dtype": t.dtype,
            "stats": t.stats.to_dict(),
        }
        for f, t in m.features()
    ]
    plan = (
        {"mode": "singular"}
        if gw.plan is None
        else {
            "mode": "sharded",
            "strategy": gw.plan.strategy,
            "shards": len(gw.plan.shards),
            "replicas": gw.plan.replicas,
        }
    )
    return encode(
        {
            "name": m.name,
            "version": m.version,
            "digest": m.digest(),
            "dense_width": m.dense_width,
            "features": features,
            "plan": plan,
        },
        request,
    )


async def live(request: web.Request) -> web.Response:
    return encode({"live": True}, request)


async def ready(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ok = gw.ready and not gw.draining
    return encode({"ready": ok}, request, 200 if ok else 503, None if ok else {"Retry-After": "1"})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[GATEWAY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(gateway: Gateway) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=gateway.settings.max_body_bytes)
    app[GATEWAY] = gateway
    app.router.add_post("/v1/predict", predict)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/model", model_info)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/metrics", metrics)
    from gateway import kserve  # it builds on this module

    kserve.add_routes(app)
    return app
