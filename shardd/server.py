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
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from recserve.contracts.errors import (
    BadRequest,
    DeadlineExceeded,
    NotReady,
    Overloaded,
    RecserveError,
)
from recserve.rpc.deadline import Deadline
from recserve.rpc.loopsocket import LoopSocket
from recserve.rpc.shm import Maps, Region
from recserve.rpc.wire import (
    MAX_REPLY_FLOATS,
    check_version,
    decode_header,
    decode_into,
    decode_lookup,
    decode_shm,
    decode_stage,
    error_reply,
    pack_header,
    reply,
    split_dense,
    stage_columns,
)
from recserve.runtime.priority import lower_priority
from shardd.cpus import pin
from shardd.metrics import ShardMetrics
from shardd.models import RELEASE_S, Models
from shardd.store import Group, Job, PartStore

log = logging.getLogger(__name__)
UPDATE_OPS = frozenset({"stage", "commit", "abort", "log", "dense", "load"})
INLINE_FLOATS = 1 << 20  # pooled floats (4 MiB) a lookup pooled on the loop may write


@dataclass(frozen=True)
class ServerSettings:
    shard: int
    replica: int
    queue_limit: int = 64
    workers: int = 1
    kernel_threads: int | None = None
    inline_ids: int = 0  # lookups of at most this many ids are pooled on the loop
    kernel_cpus: frozenset[int] | None = None  # the workers' CPUs; None: not pinned
    max_reply_floats: int = MAX_REPLY_FLOATS  # pooled floats one lookup may ask for
    cpus: frozenset[int] | None = None  # the whole daemon's CPUs; None: not pinned


class Call:
    """One accepted lookup, from the loop to a worker (or inline) and back: the kernel's
    groups or the error, and where its time went."""

    __slots__ = (
        "cpu",
        "decoded",
        "error",
        "groups",
        "header",
        "ident",
        "inline",
        "job",
        "prepared",
        "queued",
        "region",
        "started",
        "worked",
    )

    def __init__(
        self,
        ident: zmq.Frame,
        header: dict[str, Any],
        job: Job,
        inline: bool,
        region: Region | None = None,
    ) -> None:
        self.ident = ident
        self.header = header
        self.job = job
        self.inline = inline
        self.region = region  # the shared memory the groups were pooled into, if any
        self.started = time.perf_counter()
        self.groups: list[Group] = []
        self.error: RecserveError | None = None
        self.queued = self.worked = 0.0
        # CPU seconds of its stages (ShardMetrics.staged): decoded and prepared on the loop,
        # pooled (``cpu``) on the thread that runs it.
        self.decoded = self.prepared = self.cpu = 0.0

    def run(self) -> None:
        """The CPU-heavy part, in a worker (or inline on the loop, prepared for one thread:
        no OpenMP team shared with the workers). Never raises: the error is the result."""
        begin, cpu = time.perf_counter(), time.thread_time()
        self.queued = begin - self.started
        try:
            if _past_deadline(self.header):
                raise DeadlineExceeded("the deadline passed while the lookup was queued")
            self.groups = self.job.run()
        except RecserveError as exc:
            self.error = exc
        except Exception:
            log.exception("lookup %s failed", self.header.get("id"))
            self.error = RecserveError("internal error; see the shard's log")
        self.worked = time.perf_counter() - begin
        self.cpu = time.thread_time() - cpu


