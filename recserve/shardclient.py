"""The asyncio client of one shard daemon: what the gateway uses to talk to shards.

One DEALER socket per endpoint, read by the loop (``LoopSocket``): one reader callback
resolves per-request futures by id, so replies can never reach the wrong caller (ids are
never reused). Every call is bounded by its deadline: a dead or stalled shard becomes
``ShardUnavailable`` naming the shard, never a hang. If the socket fails, every waiter gets
that error at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from recserve.errors import RecserveError, ShardUnavailable, error_class
from recserve.loopsocket import LoopSocket
from recserve.wire import PartRequest, decode_header, encode_lookup, pack_header, request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PooledGroup:
    parts: tuple[int, ...]  # indices into the request's parts
    pooled: np.ndarray  # float32 [bags, len(parts), dim], a view of the received frame


def now_ms() -> float:
    return time.time() * 1e3


class ShardClient:
    def __init__(self, endpoint: str, ctx: zmq.Context[Any], *, name: str = "") -> None:
        """Connect from the running loop; ``ctx`` may be a plain or an asyncio context (the
        socket is a plain one either way)."""
        self.endpoint = endpoint
        self.name = name or endpoint
        self.sock: zmq.Socket[Any] = zmq.Socket(ctx, zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a connected shard
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.connect(endpoint)
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[tuple[dict[str, Any], list[zmq.Frame]]]] = {}
        self.broken: RecserveError | None = None
        self.io = LoopSocket(self.sock, self._on_reply, self._on_error)

    def _on_reply(self, frames: list[zmq.Frame]) -> None:
        try:
            header = decode_header(frames[0].buffer)
        except RecserveError as exc:
            log.warning("dropping a malformed reply from %s: %s", self.name, exc)
            return
        fut = self.pending.pop(header["id"], None)
        if fut is not None and not fut.done():
            fut.set_result((header, frames[1:]))

    def _on_error(self, exc: zmq.ZMQError) -> None:
        log.error("socket to shard %s failed: %s", self.name, exc)
        self._fail(
            ShardUnavailable(f"shard {self.name} ({self.endpoint}): connection failed ({exc})")
        )

    def _fail(self, exc: RecserveError) -> None:
        self.broken = exc
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self.pending.clear()

    async def call(
        self, frames: Sequence[Any], req_id: int, deadline_ms: float
    ) -> tuple[dict[str, Any], list[zmq.Frame]]:
        if self.broken is not None:
            raise self.broken
        fut: asyncio.Future[tuple[dict[str, Any], list[zmq.Frame]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.pending[req_id] = fut
        budget = max(0.0, (deadline_ms - now_ms()) / 1e3)
        try:
            async with asyncio.timeout(budget):
                while not self.io.send(list(frames)):  # not connected yet, or queue full
                    await self.io.writable()
                header, data = await fut
        except TimeoutError:
            raise ShardUnavailable(
                f"shard {self.name} ({self.endpoint}) did not answer within {budget * 1e3:.0f} ms"
            ) from None
        except zmq.ZMQError as exc:
            raise ShardUnavailable(f"shard {self.name}: {exc}") from None
        finally:
            self.pending.pop(req_id, None)
        if not header.get("ok"):
            err = header.get("error") or {}
            kind, message = err.get("kind", "internal"), err.get("message", "")
            raise error_class(str(kind))(f"shard {self.name}: {message}")
        return header, data

    async def simple(self, op: str, deadline_ms: float) -> dict[str, Any]:
        req_id = next(self.ids)
        header, _ = await self.call(
            [pack_header(request(op, req_id, deadline_ms))], req_id, deadline_ms
        )
        return header

    async def lookup(
        self,
        parts: Sequence[PartRequest],
        ids: np.ndarray,
        lengths: np.ndarray,
        *,
        deadline_ms: float,
        weights: np.ndarray | None = None,
    ) -> list[PooledGroup]:
        req_id = next(self.ids)
        frames = encode_lookup(req_id, deadline_ms, parts, ids, lengths, weights)
        header, data = await self.call(frames, req_id, deadline_ms)
        groups = header.get("groups")
        if not isinstance(groups, list) or len(groups) != len(data):
            raise ShardUnavailable(f"shard {self.name}: malformed lookup reply")
        out = []
        for g, frame in zip(groups, data, strict=True):
            idx = tuple(g["parts"])
            arr = np.frombuffer(frame.buffer, dtype="<f4")
            shape = (g["bags"], len(idx), g["dim"])
            if arr.size != shape[0] * shape[1] * shape[2]:
                raise ShardUnavailable(f"shard {self.name}: reply frame does not match {shape}")
            out.append(PooledGroup(idx, arr.reshape(shape)))
        return out

    async def close(self) -> None:
        self.io.close()
        self._fail(ShardUnavailable(f"shard {self.name}: client closed"))
        self.sock.close(linger=0)
