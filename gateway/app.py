"""The gateway's HTTP API (aiohttp): the v1 routes, and KServe v2 mounted as a sub-app.

- ``POST /v1/predict``: ``{"samples": [...]}`` or ``{"context": ..., "candidates": [...]}``,
  JSON or msgpack by ``Content-Type``; the reply uses ``Accept`` (default: the request's type).
  Returns ``{"scores": [...], "model": ..., "model_version": ..., "version": N}``, ``N`` the
  online-update version the scores were computed at (``gateway.updates``).
- ``POST /v1/embeddings``: the same input; pooled vectors per feature per sample.
- ``GET /v1/model``; ``GET /metrics``; ``/v2/...`` (``gateway.kserve``).

v1 errors are ``{"error": {"kind", "message", "field"}}`` with the status of their kind and
``Retry-After`` on 429 and 503 (``gateway.state``). Parsing and all numpy work run in the
executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import numpy as np
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import kserve, updates
from gateway.batcher import Routed
from gateway.config import GatewayConfig
from gateway.follow import Role
from gateway.lifetime import running
from gateway.requests import decode_body, parse_request
from gateway.state import GATEWAY, status_and_headers
from recserve.contracts.batch import Batch
from recserve.contracts.errors import RecserveError, TooLarge
from recserve.contracts.http import JSON, MSGPACK, MSGPACK_TYPES, feature_list
from recserve.rpc.deadline import Deadline, now_ms

log = logging.getLogger(__name__)
# The routes whose requests are scored: the request-latency histogram times these only.
SCORING = frozenset({"/v1/predict", "/v1/embeddings", "/v2/models/{model}/infer",
                     "/v2/models/{model}/versions/{version}/infer"})  # fmt: skip
CLIENT_GONE = "499"  # nginx's status for a request whose client closed the connection


def wants_msgpack(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return any(t in accept for t in MSGPACK_TYPES) or (
        (not accept or accept == "*/*") and request.content_type in MSGPACK_TYPES
    )


def encode(
    doc: dict[str, Any],
    request: web.Request,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    if wants_msgpack(request):
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
    status, headers = status_and_headers(exc)
    return encode({"error": exc.to_dict()}, request, status, headers)


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Counts and times every request (KServe's too); answers v1 errors in the v1 shape
    (the KServe sub-app answers its own before they reach here)."""
    gw = request.config_dict[GATEWAY]
    start = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource else "unknown"
    try:
        response = await handler(request)
    except ConnectionResetError:  # the client went away mid-request: nobody to answer
        gw.metrics.requests.labels(route=route, status=CLIENT_GONE).inc()
        log.debug("%s %s: the client disconnected", request.method, request.path)
        return web.Response(status=int(CLIENT_GONE))
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
    if route in SCORING:  # not updates, deploys or metadata: they have their own figures
        gw.metrics.latency.observe(time.perf_counter() - start)
    return response


async def read_batch(
    request: web.Request, *, route: bool = False
) -> tuple[Batch, Deadline, Routed | None]:
    """The request's batch (parsed in the executor), its deadline, and with ``route`` its
    routing when it will likely be a batch of its own (``Batcher.route_alone``)."""
    gw = request.config_dict[GATEWAY]
    body = await gw.read_body(request)
    ctype = request.content_type

    arrived = now_ms()  # the deadline runs from here, the executor's queue included

    def parse() -> tuple[Batch, Deadline, Routed | None]:
        with gw.metrics.cpu("parse"):
            doc = decode_body(body, ctype)
            asked = doc.get("timeout_ms") if isinstance(doc, dict) else None
            deadline = gw.deadline(asked, "timeout_ms", arrived)
            batch = parse_request(doc, gw.manifest, gw.limits)
            gw.check_limits(batch)
        return batch, deadline, gw.batcher.route_alone(batch) if route else None

    return await asyncio.get_running_loop().run_in_executor(gw.executor, parse)


async def predict(request: web.Request) -> web.Response:
    gw = request.config_dict[GATEWAY]
    batch, deadline, routed = await read_batch(request, route=True)
    scores, version = await gw.batcher.score(batch, deadline, routed)
    return encode(
        {
            "scores": scores.astype(float).tolist(),
            "model": gw.manifest.name,
            "model_version": gw.manifest.version,
            "version": version,
        },
        request,
    )


async def embeddings(request: web.Request) -> web.Response:
    """Pooled vectors: admitted like a batch (in-flight samples and a batch slot), and no
    larger than ``--max-embedding-floats``, which a small ranking body could otherwise
    multiply into hundreds of MB."""
    gw = request.config_dict[GATEWAY]
    if not gw.config.api.enable_embeddings:
        raise web.HTTPNotFound(reason="/v1/embeddings is not enabled (--enable-embeddings)")
    batch, deadline, _ = await read_batch(request)
    names = [f for f, _ in gw.manifest.features()]
    floats = batch.size * len(names) * gw.manifest.embedding_dim
    limit = gw.config.api.max_embedding_floats
    if floats > limit:
        raise TooLarge(
            f"the reply would hold {floats} floats, more than the limit of {limit}",
            field="samples",
        )
    lists = wants_msgpack(request)  # orjson writes numpy arrays itself; msgpack needs lists

    def document(pooled: np.ndarray) -> dict[str, Any]:  # B x F x dim floats: not on the loop
        columns = (np.ascontiguousarray(pooled[:, k, :]) for k in range(len(names)))
        return {
            "embeddings": {
                f: c.tolist() if lists else c for f, c in zip(names, columns, strict=True)
            },
            "model": gw.manifest.name,
            "version": gw.manifest.version,
        }

    async with gw.batcher.admitted(batch.size, deadline):
        prepared = await asyncio.get_running_loop().run_in_executor(
            gw.executor, gw.pooler.prepare, batch
        )
        doc = await gw.pooler.pool(batch, prepared, deadline, document)
    return encode(doc, request)


async def model_info(request: web.Request) -> web.Response:
    gw = request.config_dict[GATEWAY]
    m = gw.manifest
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
            "features": feature_list(m),
            "plan": plan,
        },
        request,
    )


async def post_updates(request: web.Request) -> web.Response:
    gw = request.config_dict[GATEWAY]
    gw.admit()
    return encode(await updates.handle(request, gw), request)


async def post_deploy(request: web.Request) -> web.Response:
    gw = request.config_dict[GATEWAY]
    gw.admit()
    return encode(await updates.handle_deploy(request, gw), request)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.config_dict[GATEWAY].metrics.scrape)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(config: GatewayConfig, role: Role | None = None) -> web.Application:
    """The whole HTTP app; its state (``app[GATEWAY]``) is built when the app starts and torn
    down when it stops (``cleanup_ctx``)."""
    app = web.Application(middlewares=[errors], client_max_size=config.api.max_body_bytes)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        async with running(config, role) as gw:
            app[GATEWAY] = gw
            yield

    app.cleanup_ctx.append(lifetime)
    app.router.add_post("/v1/predict", predict)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/model", model_info)
    app.router.add_post("/v1/updates", post_updates)
    app.router.add_post("/v1/deploy", post_deploy)
    app.router.add_get("/metrics", metrics)
    app.add_subapp("/v2", kserve.create_app())
    return app
