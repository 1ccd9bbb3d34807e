"""One shard's replicas: which one a lookup goes to, and what happens when it does not answer.

- Routing: among the replicas in rotation (answering their probe, not ejected) the one with
  the fewest lookups outstanding; ties go round robin.
- Failover: on every outcome that says "this replica, now" (``RETRYABLE``: no reply in time,
  a broken connection, a malformed reply, ``not_ready`` while it drains, ``overloaded``, a
  failed disk read, ``io_error``) the
  lookup goes to the next replica within the request's deadline; never on a client error,
  which every replica would give alike. Retries spend a budget earned by lookups
  (``--retry-budget``), so a sick cluster is not buried in retries.
- Outlier ejection (Envoy's model): ``--eject-after`` failures in a row (a retryable error,
  or losing to its own hedge) take a replica out of rotation for a backoff that doubles with
  each ejection (1 s up to 30 s); only the health probe brings it back, once the backoff is
  over and the replica answers.
- Hedging: with ``--hedge-after-ms`` (milliseconds, or ``pNN`` of this shard's recent
  lookups) a lookup without an answer by then is sent to a second replica too; the first
  answer wins and the other is cancelled. Hedges spend their own budget
  (``--hedge-budget``, the share of lookups that may be hedged).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from gateway.config import ReplicaSettings
from gateway.metrics import GatewayMetrics
from recserve.contracts.errors import RecserveError, ShardUnavailable
from recserve.contracts.plan import ShardPlan
from recserve.rpc.client import Into, PooledGroup, ShardClient
from recserve.rpc.curve import CurveKeys
from recserve.rpc.deadline import Deadline, now_ms
from recserve.rpc.shm import Loan
from recserve.rpc.wire import PartRequest

log = logging.getLogger(__name__)

RETRYABLE = frozenset(
    {"shard_unavailable", "not_ready", "overloaded", "io_error", "version_unavailable"}
)
BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0
LATENCIES = 256  # recent lookups kept per shard for a percentile hedge delay
MIN_SAMPLES, COLD_HEDGE_S = 20, 0.05  # below that many, a percentile hedge waits 50 ms


class Budget:
    """Extra work (retries, hedges) paid for by ordinary work: each lookup earns ``ratio``
    of a token, up to ``burst``; an extra lookup spends one."""

    def __init__(self, ratio: float, burst: float = 10.0) -> None:
        self.ratio, self.burst, self.tokens = ratio, burst, burst

    def earn(self) -> None:
        self.tokens = min(self.burst, self.tokens + self.ratio)

    def take(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class Replica:
    client: ShardClient
    index: int
    ready: bool = True  # its last probe answered ready
    outstanding: int = 0
    failures: int = 0  # in a row
    ejections: int = 0
    ejected_until: float = 0.0  # time.monotonic()
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.client.name

    def in_rotation(self, now: float) -> bool:
        return self.ready and not self.ejected_until  # the probe readmits (clears it)


class ReplicaSet:
    def __init__(
        self,
        shard_id: int,
        clients: list[ShardClient],
        metrics: GatewayMetrics,
        settings: ReplicaSettings,
    ) -> None:
        self.id = shard_id
        self.replicas = [
            Replica(client, r, labels={"shard": str(shard_id), "replica": str(r)})
            for r, client in enumerate(clients)
        ]
        self.metrics = metrics
        self.settings = settings
        # Labelled children resolved once: ``labels()`` costs a lock and a dict a call, and
        # these are touched on every lookup.
        shard = str(shard_id)
        self.rpc = metrics.shard_rpc.labels(shard=shard)
        self.work = metrics.shard_work.labels(shard=shard)
        self.hedges_sent = metrics.hedges.labels(shard=shard, outcome="sent")
        self.hedges_won = metrics.hedges.labels(shard=shard, outcome="won")
        self.retried = metrics.retries.labels(shard=shard)
        self.sent_bytes = metrics.shard_bytes.labels(direction="sent")
        self.received_bytes = metrics.shard_bytes.labels(direction="received")
        self.shm_lookups = metrics.shm_lookups.labels(shard=shard)
        self.into_lookups = metrics.into_lookups.labels(shard=shard)
        self.outstanding = [metrics.replica_outstanding.labels(**r.labels) for r in self.replicas]
        self.outcomes: dict[tuple[int, str], Any] = {}
        self.turn = itertools.count()
        self.latencies: deque[float] = deque(maxlen=LATENCIES)
        self.retries = Budget(settings.retry_budget)
        self.hedges = Budget(settings.hedge_budget)

    @classmethod
    def connect(
        cls,
        shard: ShardPlan,
        ctx: zmq.Context[Any],
        metrics: GatewayMetrics,
        settings: ReplicaSettings,
        keys: CurveKeys | None = None,
    ) -> ReplicaSet:
        """A client per replica endpoint of ``shard``."""
        clients = [
            ShardClient(ep, ctx, name=f"{shard.id}/{r}", keys=keys, shm_bytes=settings.shm_bytes)
            for r, ep in enumerate(shard.endpoints)
        ]
        return cls(shard.id, clients, metrics, settings)

    # -- choosing ---------------------------------------------------------------------------

    def order(self) -> list[Replica]:
        """Replicas to try, best first: in rotation by fewest outstanding, then the rest
        (a shard whose every replica is out still gets its lookups tried)."""
        now = time.monotonic()
        start = next(self.turn)
        n = len(self.replicas)
        rotated = [self.replicas[(start + i) % n] for i in range(n)]
        live = sorted((r for r in rotated if r.in_rotation(now)), key=lambda r: r.outstanding)
        return live + [r for r in rotated if not r.in_rotation(now)]

    def hedge_delay(self) -> float | None:
        """Seconds after which a lookup is hedged, or None (off, or no basis yet)."""
        hedge = self.settings.hedge_after_ms
        if hedge == "off" or len(self.replicas) < 2:
            return None
        if hedge.startswith("p"):
            if len(self.latencies) < MIN_SAMPLES:  # no basis yet: a conservative delay
                return COLD_HEDGE_S
            return float(np.percentile(self.latencies, float(hedge[1:])))
        return float(hedge) / 1e3

    def _worth_hedging(self, order: list[Replica], first: Replica) -> bool:
        """A hedge goes only to a replica in rotation that is no busier than the one it
        covers for: one with lookups stuck on it (dead or stalled) would waste the hedge
        and the budget that the lookups stuck on it need."""
        return bool(order) and (
            order[0].in_rotation(time.monotonic()) and order[0].outstanding <= first.outstanding
        )

    # -- one lookup -------------------------------------------------------------------------

    async def lookup(
        self,
        parts: list[PartRequest],
        packed: tuple[np.ndarray, np.ndarray, np.ndarray | None],
        deadline: Deadline,
        dim: int,
        version: int | None = None,
        into: Into | None = None,
        lent: Loan | None = None,
    ) -> list[PooledGroup]:
        """``lent``: the lookup's arrays already in a replica's arena (``ShardClient``)."""
        self.retries.earn()
        self.hedges.earn()
        if len(self.replicas) == 1:  # nothing to fail over to or hedge with: no task
            return await self._try(
                self.replicas[0], parts, packed, deadline, dim, version, into, lent
            )
        order = self.order()
        hedge = self.hedge_delay()
        running: dict[asyncio.Task[list[PooledGroup]], Replica] = {}
        hedged: Replica | None = None
        error: RecserveError | None = None

        def start(replica: Replica) -> None:
            # Each try gets an equal share of what is left, so a stalled replica leaves time
            # to fail over (a hedge, when there is one, just starts the next try earlier).
            share = deadline.left_ms() / (len(order) + 1)
            task = asyncio.ensure_future(
                self._try(
                    replica, parts, packed, Deadline(now_ms() + share), dim, version, into, lent
                )
            )
            running[task] = replica

        try:
            start(order.pop(0))
            while running:
                wait = deadline.left_s()
                can_hedge = (
                    hedge is not None
                    and hedged is None
                    and len(running) == 1
                    and self._worth_hedging(order, next(iter(running.values())))
                )
                if can_hedge:
                    wait = min(wait, max(0.0, hedge or 0.0))
                done, _ = await asyncio.wait(
                    running, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    if deadline.expired():
                        break
                    if can_hedge and self.hedges.take():
                        hedged = order.pop(0)
                        self.hedges_sent.inc()
                        start(hedged)
                    elif can_hedge:
                        hedge = None  # out of budget: wait for the first
                    continue
                for task in done:
                    replica = running.pop(task)
                    try:
                        groups = task.result()
                    except RecserveError as exc:
                        if exc.kind not in RETRYABLE:
                            raise
                        log.warning("shard %s: %s", replica.name, exc.message)
                        error = exc
                        continue
                    if replica is hedged:
                        self.hedges_won.inc()
                        for beaten in running.values():
                            # Its hedge answered first: a failure in a row, or a dead
                            # replica whose lookups are all cancelled would never leave.
                            self._failed(beaten)
                    return groups
                if not running and order and not deadline.expired():
                    if not self.retries.take():
                        break
                    self.retried.inc()
                    start(order.pop(0))
        finally:
            for task in running:
                task.cancel()
        raise error or ShardUnavailable(f"shard {self.id}: no replica answered in time")

    async def _try(
        self,
        replica: Replica,
        parts: list[PartRequest],
        packed: tuple[np.ndarray, np.ndarray, np.ndarray | None],
        deadline: Deadline,
        dim: int,
        version: int | None = None,
        into: Into | None = None,
        lent: Loan | None = None,
    ) -> list[PooledGroup]:
        ids, lengths, weights = packed
        replica.outstanding += 1
        outstanding = self.outstanding[replica.index]
        outstanding.inc()
        start = time.perf_counter()
        try:
            groups = await replica.client.lookup(
                parts, ids, lengths, weights=weights, deadline=deadline, dim=dim, version=version,
                into=into, lent=lent,
            )  # fmt: skip
        except RecserveError as exc:
            if exc.kind in RETRYABLE:
                self._failed(replica)
            self._count(replica, exc.kind)
            raise
        finally:
            replica.outstanding -= 1
            outstanding.dec()
        seconds = time.perf_counter() - start
        replica.failures = 0
        self.latencies.append(seconds)
        self.rpc.observe(seconds)
        if groups.on_shard is not None:
            self.work.observe(groups.on_shard)
        self._count(replica, "ok")
        sent = ids.nbytes + lengths.nbytes + (weights.nbytes if weights is not None else 0)
        self.sent_bytes.inc(sent)
        self.received_bytes.inc(sum(g.pooled.nbytes for g in groups))
        if (groups and groups[0].shared) or groups.into:
            self.shm_lookups.inc()
        if groups.into:
            self.into_lookups.inc()
        return groups

    def _count(self, replica: Replica, outcome: str) -> None:
        child = self.outcomes.get((replica.index, outcome))
        if child is None:
            child = self.metrics.replica_requests.labels(**replica.labels, outcome=outcome)
            self.outcomes[(replica.index, outcome)] = child
        child.inc()

    def _failed(self, replica: Replica) -> None:
        replica.failures += 1
        if replica.failures >= self.settings.eject_after and replica.ejected_until == 0.0:
            backoff = min(MAX_BACKOFF_S, BACKOFF_S * 2**replica.ejections)
            replica.ejected_until = time.monotonic() + backoff
            replica.ejections += 1
            self.metrics.ejections.labels(**replica.labels).inc()
            log.warning(
                "replica %s ejected for %.0f s after %d failures in a row",
                replica.name,
                backoff,
                replica.failures,
            )

    # -- health ---------------------------------------------------------------------------------

    async def probe(self, deadline: Deadline) -> list[str]:
        """Probe every replica; readmit ejected ones that answer once their backoff is over.
        Returns the names of replicas that did not answer as ready."""

        async def one(replica: Replica) -> None:
            try:
                reply = await replica.client.simple("health", deadline)
                replica.ready = bool(reply.get("ready"))
            except RecserveError:
                replica.ready = False
            now = time.monotonic()
            if replica.ready and replica.ejected_until and now >= replica.ejected_until:
                log.info("replica %s back in rotation", replica.name)
                replica.ejected_until = 0.0
                replica.failures = 0

        await asyncio.gather(*(one(r) for r in self.replicas))
        return [r.name for r in self.replicas if not r.ready]

    @property
    def serving(self) -> bool:
        """At least one replica answers its probe."""
        return any(r.ready for r in self.replicas)

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.client.close()
