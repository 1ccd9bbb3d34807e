"""Where pooled embeddings come from: in-process (``--singular``) or from the shards.

Both implement ``prepare(batch)`` and ``pool(batch, prepared, deadline_ms, finish)``; the
batcher does not know which. ``prepare`` runs in the executor with the batch assembly, and
``finish`` (the dense MLP) is applied to the pooled ``[B, features, dim]`` in the pooler's
last executor step: each hop to a worker thread and back costs ~0.06 ms when the threads
are busy and ~0.2 ms when they wake from idle (2 vCPUs), so a batch makes two hops in either
mode. The sharded one routes each feature's ids to the parts that hold them (a table split
by rows has its ids masked per part and its partial pools summed back; ``mean`` tables split
across shards are asked for sums and divided by the true bag length after merging), makes
one lookup per shard per batch, all shards concurrently, and fails over to the next replica
of a shard within the deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import zmq

from gateway.metrics import GatewayMetrics
from recserve.batch import Batch
from recserve.errors import RecserveError, ShardUnavailable
from recserve.manifest import Manifest
from recserve.model import Model
from recserve.plan import Part, Plan
from recserve.shardclient import PooledGroup, ShardClient, now_ms
from recserve.wire import PartRequest

log = logging.getLogger(__name__)


T = TypeVar("T")


class Pooler(Protocol):
    def prepare(self, batch: Batch) -> Any:
        """In the executor, with the batch's assembly: whatever ``pool`` needs first."""
        ...

    async def pool(
        self,
        batch: Batch,
        prepared: Any,
        deadline_ms: float,
        finish: Callable[[np.ndarray], T],
    ) -> T:
        """``finish`` of the pooled ``[B, features, dim]``, applied in the executor."""
        ...

    async def probe(self, deadline_ms: float) -> list[str]: ...

    async def close(self) -> None: ...


class LocalPooler:
    """Every table in this process: the single-server baseline."""

    def __init__(self, model: Model, executor: Executor) -> None:
        self.model = model
        self.executor = executor

    def prepare(self, batch: Batch) -> None:
        return None

    async def pool(
        self,
        batch: Batch,
        prepared: Any,
        deadline_ms: float,
        finish: Callable[[np.ndarray], T],
    ) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: finish(self.model.pool(batch))
        )

    async def probe(self, deadline_ms: float) -> list[str]:
        return []

    async def close(self) -> None:
        return None


