"""The gateway's listening socket, with a bound on open connections.

aiohttp's server accepts every connection it is offered; each costs a descriptor, buffers and
a task. Past ``--max-connections`` a new connection gets one ``503`` with ``Retry-After`` and
is closed at once, so a flood of idle or slow connections cannot exhaust the process. (A
connection that never completes its headers is closed by aiohttp's keep-alive timer, set to
``--header-timeout-s``; a body that stalls gets ``408``, ``gateway.state``.)
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, cast

import orjson
from aiohttp import web

from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

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


class HandedOver:
    """A worker's connections: accepted by the supervisor (``gateway.workers``) and passed
    over ``channel``, a unix socket, as descriptors. ``close`` stops taking them."""

    def __init__(
        self, channel: socket.socket, protocol: ConnectionLimit, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.channel = channel
        self.protocol = protocol
        self.loop = loop
        self.tasks: set[asyncio.Task[Any]] = set()
        channel.setblocking(False)
        loop.add_reader(channel.fileno(), self._receive)

    def _receive(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.channel, 64, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        if not data and not fds:  # the supervisor is gone
            self.close()
            return
        for fd in fds:
            conn = socket.socket(fileno=fd)
            task = self.loop.create_task(self.loop.connect_accepted_socket(self.protocol, conn))
            self.tasks.add(task)
            task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # closed by its client
            log.debug("a handed-over connection failed: %s", task.exception())

    def close(self) -> None:
        if self.channel.fileno() >= 0:
            self.loop.remove_reader(self.channel.fileno())
            self.channel.close()


async def listen(
    runner: web.AppRunner,
    host: str,
    port: int,
    limit: int,
    metrics: GatewayMetrics,
    channel: socket.socket | None = None,
) -> asyncio.AbstractServer | HandedOver:
    """Serve ``runner``'s app on ``host:port``, or, in a worker, on the connections handed
    over ``channel``; the caller closes the returned server before ``runner.cleanup()``."""
    assert runner.server is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()
    protocol = ConnectionLimit(runner.server, limit, metrics)
    if channel is not None:
        return HandedOver(channel, protocol, loop)
    return await loop.create_server(protocol, host, port, backlog=1024)