class ShardServer:
    def __init__(
        self,
        sock: zmq.Socket,
        models: Models,
        settings: ServerSettings,
        metrics: ShardMetrics,
        catch_up: Callable[[PartStore], Awaitable[None]] | None = None,
    ) -> None:
        self.sock = sock
        self.models = models
        # Fetches the versions this replica missed from its peers: asked for a version past
        # the next one (it was out of rotation, not restarted), it catches up first.
        self.catch_up = catch_up
        self.catching_up: asyncio.Task[None] | None = None
        self.settings = settings
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(
            settings.workers, thread_name_prefix="shardd-kernel", initializer=self._start_worker
        )
        self.updates = ThreadPoolExecutor(
            1, thread_name_prefix="shardd-update", initializer=lower_priority
        )
        self.shm = Maps()  # the arenas of the clients on this host
        self.inflight = 0
        metrics.queue_depth.set_function(lambda: self.inflight)
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.io: LoopSocket | None = None

    @property
    def store(self) -> PartStore:
        """The store of the artifact served now (updates apply to it)."""
        return self.models.current.store

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
        self.metrics.received(sum(map(len, frames)) - len(frames[0]))
        self._dispatch(frames[0], frames[1:])

    def _on_error(self, exc: zmq.ZMQError) -> None:
        log.error("the shard's socket failed: %s", exc)

    def _dispatch(self, ident: zmq.Frame, body: list[zmq.Frame]) -> None:
        header: dict[str, Any] | None = None
        begin = time.thread_time()
        try:
            header = decode_header(body[0].buffer)
            op = header["op"]
            if op in UPDATE_OPS:
                self._update(ident, header, body[1:])
                return
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
            spec = decode_shm(header)
            region: Region | None = None
            if spec is None:
                arrays: list[Any] = [f.buffer for f in body[1:]]
            elif len(body) > 1:
                raise BadRequest("a lookup through shm sends no data frames", field="frames")
            else:
                arrays, region = self.shm.resolve(spec)
            lookup = decode_lookup(header, arrays, check_lengths=False)  # prepare checks
            spec_into = decode_into(header, len(lookup.parts))
            into = None if spec_into is None else (self.shm.into(spec_into), spec_into.cols)
            # Inline only when small in ids and in output: bags x widest dim bounds it.
            inline = (
                lookup.ids.size <= self.settings.inline_ids
                and lookup.lengths.size * self.store.max_dim <= INLINE_FLOATS
            )
            threads = 1 if inline else self.settings.kernel_threads
            version = check_version(header, required=False)
            store = self.models.store_for(version)
            decoded = time.thread_time()
            job = store.prepare(
                lookup, threads, self.settings.max_reply_floats, version, region, into
            )
            prepared = time.thread_time()
        except Exception as exc:
            if not isinstance(exc, RecserveError):
                log.exception("preparing lookup %s failed", header and header.get("id"))
                exc = RecserveError("internal error; see the shard's log")
            op = header.get("op", "unknown") if header else "unknown"
            self._send(ident, [error_reply(header, exc)], str(op), exc.kind)
            return
        call = Call(ident, header, job, inline, region)
        call.decoded, call.prepared = decoded - begin, prepared - decoded
        self.inflight += 1
        self.idle.clear()
        if inline:
            # Handing a lookup to a worker and back costs ~0.13 ms of CPU and two thread
            # wake-ups, which leave the loop's next lookups slower (cold caches): lookups
            # under the limit (ShardConfig.inline_limit) are cheaper pooled right here.
            call.run()
            self._complete(call)
        else:
            self.pool.submit(call.run).add_done_callback(lambda f: self._hand_back(call, f))

    def _update(self, ident: zmq.Frame, header: dict[str, Any], frames: list[zmq.Frame]) -> None:
        """``stage``, ``commit`` or ``abort``: checked on the loop, applied (CPU, fsync) on
        the one update thread, answered back on the loop."""
        op = header["op"]
        versions = self.store.versions
        if op == "log":
            self._history(ident, header)
            return
        if op == "dense":
            kept = versions.dense
            msg = [pack_header(reply(header, version=kept[0] if kept else None))]
            self._send(ident, [*msg, *([kept[1]] if kept else [])], op, "ok")
            return
        version = check_version(header, required=True)
        assert version is not None
        work: Callable[[], object]  # run on the update thread; what it returns is dropped
        if op == "stage":
            rows, dense = split_dense(header, [f.buffer for f in frames])
            parts = decode_stage(header, rows)
            work = functools.partial(versions.stage, version, parts, dense=dense)
        elif frames:
            raise BadRequest(f"{op} takes no data frames", field="frames")
        elif op == "load":
            path = header.get("model")
            if not isinstance(path, str) or not path:
                raise BadRequest("model must name the artifact's directory", field="model")
            work = functools.partial(self.models.load, version, Path(path))
        else:
            work = functools.partial(self._decide, op, version)
        behind = op in ("stage", "load") and version > versions.current + 1
        if behind and self.catch_up is not None:
            self.catching_up = self.loop.create_task(self._behind(ident, header, work, version))
            return
        self._submit(ident, header, work, version)

    async def _behind(
        self, ident: zmq.Frame, header: dict[str, Any], work: Callable[[], object], version: int
    ) -> None:
        """Catch up from the peers (the versions this replica missed), then stage."""
        assert self.catch_up is not None
        log.info("asked to stage version %d at %d: catching up first", version,
                 self.store.versions.current)  # fmt: skip
        try:
            await self.catch_up(self.store)
        except Exception:
            log.exception("catching up failed")
        self._submit(ident, header, work, version)

    def _submit(
        self, ident: zmq.Frame, header: dict[str, Any], work: Callable[[], object], version: int
    ) -> None:
        """Run ``work`` (an update op) on the update thread and answer it on the loop."""
        op = header["op"]

        def done(f: Future[object]) -> None:
            exc = f.exception()
            if exc is not None and not isinstance(exc, RecserveError):
                log.error("%s of version %d failed", op, version, exc_info=exc)
                exc = RecserveError("internal error; see the shard's log")
            if exc is None:
                described = self._versions()
                self.metrics.updated(described)
                msg, outcome = pack_header(reply(header, **described)), "ok"
                if op == "commit" and self.store.wants_compaction():
                    self.updates.submit(self._compact)  # after this reply, on the same thread
            else:
                assert isinstance(exc, RecserveError)
                msg, outcome = error_reply(header, exc), exc.kind
            self.loop.call_soon_threadsafe(self._send, ident, [msg], op, outcome)

        self.updates.submit(work).add_done_callback(done)

    def _decide(self, op: str, version: int) -> None:
        """``commit`` or ``abort`` (on the update thread): of a deploy, or of an update."""
        models = self.models
        if op == "commit":
            if models.commit(version):
                self.loop.call_soon_threadsafe(self.loop.call_later, RELEASE_S, self._release)
            else:
                models.current.store.versions.commit(version)
        elif not models.abort(version):
            models.current.store.versions.abort(version)

    def _release(self) -> None:
        """Close the artifacts a deploy replaced (on the update thread: not under a load)."""
        if not self.draining:
            self.updates.submit(self.models.release)

    def _versions(self) -> dict[str, Any]:
        """The current store's versions, with a deploy under way as the staged one."""
        return {**self.store.versions.describe(), "staged": self.models.staged()}

    def _compact(self) -> None:
        """Fold the newest version into new part files (on the update thread). A failure
        (a full disk) is logged and leaves the shard serving its corrections; the next
        commit tries again."""
        begin, store = time.perf_counter(), self.store
        written = store.versions.compacted_bytes
        try:
            parts = store.compact()
        except Exception:
            log.exception("compaction failed; serving the updates from memory and the log")
            return
        took = time.perf_counter() - begin
        if parts:
            self.metrics.compaction.observe(took)
            self.metrics.compacted_bytes.inc(store.versions.compacted_bytes - written)
            self.metrics.updated(self.store.versions.describe())
            log.info("compacted %d parts at version %d in %.2f s", parts,
                     self.store.versions.current, took)  # fmt: skip

    def _history(self, ident: zmq.Frame, header: dict[str, Any]) -> None:
        """``log``: the committed versions after ``since`` (read off the loop), for a replica
        catching up."""
        since = header.get("since")
        if not isinstance(since, int) or since < 0:
            raise BadRequest("since must be an integer >= 0", field="since")

        def done(f: Future[list[tuple[int, list[Any]]]]) -> None:
            exc = f.exception()
            if exc is not None:
                err = exc if isinstance(exc, RecserveError) else RecserveError("internal error")
                msg = [error_reply(header, err)]
                outcome = err.kind
            else:
                cols, frames = [], []
                for _, parts in f.result():
                    c, fr = stage_columns(parts)
                    cols.append(c)
                    frames += fr
                versions = [v for v, _ in f.result()]
                msg = [pack_header(reply(header, versions=versions, parts=cols)), *frames]
                outcome = "ok"
            self.loop.call_soon_threadsafe(self._send, ident, msg, "log", outcome)

        self.updates.submit(self.store.versions.history, since).add_done_callback(done)

    def _hand_back(self, call: Call, done: Future[None]) -> None:
        """In the worker (or wherever a cancelled future calls back): pass the lookup to
        the loop, which alone touches the socket."""
        if done.cancelled():  # a drain that gave up cancelled it before it ran
            call.error = NotReady("the shard shut down before this lookup ran")
        try:
            self.loop.call_soon_threadsafe(self._complete, call)
        except RuntimeError:  # the loop is gone: a drain gave up on this lookup
            log.warning("lookup %s finished after shutdown; not answered", call.header.get("id"))

    def _complete(self, call: Call) -> None:
        """On the loop, the one completion path of every accepted lookup: reply, count."""
        begin = time.thread_time()
        self.inflight -= 1
        if not self.inflight:
            self.idle.set()
        if call.error is not None:
            self._send(
                call.ident, [error_reply(call.header, call.error)], "lookup", call.error.kind
            )
            self._staged(call, begin)
            return
        job = call.job
        try:  # counting must never cost the reply
            self.metrics.pooled(job.ids, job.bags, inline=call.inline)
            if (got := job.fetched) is not None:
                self.metrics.cached(got.hits, got.misses, got.bypassed, got.evictions, got.disk_s)
        except Exception:
            log.exception("counting lookup %s failed", call.header.get("id"))
        groups = [g for g in call.groups if not g.into]
        meta = [
            {"parts": list(g.parts), "bags": g.pooled.shape[0], "dim": g.pooled.shape[2]}
            for g in groups
        ]
        if call.region is not None:  # pooled in place: the reply says where
            for m, at in zip(meta, call.region.offsets, strict=True):
                m["offset"] = at
        # Where the time went, for the gateway's per-stage metrics (not rounded: a float
        # packs in 9 bytes either way).
        extra: dict[str, Any] = {"queue_ms": call.queued * 1e3, "work_ms": call.worked * 1e3}
        if len(groups) < len(call.groups):  # and which parts went straight into ``into``
            extra["into"] = sorted(i for g in call.groups if g.into for i in g.parts)
        frames: list[Any] = [pack_header(reply(call.header, groups=meta, **extra))]
        if call.region is None:
            frames += [g.pooled for g in groups]
        self._send(call.ident, frames, "lookup", "ok")
        self.metrics.latency.observe(time.perf_counter() - call.started)
        self._staged(call, begin)

    def _staged(self, call: Call, replying: float) -> None:
        """Count an answered lookup's CPU seconds per stage (``replying``: the loop's thread
        time when its reply began)."""
        reply = time.thread_time() - replying
        self.metrics.staged(call.decoded, call.prepared, call.cpu, reply)

    def _answer(self, header: dict[str, Any]) -> dict[str, Any]:
        versions = self._versions()
        if header["op"] == "health":
            return reply(
                header,
                ready=not self.draining,
                inflight=self.inflight,
                version=versions["version"],
                staged=versions["staged"],
            )
        if header["op"] == "info":
            return reply(
                header,
                shard=self.settings.shard,
                replica=self.settings.replica,
                model=self.models.current.describe(),
                parts=self.store.describe(),
                bytes=self.store.nbytes,
                cpus=sorted(self.settings.cpus or ()),
                kernel_cpus=sorted(self.settings.kernel_cpus or ()),
                cache=self._cache(),
                versions=versions,
            )
        return reply(
            header,
            requests=dict(self.metrics.counts),
            stage_cpu_seconds=dict(self.metrics.stages),
            inflight=self.inflight,
            cache=self._cache(),
            versions=versions,
            **self.metrics.totals,
        )

    def _cache(self) -> dict[str, Any] | None:
        """The row cache's size and counts (None without one)."""
        tier = self.store.tier
        if tier is None:
            return None
        c = self.metrics.cache
        asked = c["hits"] + c["misses"] + c["bypassed"]
        return {
            "bytes": tier.nbytes,
            "budget": tier.budget,
            "slots": sum(p.slots for p in tier.parts),
            "resident_parts": len(tier.resident),
            "rows_cached": tier.rows_cached(),
            "row_bytes_cached": tier.bytes_cached(),
            "direct_io": tier.direct,
            "hit_rate": round(c["hits"] / asked, 6) if asked else None,
            **c,
        }

    def _send(self, ident: zmq.Frame, frames: list[Any], op: str, outcome: str) -> None:
        """Reply; a ROUTER never blocks (it drops for a peer that is gone)."""
        self.metrics.request(op, outcome, sum(memoryview(f).nbytes for f in frames))
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
        self.updates.shutdown(wait=True)  # a stage or commit under way reaches its log
        return left

    def close(self) -> None:
        """Stop reading the socket (the caller closes it)."""
        if self.io is not None:
            self.io.close()


def _past_deadline(header: dict[str, Any]) -> bool:
    deadline = Deadline.from_wire(header.get("deadline_ms"))
    return deadline is not None and deadline.expired()
