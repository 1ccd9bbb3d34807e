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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from recserve.contracts.errors import (
    RecserveError,
    ShardUnavailable,
    SharedMemoryUnavailable,
    remote_error,
)
from recserve.rpc.curve import CurveKeys
from recserve.rpc.deadline import Deadline
from recserve.rpc.loopsocket import LoopSocket
from recserve.rpc.shm import ALIGN, Arena, Loan
from recserve.rpc.wire import (
    MAX_FRAME,
    PartRequest,
    StagePart,
    decode_header,
    decode_stage,
    encode_lookup,
    encode_stage,
    lookup_arrays,
    pack_header,
    request,
)

log = logging.getLogger(__name__)
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class PooledGroup:
    parts: tuple[int, ...]  # indices into the request's parts
    pooled: np.ndarray  # float32 [bags, len(parts), dim], a view of the received frame
    shared: bool = False  # or of the shared memory the shard pooled into


class Pooled(list[PooledGroup]):
    """A lookup's pooled groups, and the seconds the shard reports spending on the lookup
    (queued there, then pooling; None if the reply does not say): the rest of its round
    trip is the transport and the threads' wake-ups. ``into``: the parts the shard pooled
    straight into the lookup's ``Into`` array (in no group)."""

    on_shard: float | None = None
    into: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Into:
    """A batch's ``[rows, width, dim]`` array in an arena the shards on this host map, for
    a lookup's parts to be pooled straight into: part ``i`` into column ``cols[i]`` (-1:
    not into it, answered in a group)."""

    arena: Arena
    array: np.ndarray
    spec: dict[str, object]  # path, key, at, shape (``Arena.array``)
    cols: tuple[int, ...]

    def header(self) -> dict[str, object]:
        return {**self.spec, "cols": list(self.cols)}

    def placed(self) -> list[int]:
        return [i for i, c in enumerate(self.cols) if c >= 0]


