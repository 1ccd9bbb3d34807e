"""Where pooled embeddings come from: in-process (``--singular``) or from the shards.

Both implement ``prepare(batch)`` and ``pool(batch, prepared, deadline, finish)``; the
batcher does not know which. ``prepare`` runs in the executor with the batch assembly, and
``finish`` (the dense MLP) is applied to the pooled ``[B, features, dim]`` in the pooler's
last executor step: each hop to a worker thread and back costs ~0.06 ms when the threads
are busy and ~0.2 ms when they wake from idle (2 vCPUs), so a batch makes two hops in either
mode. The sharded one routes (``Router``), makes one lookup per contacted shard, all shards
concurrently, each through its ``ReplicaSet``, and merges the replies (``Merger``).

Shards on this host pool straight into the batch's ``[B, features, dim]`` array: it is
allocated in an arena of shared memory they map (``recserve.rpc.shm``), each lookup names
the column of each of its parts that is a feature's whole column (a table served whole, one
bag a sample), and the merge has only the rest to copy (row splits, request-level bags). An
array a shard may still write into (its lookup timed out unanswered) stays taken until that
shard's late reply; once a quarter of the arena waits so, a new arena replaces it. A
lookup to a shard of one replica on this host has its ids concatenated straight into that
replica's arena by ``prepare``, in the executor: one copy, not on the loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

import numpy as np
import zmq

from gateway.config import ReplicaSettings
from gateway.metrics import GatewayMetrics
from gateway.replicas import ReplicaSet
from gateway.routing import Merger, Router, ShardRequest
from recserve.contracts.batch import Batch
from recserve.contracts.manifest import Manifest
from recserve.contracts.plan import Plan
from recserve.model.scorer import Model
from recserve.rpc.client import Into, reply_bytes
from recserve.rpc.curve import CurveKeys
from recserve.rpc.deadline import Deadline
from recserve.rpc.shm import MAX_ARENA, Arena, remove_stale

T = TypeVar("T")


class Pooler(Protocol):
    version: int  # the newest model version every shard has committed (0: none)

    def prepare(self, batch: Batch) -> Any:
        """In the executor, with the batch's assembly: whatever ``pool`` needs first."""
        ...

    async def pool(
        self,
        batch: Batch,
        prepared: Any,
        deadline: Deadline,
        finish: Callable[[np.ndarray], T],
        version: int | None = None,
    ) -> T:
        """``finish`` of the pooled ``[B, features, dim]`` at ``version``, applied in the
        executor."""
        ...

    async def probe(self, deadline: Deadline) -> list[str]: ...

    async def close(self) -> None: ...


