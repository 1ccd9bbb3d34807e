"""What every HTTP protocol of the gateway shares: its running state and the rules of a
request's life (admission while draining, deadline, size limits, Retry-After), so the v1 API
and KServe v2 apply them identically."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.batcher import Batcher
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.pooler import Pooler
from recserve.contracts.batch import Batch
from recserve.contracts.errors import (
    BadRequest,
    NotReady,
    RecserveError,
    RequestTimeout,
    TooLarge,
    UnsupportedEncoding,
    http_status,
)
from recserve.contracts.manifest import Manifest
from recserve.contracts.plan import Plan
from recserve.contracts.samples import Limits
from recserve.rpc.deadline import Deadline


@dataclass
class Gateway:
    config: GatewayConfig
    manifest: Manifest
    plan: Plan | None
    pooler: Pooler
    batcher: Batcher
    executor: Executor
    metrics: GatewayMetrics
    ready: bool = False
    draining: bool = False
    updater: Any = None  # gateway.updates.Updater when --admin-token-file and a plan
    admin_token: str | None = None
    follower: Any = None  # gateway.follow.Follower: a serving worker under --admin-port
    admin_port: int | None = None  # ... which sends updates there
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def limits(self) -> Limits:
        api = self.config.api
        return Limits(api.max_request_samples, api.max_request_ids)

    @property
    def serving(self) -> bool:
        """Ready for traffic: every shard answers and no drain has begun."""
        return self.ready and not self.draining

    def admit(self) -> None:
        """Refuse a new request while draining."""
        if self.draining:
            raise NotReady("the gateway is shutting down")

    async def read_body(self, request: web.Request) -> bytes:
        """The request's body, uncompressed only (aiohttp would inflate a gzip body before
        any limit applies), read within ``--body-timeout-s`` (a client that stalls mid-body
        gets 408 instead of holding a connection and a handler forever)."""
        self.admit()
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise UnsupportedEncoding(
                f"Content-Encoding {encoding} is not accepted; send the body uncompressed",
                field="Content-Encoding",
            )
        try:
            async with asyncio.timeout(self.config.api.body_timeout_s):
                return await request.read()
        except TimeoutError:
            raise RequestTimeout(
                f"the body did not arrive within {self.config.api.body_timeout_s:g} s",
                field="body",
            ) from None

    def deadline(self, requested_ms: Any, field: str, arrived_ms: float) -> Deadline:
        """The request's deadline: ``--timeout-ms`` after it arrived (``arrived_ms``, taken
        on the loop: the wait for an executor thread counts), or the shorter one it asked
        for (``requested_ms`` None: it asked for none)."""
        timeout = self.config.api.timeout_ms
        if requested_ms is not None:
            if type(requested_ms) not in (int, float) or not 0 < requested_ms < math.inf:
                raise BadRequest(f"{field} must be a positive number", field=field)
            timeout = min(timeout, float(requested_ms))
        return Deadline(arrived_ms + timeout)

    def check_limits(self, batch: Batch) -> None:
        """The whole batch against the limits. The parsers check counts before they
        allocate, each on its own part of a body; this sees a ranking request's context
        and candidates together."""
        api = self.config.api
        if batch.size > api.max_request_samples:
            raise TooLarge(
                f"{batch.size} samples exceed the limit of {api.max_request_samples}",
                field="samples",
            )
        ids = sum(b.ids.size for b in batch.bags.values())
        if ids > api.max_request_ids:
            raise TooLarge(f"{ids} ids exceed the limit of {api.max_request_ids}", field="sparse")


GATEWAY = web.AppKey("gateway", Gateway)


def status_and_headers(exc: RecserveError) -> tuple[int, dict[str, str]]:
    """The HTTP status of an error, with ``Retry-After`` on 429 and 503."""
    status = http_status(exc)
    headers = {}
    if status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(getattr(exc, "retry_after", 1.0))))
    return status, headers
