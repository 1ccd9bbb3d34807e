"""The gateway's listening socket, with a bound on open connections.

aiohttp's server accepts every connection it is offered; each costs a descriptor, buffers and
a task. Past ``--max-connections`` a new connection gets one ``503`` with ``Retry-After`` and
is closed at once, so a flood of idle or slow connections cannot exhaust the process. (A
connection that never completes its headers is closed by aiohttp's keep-alive timer, set to
``--header-timeout-s``; a body that stalls gets ``408``, ``gateway.state``.)
"""

from __future__ import annotations

import asyncio
from typing import cast

import orjson
from aiohttp import web

from gateway.metrics import GatewayMetrics

_BODY = orjson.dumps(
    {
        "error": {
            "kind": "overloaded",
            "message": "the gateway holds its maximum of open connections; retry shortly",
        }
    }
)
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
    + f"Content-Length: {len(_BODY)}\r\nConnection: close\r\n\r\n".encode()
    + _BODY
)


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.WriteTransport, transport)  # uvloop's is one, not a subclass
        stream.write(REFUSAL)
        stream.close()


class ConnectionLimit:
    """A protocol factory for ``loop.create_server``: aiohttp's handler while fewer than
    ``limit`` connections are open, a refusal otherwise."""

    def __init__(self, server: web.Server, limit: int, metrics: GatewayMetrics) -> None:
        self.server = server
        self.limit = limit
        self.refused = metrics.requests.labels(route="connection", status="503")

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.server.connections) >= self.limit:
            self.refused.inc()
            return _Refuse()
        return self.server()


async def listen(
    runner: web.AppRunner, host: str, port: int, limit: int, metrics: GatewayMetrics
) -> asyncio.AbstractServer:
    """Serve ``runner``'s app on ``host:port``; the caller closes the returned server
    before ``runner.cleanup()``."""
    assert runner.server is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        ConnectionLimit(runner.server, limit, metrics), host, port, backlog=1024
    )