class LocalPooler:
    """Every table in this process: the single-server baseline."""

    def __init__(
        self,
        model: Model,
        executor: Executor,
        metrics: GatewayMetrics,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.executor = executor
        self.metrics = metrics
        self.threads = threads  # the pooling kernel's (None: the process's cores)
        self.version = 0  # a singular gateway serves its files as they are

    def prepare(self, batch: Batch) -> None:
        return None

    async def pool(
        self,
        batch: Batch,
        prepared: Any,
        deadline: Deadline,
        finish: Callable[[np.ndarray], T],
        version: int | None = None,
    ) -> T:

        def pool() -> T:
            with self.metrics.cpu("pooling"):
                pooled = self.model.pool(batch, self.threads)
            return finish(pooled)

        return await asyncio.get_running_loop().run_in_executor(self.executor, pool)

    async def probe(self, deadline: Deadline) -> list[str]:
        return []

    async def close(self) -> None:
        return None


class ShardedPooler:
    def __init__(
        self,
        manifest: Manifest,
        plan: Plan,
        ctx: zmq.Context[Any],
        executor: Executor,
        metrics: GatewayMetrics,
        settings: ReplicaSettings,
        keys: CurveKeys | None = None,
        batch_samples: int = 1024,
    ) -> None:
        """``batch_samples``: the most samples a batch usually has (the batch arena holds
        four such batches' pooled arrays, or ``shm_bytes`` if more)."""
        self.metrics = metrics
        self.executor = executor
        self.dim = manifest.embedding_dim
        self.router = Router(manifest, plan)
        self.merger = Merger(manifest, self.router)
        if settings.shm_bytes:
            remove_stale()  # arenas of SIGKILLed gateways
        self.replicas = {
            s.id: ReplicaSet.connect(s, ctx, metrics, settings, keys) for s in plan.shards
        }
        self.clients = [r.client for rs in self.replicas.values() for r in rs.replicas]
        self.arena: Arena | None = None  # the batches' pooled arrays, if a shard is local
        if any(c.arena is not None for c in self.clients):
            width = len(self.router.features) * self.dim * 4  # bytes of a sample's features
            size = min(MAX_ARENA, max(settings.shm_bytes, 4 * batch_samples * width))
            try:
                self.arena = Arena(size)
            except (OSError, ValueError):
                self.arena = None  # batches are merged from the replies, as without it
        self.version = 0  # set from the shards' health at start, then by each commit

    def prepare(self, batch: Batch) -> dict[int, ShardRequest]:
        routes = self.router.route(batch)
        for shard, req in routes.items():
            req.packed = self._pack(shard, req)
        return routes

    def _pack(
        self, shard: int, req: ShardRequest
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """In the executor: ``req``'s wire arrays, written straight into the arena of its
        shard's replica when it has one, on this host (one copy of the ids, and not on the
        loop); else as ``frames`` makes them."""
        replicas = self.replicas[shard].replicas
        arena = replicas[0].client.arena if len(replicas) == 1 else None
        got = None
        if arena is not None:
            got = arena.reserve(req.wire_arrays(), reply_bytes(req.parts, self.dim))
        if got is None:
            return req.frames()
        req.lent, views = got
        return req.frames(views)

    def _into(self, batch: Batch, routes: dict[int, ShardRequest]) -> dict[int, Into]:
        """On the loop: the batch's pooled array in the arena, and per shard which of its
        parts to pool into it; empty when there is no arena or no room in it."""
        if self.arena is None:
            return {}
        cols = {s: tuple(req.cols) for s, req in routes.items() if max(req.cols) >= 0}
        if not cols:
            return {}
        shape = (batch.size, len(self.router.features), self.dim)
        got = self.arena.array(shape)
        if got is None and 4 * 4 * math.prod(shape) <= self.arena.size:
            # No room, though four batches fit: arrays wait for replies that may never come
            # (a shard killed with lookups in flight). Once they are a quarter of the arena,
            # a new one; late writes go to the old one's pages, which no batch uses again.
            held = sum(c.held_bytes(self.arena) for c in self.clients)
            if 4 * held >= self.arena.size:
                got = self._renew(shape)
        if got is None:
            return {}
        array, spec = got
        return {s: Into(self.arena, array, spec, c) for s, c in cols.items()}

    def _renew(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, dict[str, object]] | None:
        """A new batch arena in place of the old, and an array of ``shape`` in it; None
        (the old one kept) when ``/dev/shm`` has no room for another."""
        assert self.arena is not None
        try:
            new = Arena(self.arena.size)
        except (OSError, ValueError):
            return None
        old, self.arena = self.arena, new
        old.close()
        for c in self.clients:
            c.forget(old)
        return new.array(shape)

    async def pool(
        self,
        batch: Batch,
        prepared: Any,
        deadline: Deadline,
        finish: Callable[[np.ndarray], T],
        version: int | None = None,
    ) -> T:
        routes: dict[int, ShardRequest] = prepared
        ids = list(routes)
        self.metrics.shards_contacted.observe(len(ids))
        into = self._into(batch, routes)
        out = next(iter(into.values())).array if into else None
        replies = await asyncio.gather(
            *(self._lookup(routes[s], s, deadline, version, into.get(s)) for s in ids)
        )
        by_shard = dict(zip(ids, replies, strict=True))
        del into  # the array lives on in ``out`` (and where a shard may still write into it)

        def merge() -> T:
            with self.metrics.cpu("merge"):
                pooled = self.merger.merge(batch, routes, by_shard, out)
            return finish(pooled)

        return await asyncio.get_running_loop().run_in_executor(self.executor, merge)

    async def _lookup(
        self,
        req: ShardRequest,
        shard: int,
        deadline: Deadline,
        version: int | None,
        into: Into | None = None,
    ) -> Any:
        assert req.packed is not None, "prepare() packs every request"
        return await self.replicas[shard].lookup(
            req.parts, req.packed, deadline, self.dim, version, into, req.lent
        )

    async def probe(self, deadline: Deadline) -> list[str]:
        """Shards none of whose replicas answers ``health`` as ready (every replica is
        probed: an ejected one comes back through its probe)."""
        await asyncio.gather(*(r.probe(deadline) for r in self.replicas.values()))
        return [f"shard {r.id}" for r in self.replicas.values() if not r.serving]

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self.replicas.values()))
        if self.arena is not None:
            self.arena.close()
