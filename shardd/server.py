"""The shard's ZeroMQ server: one ROUTER socket read by the loop, lookups off the loop.

``health``, ``info`` and ``stats`` are answered on the loop at once, even while lookups run.
A lookup is refused at once when the shard is draining (``not_ready``), past its deadline
(``deadline_exceeded``) or already holds ``queue_limit`` lookups (``overloaded``); otherwise
the loop decodes and checks it and prepares its kernel calls, so bad input is answered at
once, and a worker only runs the compiled loop (after checking the deadline again): a
worker's caches are cold after each lookup it pools, so the Python it runs costs it several
times what it costs the loop. A lookup of at most ``inline_ids`` ids (resident parts only)
is pooled right on the loop: that costs less than the hand-off. Any bad input becomes a
typed error reply; nothing a client sends can stop the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import zmq

from recserve.contracts.errors import (
    BadRequest,
    DeadlineExceeded,
    NotReady,
    Overloaded,
    RecserveError,
)
from recserve.contracts.manifest import Manifest
from recserve.rpc.deadline import Deadline
from recserve.rpc.loopsocket import LoopSocket
from recserve.rpc.wire import (
    decode_header,
    decode_lookup,
    error_reply,
    pack_header,
    reply,
)
from shardd.cpus import pin
from shardd.metrics import ShardMetrics
from shardd.store import Group, Job, PartStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    shard: int
    replica: int
    queue_limit: int = 64
    workers: int = 1
    kernel_threads: int | None = None
    inline_ids: int = 0  # lookups of at most this many ids are pooled on the loop
    kernel_cpus: frozenset[int] | None = None  # the workers' CPUs; None: not pinned


class ShardServer:
    def __init__(
        self,
        sock: zmq.Socket,
        store: PartStore,
        manifest: Manifest,
        settings: ServerSettings,
        metrics: ShardMetrics,
    ) -> None:
        self.sock = sock
        self.store = store
        self.manifest = manifest
        self.settings = settings
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(
            settings.workers, thread_name_prefix="shardd-kernel", initializer=self._start_worker
        )
        self.inflight = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.io: LoopSocket | None = None

    def _start_worker(self) -> None:
        if self.settings.kernel_cpus is not None:
            pin(self.settings.kernel_cpus)

    def start(self) -> None:
        """Serve from the running loop until ``drain``."""
        self.loop = asyncio.get_running_loop()
        self.io = LoopSocket(self.sock, self._on_message, self._on_error)

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return  # only a routing id: nothing to answer
        self.metrics.bytes_in.inc(sum(len(f.buffer) for f in frames[1:]))
        self._dispatch(frames[0], frames[1:])

    def _on_error(self, exc: zmq.ZMQError) -> None:
        log.error("the shard's socket failed: %s", exc)

    def _dispatch(self, ident: zmq.Frame, body: list[zmq.Frame]) -> None:
        header: dict[str, Any] | None = None
        try:
            header = decode_header(body[0].buffer)
            op = header["op"]
            if op != "lookup":
                if len(body) > 1:
                    raise BadRequest(f"{op} takes no data frames", field="frames")
                self._send(ident, [pack_header(self._answer(header))], op, "ok")
                return
            if self.draining:
                raise NotReady("the shard is shutting down; retry on another replica")
            if _past_deadline(header):
                raise DeadlineExceeded("the request arrived after its deadline")
            if self.inflight >= self.settings.queue_limit:
                raise Overloaded(f"{self.inflight} lookups already queued", retry_after=0.05)
            lookup = decode_lookup(header, [f.buffer for f in body[1:]])
            inline = lookup.ids.size <= self.settings.inline_ids
            job = self.store.prepare(lookup, 1 if inline else self.settings.kernel_threads)
        except RecserveError as exc:
            op = header.get("op", "unknown") if header else "unknown"
            self._send(ident, [error_reply(header, exc)], str(op), exc.kind)
            return
        except Exception:
            log.exception("preparing lookup %s failed", header.get("id") if header else None)
            internal = RecserveError("internal error; see the shard's log")
            self._send(ident, [error_reply(header, internal)], "lookup", internal.kind)
            return
        self.inflight += 1
        self.idle.clear()
        self.metrics.queue_depth.set(self.inflight)
        started = time.perf_counter()
        if inline:
            # Pooling up to ~16k resident rows takes 0.1-0.3 ms, little more than handing
            # the lookup to a worker and back (0.13 ms of CPU, and 0.15 ms of latency with
            # the worker awake, more when it sleeps), so such lookups stay on the loop.
            done: Future[Any] = Future()
            try:
                done.set_result(self._work(header, job, started))
            except Exception as exc:
                done.set_exception(exc)
            self.metrics.inline.inc()
            self._finish(ident, header, job, done, started)
            return
        work = self.pool.submit(self._work, header, job, started)
        work.add_done_callback(lambda done: self._hand_back(ident, header, job, done, started))

    def _hand_back(
        self, ident: zmq.Frame, header: dict[str, Any], job: Job, done: Future[Any], started: float
    ) -> None:
        """In the worker: pass the result to the loop, which alone touches the socket."""
        try:
            self.loop.call_soon_threadsafe(self._finish, ident, header, job, done, started)
        except RuntimeError:  # the loop is gone: a drain gave up on this lookup
            log.warning("lookup %s finished after shutdown; not answered", header.get("id"))

    def _answer(self, header: dict[str, Any]) -> dict[str, Any]:
        m = self.manifest
        if header["op"] == "health":
            return reply(header, ready=not self.draining, inflight=self.inflight)
        if header["op"] == "info":
            return reply(
                header,
                shard=self.settings.shard,
                replica=self.settings.replica,
                model={"name": m.name, "version": m.version, "digest": m.digest()},
                parts=self.store.describe(),
                bytes=self.store.nbytes,
                kernel_cpus=sorted(self.settings.kernel_cpus or ()),
            )
        counts: dict[str, float] = {}
        for metric in self.metrics.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    key = f"{sample.labels['op']}:{sample.labels['outcome']}"
                    counts[key] = sample.value
        return reply(
            header,
            requests=counts,
            inflight=self.inflight,
            inline=_value(self.metrics.inline),
            ids=_value(self.metrics.ids),
            bags=_value(self.metrics.bags),
        )

    def _finish(
        self, ident: zmq.Frame, header: dict[str, Any], job: Job, done: Future[Any], started: float
    ) -> None:
        """On the loop: reply with a finished lookup's result or error."""
        outcome = "ok"
        try:
            groups, queued, worked = done.result()
            self.metrics.ids.inc(job.ids)
            self.metrics.bags.inc(job.bags)
            meta = [
                {"parts": list(g.parts), "bags": g.pooled.shape[0], "dim": g.pooled.shape[2]}
                for g in groups
            ]
            # Where the time went, for the gateway's per-stage metrics.
            timing = {"queue_ms": round(queued * 1e3, 3), "work_ms": round(worked * 1e3, 3)}
            out: list[Any] = [
                pack_header(reply(header, groups=meta, **timing)),
                *[g.pooled for g in groups],
            ]
        except RecserveError as exc:
            outcome = exc.kind
            out = [error_reply(header, exc)]
        except CancelledError:  # a drain that gave up cancelled it before it ran
            gone = NotReady("the shard shut down before this lookup ran")
            outcome = gone.kind
            out = [error_reply(header, gone)]
        except Exception:
            log.exception("lookup %s failed", header.get("id"))
            outcome = "internal"
            out = [error_reply(header, RecserveError("internal error; see the shard's log"))]
        finally:
            self.inflight -= 1
            self.metrics.queue_depth.set(self.inflight)
            if not self.inflight:
                self.idle.set()
        self._send(ident, out, "lookup", outcome)
        if outcome == "ok":
            self.metrics.latency.observe(time.perf_counter() - started)

    def _work(
        self, header: dict[str, Any], job: Job, started: float
    ) -> tuple[list[Group], float, float]:
        """The CPU-heavy part of a lookup, in a worker (or inline on the loop, prepared for
        one thread: no OpenMP team shared with the workers). Returns the groups, the seconds
        the lookup waited for a worker and the seconds it took."""
        begin = time.perf_counter()
        if _past_deadline(header):
            raise DeadlineExceeded("the deadline passed while the lookup was queued")
        groups = job.run()
        return groups, begin - started, time.perf_counter() - begin

    def _send(self, ident: zmq.Frame, frames: list[Any], op: str, outcome: str) -> None:
        """Reply; a ROUTER never blocks (it drops for a peer that is gone)."""
        self.metrics.request(op, outcome)
        self.metrics.bytes_out.inc(sum(memoryview(f).nbytes for f in frames))
        assert self.io is not None
        try:
            self.io.send([ident, *frames])
        except zmq.ZMQError as exc:
            log.warning("reply to %s dropped: %s", op, exc)

    async def drain(self, timeout: float) -> int:
        """Stop taking lookups, wait up to ``timeout`` s for those in flight; returns how
        many were still running when it gave up."""
        self.draining = True
        if self.inflight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), timeout)
        left = self.inflight
        self.pool.shutdown(wait=False, cancel_futures=True)
        return left

    def close(self) -> None:
        """Stop reading the socket (the caller closes it)."""
        if self.io is not None:
            self.io.close()


def _past_deadline(header: dict[str, Any]) -> bool:
    deadline = Deadline.from_wire(header.get("deadline_ms"))
    return deadline is not None and deadline.expired()


def _value(counter: Any) -> float:
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                return float(sample.value)
    return 0.0
