"""A blocking ``health`` probe of one shard daemon, for tools that wait for daemons to start
(``recserve up``, tests, benchmarks); the gateway probes through its async client."""

from __future__ import annotations

from typing import Any

import zmq

from recserve.contracts.errors import RecserveError
from recserve.rpc.curve import CurveKeys
from recserve.rpc.deadline import Deadline
from recserve.rpc.wire import decode_header, pack_header, request


def health(
    endpoint: str, timeout_s: float = 0.5, keys: CurveKeys | None = None
) -> dict[str, Any] | None:
    """The shard's health reply, or None when it did not answer in ``timeout_s``."""
    deadline = Deadline.after(timeout_s * 1e3)
    sock: zmq.Socket[bytes]
    with zmq.Context.instance().socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.secure_client(sock)
        sock.connect(endpoint)
        sock.send(pack_header(request("health", 1, deadline.at_ms)))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        try:
            return decode_header(sock.recv())
        except RecserveError:
            return None


def ready(endpoint: str, timeout_s: float = 0.5, keys: CurveKeys | None = None) -> bool:
    reply = health(endpoint, timeout_s, keys)
    return bool(reply and reply.get("ok") and reply.get("ready"))