class ShardClient:
    def __init__(
        self,
        endpoint: str,
        ctx: zmq.Context[Any],
        *,
        name: str = "",
        keys: CurveKeys | None = None,
        shm_bytes: int = 0,
    ) -> None:
        """Connect from the running loop; ``ctx`` may be a plain or an asyncio context (the
        socket is a plain one either way). With ``keys`` the connection is CURVE. With
        ``shm_bytes`` and a shard on this host (an ``ipc://`` or loopback endpoint) lookups
        go through an arena of that size (``recserve.rpc.shm``)."""
        self.endpoint = endpoint
        self.name = name or endpoint
        self.sock: zmq.Socket[Any] = zmq.Socket(ctx, zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a connected shard
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)  # a shard cannot make us take more
        if keys is not None:
            keys.secure_client(self.sock)
        self.sock.connect(endpoint)
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[tuple[dict[str, Any], list[zmq.Frame]]]] = {}
        self.broken: RecserveError | None = None
        self.arena = _arena(endpoint, shm_bytes)
        self.abandoned: dict[int, Loan] = {}  # timed out: the shard may still write them
        self.held: dict[int, Into] = {}  # likewise: batch arrays it may still pool into
        self.io = LoopSocket(self.sock, self._on_reply, self._on_error)

    def _on_reply(self, frames: list[zmq.Frame]) -> None:
        try:
            header = decode_header(frames[0].buffer)
        except RecserveError as exc:
            log.warning("dropping a malformed reply from %s: %s", self.name, exc)
            return
        fut = self.pending.pop(header["id"], None)
        if fut is None:  # a late reply: the shard is done with that lookup's region
            self.abandoned.pop(header["id"], None)
            self.held.pop(header["id"], None)
        elif not fut.done():
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
        self, frames: Sequence[Any], req_id: int, deadline: Deadline
    ) -> tuple[dict[str, Any], list[zmq.Frame]]:
        header, data = await self._exchange(frames, req_id, deadline)
        _check(header, self.name)
        return header, data

    async def _exchange(
        self,
        frames: Sequence[Any],
        req_id: int,
        deadline: Deadline,
        loan: Loan | None = None,
        into: Into | None = None,
    ) -> tuple[dict[str, Any], list[zmq.Frame]]:
        """The reply, error replies included; raises only when none came. A ``loan`` (and
        an ``into`` array) sent and not answered (timed out, cancelled) is kept until the
        shard's late reply."""
        if self.broken is not None:
            raise self.broken
        fut: asyncio.Future[tuple[dict[str, Any], list[zmq.Frame]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.pending[req_id] = fut
        budget = deadline.left_s()
        sent = False
        timer: asyncio.TimerHandle | None = None
        try:
            if not self.io.send(list(frames)):  # not connected yet, or queue full
                async with asyncio.timeout(budget):
                    while not self.io.send(list(frames)):
                        await self.io.writable()
            sent = True
            # The deadline fails the reply's future itself: ``asyncio.timeout`` costs a
            # context manager, a task lookup and a reschedule, on every lookup.
            loop = asyncio.get_running_loop()
            timer = loop.call_at(loop.time() + deadline.left_s(), _expire, fut)
            header, data = await fut
        except TimeoutError:
            raise ShardUnavailable(
                f"shard {self.name} ({self.endpoint}) did not answer within {budget * 1e3:.0f} ms"
            ) from None
        except zmq.ZMQError as exc:
            raise ShardUnavailable(f"shard {self.name}: {exc}") from None
        finally:
            if timer is not None:
                timer.cancel()
            self.pending.pop(req_id, None)
            replied = fut.done() and not fut.cancelled() and fut.exception() is None
            if loan is not None and sent and not replied:
                self.abandoned[req_id] = loan  # the shard may still write into it
                if into is not None:
                    self.held[req_id] = into
        return header, data

    async def simple(self, op: str, deadline: Deadline) -> dict[str, Any]:
        req_id = next(self.ids)
        header, _ = await self.call(
            [pack_header(request(op, req_id, deadline.at_ms))], req_id, deadline
        )
        return header

    async def lookup(
        self,
        parts: Sequence[PartRequest],
        ids: np.ndarray,
        lengths: np.ndarray,
        *,
        deadline: Deadline,
        weights: np.ndarray | None = None,
        dim: int | None = None,
        version: int | None = None,
        into: Into | None = None,
        lent: Loan | None = None,
    ) -> Pooled:
        """Pooled groups of ``parts``; a reply that does not answer exactly these parts
        (each once, with its bag count, and ``dim`` wide when given) is the shard's failure,
        ``ShardUnavailable``, which may fail over, never a crash of the caller. With
        ``into`` (used only through this client's own arena: a shard on this host) the
        parts it places are pooled straight into its array, or answered in groups by a
        shard that does not (``Pooled.into`` says which). ``lent``: a region of this
        client's arena already holding ``ids``, ``lengths`` and ``weights`` (``reserve``d
        and filled off the loop), used if the arena is still the client's."""
        req_id = next(self.ids)
        ids, lengths, weights = lookup_arrays(ids, lengths, weights)
        loan = None
        if self.arena is not None and dim is not None and self.broken is None:
            self._rotate_if_lost()
            if lent is not None and lent.arena is self.arena:
                loan = lent
            else:  # room for every part: a shard that does not pool into ``into`` uses it
                loan = self.arena.lend(ids, lengths, weights, reply_bytes(parts, dim))
        if loan is None:
            into = None
            frames = encode_lookup(req_id, deadline.at_ms, parts, ids, lengths, weights, version,
                                   as_sent=True)  # fmt: skip
            header, data = await self.call(frames, req_id, deadline)
        else:
            spec = into.header() if into is not None else None
            frames = encode_lookup(req_id, deadline.at_ms, parts, ids, lengths, weights,
                                   version, shm=loan.spec, into=spec, as_sent=True)  # fmt: skip
            header, data = await self._exchange(frames, req_id, deadline, loan, into)
            error = header.get("error")
            if isinstance(error, dict) and error.get("kind") == SharedMemoryUnavailable.kind:
                log.info("shard %s cannot map our shared memory: lookups go by socket", self.name)
                if self.arena is not None:
                    self.arena.close()
                self.arena = None
                return await self.lookup(
                    parts, ids, lengths, deadline=deadline, weights=weights, dim=dim,
                    version=version,
                )  # fmt: skip
            _check(header, self.name)
        try:
            placed = _placed(header.get("into"), into)
            groups = Pooled(_groups(header.get("groups"), data, loan, parts, dim, placed))
        except (TypeError, ValueError, KeyError) as exc:
            raise ShardUnavailable(f"shard {self.name}: malformed lookup reply ({exc})") from None
        groups.on_shard = _on_shard(header)
        groups.into = frozenset(placed)
        return groups

    def forget(self, arena: Arena) -> None:
        """Stop holding batch arrays of ``arena`` for late replies: nothing is allocated
        from it any more (its owner made a new one), so no late write can reach a batch."""
        self.held = {k: v for k, v in self.held.items() if v.arena is not arena}

    def held_bytes(self, arena: Arena) -> int:
        """Bytes of ``arena``'s batch arrays held for late replies to this client."""
        return sum(v.array.nbytes for v in self.held.values() if v.arena is arena)

    def _rotate_if_lost(self) -> None:
        """A quarter of the arena waiting for replies that may never come (a shard killed
        with lookups in flight): a new arena for what follows. The old file is unlinked;
        whatever the shard still writes goes to its pages, which no one reads."""
        assert self.arena is not None
        if sum(loan.base.nbytes for loan in self.abandoned.values()) * 4 <= self.arena.size:
            return
        log.warning("shard %s: a quarter of its shared memory went unanswered; a new one",
                    self.name)  # fmt: skip
        old, self.abandoned = self.arena, {}
        old.close()
        self.arena = _arena(self.endpoint, old.size)

    async def stage(
        self,
        version: int,
        parts: Sequence[StagePart],
        *,
        deadline: Deadline,
        dense: bytes | None = None,
    ) -> dict[str, Any]:
        """Stage ``version`` (new rows of this shard's parts, and maybe the model's new dense
        weights for the shard to keep); the reply holds its versions."""
        req_id = next(self.ids)
        header, _ = await self.call(
            encode_stage(req_id, deadline.at_ms, version, parts, dense), req_id, deadline
        )
        return header

    async def dense(self, *, deadline: Deadline) -> tuple[int | None, bytes | None]:
        """The newest committed dense weights the shard keeps: (version, ``.npz`` bytes),
        or (None, None)."""
        req_id = next(self.ids)
        frames = [pack_header(request("dense", req_id, deadline.at_ms))]
        header, data = await self.call(frames, req_id, deadline)
        version = header.get("version")
        if version is None:
            return None, None
        if type(version) is not int or len(data) != 1:
            raise ShardUnavailable(f"shard {self.name}: malformed dense reply")
        return version, bytes(data[0].buffer)

    async def load(self, version: int, path: str, *, deadline: Deadline) -> dict[str, Any]:
        """Open the artifact at ``path`` beside the served one as ``version`` (a deploy's
        stage; ``decide`` commits or aborts it)."""
        req_id = next(self.ids)
        head = request("load", req_id, deadline.at_ms, version=version, model=path)
        header, _ = await self.call([pack_header(head)], req_id, deadline)
        return header

    async def decide(self, op: str, version: int, *, deadline: Deadline) -> dict[str, Any]:
        """``commit`` or ``abort`` a staged version."""
        req_id = next(self.ids)
        frames = [pack_header(request(op, req_id, deadline.at_ms, version=version))]
        header, _ = await self.call(frames, req_id, deadline)
        return header

    async def history(self, since: int, *, deadline: Deadline) -> list[tuple[int, list[StagePart]]]:
        """The versions a replica committed after ``since``, with their rows."""
        req_id = next(self.ids)
        frames = [pack_header(request("log", req_id, deadline.at_ms, since=since))]
        header, data = await self.call(frames, req_id, deadline)
        versions, cols = header.get("versions"), header.get("parts")
        if not isinstance(versions, list) or not isinstance(cols, list):
            raise ShardUnavailable(f"shard {self.name}: malformed log reply")
        if len(versions) != len(cols) or len(data) != 2 * len(cols):
            raise ShardUnavailable(f"shard {self.name}: malformed log reply")
        out = []
        for k, (v, c) in enumerate(zip(versions, cols, strict=True)):
            parts = decode_stage({"parts": c}, [data[2 * k].buffer, data[2 * k + 1].buffer])
            out.append((int(v), parts))
        return out

    async def close(self) -> None:
        if self.arena is not None:
            self.arena.close()
        self.io.close()
        self._fail(ShardUnavailable(f"shard {self.name}: client closed"))
        self.sock.close(linger=0)


def _expire(fut: asyncio.Future[Any]) -> None:
    """A call's deadline passed: its waiter gets ``TimeoutError``."""
    if not fut.done():
        fut.set_exception(TimeoutError())


def _check(header: dict[str, Any], name: str) -> None:
    """Raise the error a reply carries, as our class of its kind."""
    if not header.get("ok"):
        err = header.get("error")
        err = err if isinstance(err, dict) else {}
        raise remote_error(
            str(err.get("kind", "internal")),
            f"shard {name}: {err.get('message', '')}",
            err.get("field") if isinstance(err.get("field"), str) else None,
        )


def _arena(endpoint: str, size: int) -> Arena | None:
    """An arena for a shard on this host, or None (none asked, a remote shard, no
    ``/dev/shm``)."""
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    if not size or not (endpoint.startswith("ipc://") or host in LOOPBACK):
        return None
    try:
        return Arena(size)
    except (OSError, ValueError) as exc:
        log.info("no shared memory for %s (%s): lookups go by socket", endpoint, exc)
        return None


def reply_bytes(parts: Sequence[PartRequest], dim: int) -> int:
    """Room for a lookup's reply: every part's floats, each group of them aligned."""
    return sum(4 * p.bags * dim + ALIGN for p in parts)


def _placed(answered: Any, into: Into | None) -> list[int]:
    """The parts a reply says went into the ``into`` array: exactly those asked for, or
    none (a shard that does not pool into one answers them in groups)."""
    if answered is None:
        return []
    want = into.placed() if into is not None else []
    if answered != want:
        raise ValueError(f"parts {answered!r} pooled into the batch, asked for {want}")
    return want


def _groups(
    groups: Any,
    data: list[zmq.Frame],
    loan: Loan | None,
    parts: Sequence[PartRequest],
    dim: int | None,
    placed: list[int] | None = None,
) -> list[PooledGroup]:
    """The reply's groups, checked against the request (``placed``: parts answered in the
    batch's array instead): views of its frames, or with ``loan`` of the shared memory the
    shard pooled into."""
    if not isinstance(groups, list):
        raise ValueError("groups must be a list")
    if len(data) != (len(groups) if loan is None else 0):
        raise ValueError(f"{len(groups)} groups in {len(data)} frames")
    seen = [False] * len(parts)
    for i in placed or ():
        seen[i] = True
    out = []
    for n, g in enumerate(groups):
        idx = tuple(g["parts"])
        bags, width = g["bags"], g["dim"]
        if type(bags) is not int or type(width) is not int or width < 1:
            raise ValueError("bags and dim must be integers")
        if dim is not None and width != dim:
            raise ValueError(f"dim {width}, expected {dim}")
        for i in idx:
            if type(i) is not int or not 0 <= i < len(parts) or seen[i]:
                raise ValueError(f"part {i!r} is unknown or answered twice")
            if parts[i].bags != bags:
                raise ValueError(f"part {i} has {parts[i].bags} bags, not {bags}")
            seen[i] = True
        count = bags * len(idx) * width
        if loan is None:
            arr = np.frombuffer(data[n].buffer, dtype="<f4")
        else:
            arr = loan.floats(g.get("offset"), count)
        if arr.size != count:
            raise ValueError(f"frame of {arr.size} floats for {(bags, len(idx), width)}")
        out.append(PooledGroup(idx, arr.reshape(bags, len(idx), width), loan is not None))
    if not all(seen):
        raise ValueError(f"part {seen.index(False)} was not answered")
    return out


def _on_shard(header: dict[str, Any]) -> float | None:
    """The reply's ``queue_ms + work_ms`` in seconds, if both are sane numbers."""
    total = 0.0
    for key in ("queue_ms", "work_ms"):
        value = header.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        if not 0 <= value < 3.6e6:  # also refuses NaN
            return None
        total += value
    return total / 1e3