@dataclass
class ShardRequest:
    parts: list[PartRequest] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray | None] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # feature index of each part
    packed: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None  # set by route()
    narrow: bool = True  # every part's table has < 2**31 rows: ids travel as int32

    def frames(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        # Ids were checked against their table's rows when the request was parsed, so the
        # cast is exact; int32 halves the request bytes and the ids the shard reads.
        if self.narrow:
            ids = np.concatenate(self.ids, dtype=np.int32, casting="unsafe")
        else:
            ids = np.concatenate(self.ids).astype(np.int64, copy=False)
        lengths = np.concatenate(self.lengths).astype(np.int32, copy=False)
        weights = None
        if any(w is not None for w in self.weights):
            weights = np.concatenate(
                [
                    w if w is not None else np.ones(i.size, np.float32)
                    for w, i in zip(self.weights, self.ids, strict=True)
                ]
            )
        return ids, lengths, weights


class ShardedPooler:
    def __init__(
        self,
        manifest: Manifest,
        plan: Plan,
        ctx: zmq.Context[Any],
        executor: Executor,
        metrics: GatewayMetrics,
    ) -> None:
        self.metrics = metrics
        self.manifest = manifest
        self.executor = executor
        self.features = list(manifest.features())
        self.clients = {
            s.id: [ShardClient(ep, ctx, name=f"{s.id}/{r}") for r, ep in enumerate(s.endpoints)]
            for s in plan.shards
        }
        self.parts: dict[str, list[tuple[int, Part]]] = {}
        for s in plan.shards:
            for p in s.parts:
                self.parts.setdefault(p.table, []).append((s.id, p))
        # Features whose table is split by rows: their parts are summed in merge().
        self.split = {
            k for k, (_, spec) in enumerate(self.features) if len(self.parts[spec.name]) > 1
        }
        self.turn = itertools.count()

    def route(self, batch: Batch) -> dict[int, ShardRequest]:
        out: dict[int, ShardRequest] = {}
        for k, (feature, spec) in enumerate(self.features):
            bags = batch.bags[feature]
            split = k in self.split
            for shard_id, part in self.parts[spec.name]:
                if split:
                    mask = (bags.ids >= part.row_start) & (bags.ids < part.row_end)
                    seen = np.zeros(bags.ids.size + 1, np.int64)
                    np.cumsum(mask, out=seen[1:])
                    lengths = seen[bags.bounds[1:]] - seen[bags.bounds[:-1]]
                    ids = bags.ids[mask]
                    weights = None if bags.weights is None else bags.weights[mask]
                else:
                    ids, lengths, weights = bags.ids, bags.lengths(), bags.weights
                req = out.setdefault(shard_id, ShardRequest())
                req.narrow &= spec.rows <= 2**31
                req.parts.append(
                    PartRequest(
                        spec.name, part.row_start, bags.n_bags, "sum" if split else spec.pooling
                    )
                )
                req.ids.append(ids)
                req.lengths.append(lengths)
                req.weights.append(weights)
                req.targets.append(k)
        for req in out.values():  # packed here, in the executor, not on the loop
            req.packed = req.frames()
        return out

    def merge(
        self, batch: Batch, routes: dict[int, ShardRequest], replies: dict[int, list[PooledGroup]]
    ) -> np.ndarray:
        """The shards' pooled groups as ``[B, features, dim]``: a table served whole is
        written straight from its group (a group of such tables in one assignment), row
        splits are summed first."""
        dim = self.manifest.embedding_dim
        out = np.empty((batch.size, len(self.features), dim), np.float32)
        acc: dict[int, np.ndarray] = {}  # split features' partial sums
        for shard_id, groups in replies.items():
            targets = routes[shard_id].targets
            for g in groups:
                ks = [targets[i] for i in g.parts]
                if not self.split.intersection(ks):
                    rows = g.pooled.shape[0]
                    if rows == 1 or (  # one bag each: every sample uses it
                        rows == batch.size
                        and all(batch.bags[self.features[k][0]].index is None for k in ks)
                    ):
                        out[:, ks, :] = g.pooled
                        continue
                for j, k in enumerate(ks):
                    if k in self.split:
                        if k in acc:
                            acc[k] += g.pooled[:, j, :]
                        else:
                            acc[k] = g.pooled[:, j, :].copy()
                    else:
                        self._put(out, batch, k, g.pooled[:, j, :])
        for k in self.split:
            bags = batch.bags[self.features[k][0]]
            total = acc.get(k)
            if total is None:  # no shard holds a part of it (cannot happen with a valid plan)
                total = np.zeros((bags.n_bags, dim), np.float32)
            if self.features[k][1].pooling == "mean":
                n = bags.lengths()
                np.divide(total, n[:, None], out=total, where=n[:, None] > 0)
            self._put(out, batch, k, total)
        return out

    def _put(self, out: np.ndarray, batch: Batch, k: int, pooled: np.ndarray) -> None:
        index = batch.bags[self.features[k][0]].index
        out[:, k, :] = pooled if index is None else pooled[index]

    def prepare(self, batch: Batch) -> dict[int, ShardRequest]:
        return self.route(batch)

    async def pool(
        self,
        batch: Batch,
        prepared: Any,
        deadline_ms: float,
        finish: Callable[[np.ndarray], T],
    ) -> T:
        routes: dict[int, ShardRequest] = prepared
        ids = list(routes)
        self.metrics.shards_contacted.observe(len(ids))
        replies = dict(
            zip(
                ids,
                await asyncio.gather(*(self._call(s, routes[s], deadline_ms) for s in ids)),
                strict=True,
            )
        )
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: finish(self.merge(batch, routes, replies))
        )

    async def _call(
        self, shard_id: int, req: ShardRequest, deadline_ms: float
    ) -> list[PooledGroup]:
        assert req.packed is not None, "route() packs every request"
        ids, lengths, weights = req.packed
        replicas = self.clients[shard_id]
        first = next(self.turn) % len(replicas)
        error: RecserveError | None = None
        for r in range(len(replicas)):
            client = replicas[(first + r) % len(replicas)]
            left = deadline_ms - now_ms()
            if left <= 0:
                break
            # Each remaining replica gets an equal share of the time left, so a stalled one
            # leaves room to fail over.
            share = now_ms() + left / (len(replicas) - r)
            try:
                start = time.perf_counter()
                groups = await client.lookup(
                    req.parts, ids, lengths, weights=weights, deadline_ms=share
                )
                self.metrics.shard_rpc.labels(shard=str(shard_id)).observe(
                    time.perf_counter() - start
                )
                sent = ids.nbytes + lengths.nbytes + (weights.nbytes if weights is not None else 0)
                self.metrics.shard_bytes.labels(direction="sent").inc(sent)
                self.metrics.shard_bytes.labels(direction="received").inc(
                    sum(g.pooled.nbytes for g in groups)
                )
                return groups
            except ShardUnavailable as exc:
                log.warning("shard %s: %s", client.name, exc.message)
                error = exc
        raise error or ShardUnavailable(f"shard {shard_id}: no replica answered in time")

    async def probe(self, deadline_ms: float) -> list[str]:
        """Names of replicas that do not answer ``health``."""

        async def one(client: ShardClient) -> str | None:
            try:
                reply = await client.simple("health", deadline_ms)
                return None if reply.get("ready") else client.name
            except RecserveError:
                return client.name

        names = await asyncio.gather(*(one(c) for cs in self.clients.values() for c in cs))
        return [n for n in names if n]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for cs in self.clients.values() for c in cs))
