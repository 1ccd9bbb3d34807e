"""``recserve shardd``: the process that serves one shard. ``main(argv)`` owns the loop.

Start-up: read the model manifest and the plan (refusing a plan made for another model),
open this shard's parts with mmap (``--preload`` touches every page, ``--hugepages`` copies
them into huge-page memory) or, with ``--cache-bytes``, as a row cache over the files
(warmed from ``--warm-from``'s trace when it exists), load the compiled kernel, bind the
endpoint exclusively, then tell systemd READY=1. SIGTERM/SIGINT: stop taking lookups, let
those in flight finish (``--drain-timeout``), write the cache's trace, tell systemd
STOPPING=1, exit 0. SIGUSR1: write the cache's trace now.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import resource
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvloop
import zmq

import kernels
from kernels import rowcache as rc
from recserve.contracts.errors import ConfigError, RecserveError
from recserve.contracts.manifest import Manifest, read_manifest
from recserve.contracts.plan import Plan, ShardPlan, read_plan
from recserve.contracts.units import format_size, parse_size
from recserve.model.artifact import huge_page_bytes
from recserve.rpc.client import ShardClient
from recserve.rpc.context import serving_context
from recserve.rpc.curve import CurveKeys
from recserve.rpc.deadline import Deadline
from recserve.rpc.wire import MAX_FRAME
from recserve.runtime import logs
from recserve.runtime.config import add_arguments, from_args, option
from recserve.runtime.cpus import pin_process
from recserve.runtime.heap import freeze_startup_heap
from recserve.runtime.systemd import Notifier
from shardd.cache import CacheTier
from shardd.cpus import confine, parse_cpus, split
from shardd.endpoint import bound
from shardd.metrics import ShardMetrics
from shardd.models import Loaded, Models, deployed
from shardd.server import ServerSettings, ShardServer
from shardd.store import PartStore

T = TypeVar("T")
log = logging.getLogger("shardd")
REPLY_FLUSH_MS = 2000
CATCH_UP_MS = 30_000
PEER_PROBE_MS = 1500
FLUSH_S = 0.2
INLINE_ONE = 262_144  # ids pooled on the loop when a worker would use one thread too
INLINE_MANY = 16_384  # ids pooled on the loop when a worker would use several


@dataclass(frozen=True)
class ShardConfig:
    plan: Path = option(help="the sharding plan (plan.json)")
    model: Path = option(help="the model artifact directory")
    shard: int = option(help="the shard of the plan to serve")
    replica: int = option(0, "which of the shard's endpoints (replicas) to bind")
    bind: str | None = option(None, "endpoint to bind instead of the plan's")
    metrics_port: int | None = option(None, "serve Prometheus /metrics on this port")
    metrics_addr: str = option("127.0.0.1", "address for /metrics")
    preload: bool = option(False, "touch every page before serving")
    hugepages: bool = option(
        False,
        "copy the parts into memory backed by transparent huge pages before serving (fewer "
        "TLB misses on random lookups; costs the parts' size in anonymous memory)",
    )
    cache_bytes: int | None = option(
        None,
        "serve the parts from a row cache of at most SIZE bytes (rows and bookkeeping) over "
        "the table files, read around the page cache: for shards larger than memory",
        parse=parse_size,
        metavar="SIZE",
    )
    warm_from: Path | None = option(
        None,
        "the cache's access trace: warm the cache from it at start (when it exists) and "
        "write it there at shutdown and on SIGUSR1",
        metavar="FILE",
    )
    io_threads: int = option(32, "threads reading cache misses from disk (reads in flight)")
    state_dir: Path | None = option(
        None,
        "take online updates (stage/commit) and keep their fsync'ed log here, replayed at "
        "start; without it the shard serves its files as they are",
        metavar="DIR",
    )
    compact_at: float = option(
        0.1,
        "with --state-dir: once the newest version's updated rows are this fraction of the "
        "shard's rows, fold those of the most-updated parts into new part files in the state "
        "directory until the rest are half of it, and shorten the log (0: never)",
        metavar="FRACTION",
    )
    queue_limit: int = option(64, "lookups queued or running; more are refused")
    workers: int = option(1, "threads running lookups")
    kernel_threads: int | None = option(
        None,
        "threads per lookup (default: the --kernel-cpus per worker, else cores - 1, at least 1)",
    )
    inline_ids: int | None = option(
        None,
        "pool lookups of at most N ids on the event loop instead of a worker, when the parts "
        f"are resident (--preload or --hugepages); 0: always a worker (default: {INLINE_ONE} "
        f"when a lookup runs on one kernel thread anyway, else {INLINE_MANY})",
    )
    cpus: frozenset[int] | None = option(
        None,
        "run the whole daemon (loop, ZeroMQ, workers) only on these CPUs (a list like 3 or "
        "2-3): give shards sharing a host CPUs of their own; default: not pinned",
        parse=functools.partial(parse_cpus, flag="--cpus"),
        metavar="LIST",
    )
    kernel_cpus: frozenset[int] | None = option(
        None,
        "run the workers only on these CPUs (a list like 3 or 2-3) and the event loop, ZeroMQ "
        "and /metrics only on the others (of --cpus, when given); default: not pinned",
        parse=parse_cpus,
        metavar="LIST",
    )
    drain_timeout: float = option(10.0, "seconds to finish lookups on SIGTERM")
    max_message_bytes: int = option(
        MAX_FRAME, "largest frame a client may send; a larger one disconnects it"
    )
    max_reply_bytes: int = option(
        MAX_FRAME, "largest reply one lookup may ask for (bags x parts x dim x 4): too_large"
    )
    curve_keys: Path | None = option(
        None,
        "CURVE keys directory (recserve keygen): encrypt the channel and serve only clients "
        "whose public key (*.key) is there",
        metavar="DIR",
    )

    def __post_init__(self) -> None:
        if self.shard < 0 or self.replica < 0:
            raise ConfigError("--shard and --replica must be >= 0")
        if self.queue_limit < 1 or self.workers < 1:
            raise ConfigError("--queue-limit and --workers must be >= 1")
        if self.kernel_threads is not None and self.kernel_threads < 1:
            raise ConfigError("--kernel-threads must be >= 1")
        if self.inline_ids is not None and self.inline_ids < 0:
            raise ConfigError("--inline-ids must be >= 0")
        if self.drain_timeout < 0:
            raise ConfigError("--drain-timeout must be >= 0")
        if self.max_message_bytes < 1024 or self.max_reply_bytes < 4:
            raise ConfigError("--max-message-bytes must be >= 1024, --max-reply-bytes >= 4")
        if self.kernel_cpus is not None and not self.kernel_cpus:
            raise ConfigError("--kernel-cpus names no CPU")
        if self.cpus is not None and not self.cpus:
            raise ConfigError("--cpus names no CPU")
        if self.cache_bytes is not None:
            if self.preload or self.hugepages:
                raise ConfigError("--cache-bytes keeps rows in its own memory: drop --preload")
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            if self.cache_bytes > memory:
                raise ConfigError(
                    f"--cache-bytes {format_size(self.cache_bytes)} is more than this "
                    f"machine's memory ({format_size(memory)})"
                )
        elif self.warm_from is not None:
            raise ConfigError("--warm-from needs --cache-bytes")
        if self.io_threads < 1:
            raise ConfigError("--io-threads must be >= 1")
        if not 0 <= self.compact_at <= 1:
            raise ConfigError("--compact-at must be a fraction in [0, 1]")

    @property
    def inline_limit(self) -> int:
        """Ids of the largest lookup pooled on the loop: none when the parts are mapped
        lazily (a page fault would stall the loop on the disk). A lookup handed to a worker
        wakes two threads more than one pooled in place (measured on 2-core VMs: the loop's
        Python per lookup runs 3-4x slower than in a tight loop, and the 4-shard benchmark's
        shards spent 2-11 % less CPU with every lookup on the loop). So when the worker would
        pool on one thread too, lookups of up to ~5 ms of pooling stay on the loop; with
        more kernel threads only small ones do."""
        if not (self.preload or self.hugepages):
            return 0
        if self.inline_ids is not None:
            return self.inline_ids
        return INLINE_ONE if self.threads_per_lookup == 1 else INLINE_MANY

    @property
    def threads_per_lookup(self) -> int:
        if self.kernel_threads:
            return self.kernel_threads
        if self.kernel_cpus:
            return max(1, len(self.kernel_cpus) // self.workers)
        return default_kernel_threads()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recserve shardd", description=__doc__.splitlines()[0])
    add_arguments(p, ShardConfig)
    p.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(logging.DEBUG if args.verbose else logging.INFO, json=args.log_json)
    try:
        return uvloop.run(run(from_args(ShardConfig, args)))
    except RecserveError as exc:
        log.error("shardd cannot start: %s", exc.message)
        print(f"recserve shardd: error: {exc.message}", file=sys.stderr)
        return 2


async def run(config: ShardConfig, notifier: Notifier | None = None) -> int:
    notifier = notifier or Notifier()
    if config.cpus:  # first: the split below and every thread started later are within it
        confine(config.cpus)
        log.info("the shard runs on CPUs %s", sorted(config.cpus))
    if config.kernel_cpus:
        # Before the executor, ZeroMQ and /metrics start threads: they inherit the mask.
        rest = split(config.kernel_cpus)
        pin_process(rest)
        log.info(
            "kernel workers pinned to CPUs %s; the loop, ZeroMQ and /metrics to %s",
            sorted(config.kernel_cpus),
            sorted(rest),
        )
    plan = read_plan(config.plan)
    shard = plan.shard(config.shard)
    if config.replica >= len(shard.endpoints):
        raise ConfigError(
            f"shard {config.shard} has {len(shard.endpoints)} replicas; "
            f"--replica {config.replica} does not exist"
        )
    endpoint = config.bind or shard.endpoints[config.replica]
    peers = await probe_peers(shard, config)
    path, since = serving(config, peers)
    opener = functools.partial(open_model, config, plan)
    manifest, store = opener(path, since)
    loop = asyncio.get_running_loop()
    if store.versions.enabled:
        await catch_up(store, peers, peer_keys(config))
    if store.tier is not None:
        await loop.run_in_executor(None, warm_cache, store.tier, config, manifest.digest())
    warm = await loop.run_in_executor(None, kernels.warm_up)
    metrics = ShardMetrics.create()
    metrics.updated(store.versions.describe())
    if store.tier is not None:
        metrics.cache_bytes.set_function(store.tier.bytes_cached)
    http = None
    if config.metrics_port is not None:
        from prometheus_client import start_http_server

        http = start_http_server(
            config.metrics_port, config.metrics_addr, registry=metrics.registry
        )
    keys = CurveKeys.for_server(config.curve_keys) if config.curve_keys else None
    ctx = serving_context()
    auth = keys.authenticator(ctx) if keys is not None else None
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)  # larger: the peer is dropped
    if keys is not None:
        keys.secure_server(sock)
    settings = ServerSettings(
        config.shard,
        config.replica,
        config.queue_limit,
        config.workers,
        config.threads_per_lookup,
        config.inline_limit,
        config.kernel_cpus,
        config.max_reply_bytes // 4,
        config.cpus,
    )
    models = Models(Loaded(since, path, manifest, store), opener, config.state_dir)

    async def behind(store: PartStore) -> None:
        await catch_up(store, await probe_peers(shard, config), peer_keys(config))

    server = ShardServer(sock, models, settings, metrics, behind if config.state_dir else None)
    try:
        with bound(sock, endpoint) as actual:
            server.start()
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            traces: set[asyncio.Future[None]] = set()
            if store.tier is not None and config.warm_from is not None:
                trace = config.warm_from

                def on_usr1() -> None:  # the trace of the artifact served now
                    f = loop.run_in_executor(None, save_trace, models.current, trace)
                    traces.add(f)
                    f.add_done_callback(traces.discard)

                loop.add_signal_handler(signal.SIGUSR1, on_usr1)
            watchdog = loop.create_task(_watchdog(notifier)) if notifier.watchdog_s else None
            log.info(
                "shard %d replica %d serving %d parts (%d MiB) on %s; kernel ready in %.2f s; "
                "lookups of up to %d ids pooled on the loop; %s",
                config.shard,
                config.replica,
                len(store.parts),
                store.nbytes >> 20,
                actual,
                warm,
                settings.inline_ids,
                "CURVE, known clients only" if keys else "plaintext, any client",
                extra={"endpoint": actual, "shard": config.shard},
            )
            frozen = freeze_startup_heap()
            log.debug("%d start-up objects exempt from garbage collection", frozen)
            notifier.ready(f"serving {len(store.parts)} parts on {actual}")
            await stop.wait()
            log.info("draining: no new lookups, %d in flight", server.inflight)
            notifier.stopping()
            left = await server.drain(config.drain_timeout)
            if left:
                log.warning(
                    "%d lookups still running after %.1f s; exiting", left, config.drain_timeout
                )
            if store.tier is not None and config.warm_from is not None:
                await asyncio.gather(*traces, return_exceptions=True)
                await loop.run_in_executor(None, save_trace, models.current, config.warm_from)
            # Keep the loop (and its socket) up a moment after the last reply: closing
            # right after it lost a reply 1 run in 7 under load, even with a linger.
            await asyncio.sleep(FLUSH_S)
            if watchdog:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)
    finally:
        # Replies of the last lookups may still sit in ZeroMQ's queue: linger=0 would drop
        # them (seen: a drained lookup never answered). Bounded, so a dead peer cannot hold
        # the exit.
        server.close()
        sock.close(linger=REPLY_FLUSH_MS)
        if auth is not None:
            auth.stop()
        ctx.term()
        if http is not None:
            http[0].shutdown()
        models.close()
    log.info("shard %d stopped", config.shard)
    return 0


def open_model(
    config: ShardConfig, plan: Plan, path: Path, since: int, fresh: bool = False
) -> tuple[Manifest, PartStore]:
    """Open the artifact at ``path`` (first serving version ``since``) for this shard, and
    load it into memory as the flags say; a deploy opens the next one the same way, with
    ``fresh`` state (updates from an earlier time it was served are dropped)."""
    manifest = read_manifest(path)
    plan.check(manifest, same_model=since == 0)  # a deployed artifact: the same tables
    if fresh and config.state_dir is not None:
        stale = config.state_dir / manifest.digest()[:16]
        if stale.exists():
            log.info("dropping %s: the state of an earlier deployment of %s", stale, path)
            shutil.rmtree(stale)
    store = open_store(config, manifest, plan.shard(config.shard), path, since)
    if config.hugepages:
        seconds = store.preload(hugepages=True)
        log.info(
            "copied %d parts (%d MiB) into huge-page memory in %.2f s: %d MiB backed by "
            "2 MiB pages; max RSS %d MiB",
            len(store.parts),
            store.nbytes >> 20,
            seconds,
            huge_page_bytes(p.view for p in store.parts.values()) >> 20,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
        )
    elif config.preload:
        seconds = store.preload()
        log.info(
            "preloaded %d parts (%d bytes) in %.2f s; max RSS %d MiB",
            len(store.parts),
            store.nbytes,
            seconds,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
        )
    return manifest, store


def open_store(
    config: ShardConfig, manifest: Manifest, shard: ShardPlan, root: Path, since: int = 0
) -> PartStore:
    if config.cache_bytes is not None:
        widest = max((manifest.table(p.table).row_bytes for p in shard.parts), default=0)
        if config.cache_bytes < widest + rc.state_bytes(1):
            raise ConfigError(
                f"--cache-bytes {config.cache_bytes} is less than one row of this shard's "
                f"widest table ({widest} bytes) and its bookkeeping ({rc.state_bytes(1)})"
            )
    state = config.state_dir / manifest.digest()[:16] if config.state_dir else None
    store = PartStore(
        root,
        manifest,
        shard,
        cache_bytes=config.cache_bytes,
        io_threads=config.io_threads,
        state_dir=state,
        compact_at=config.compact_at,
        first_version=since,
    )
    if store.tier is not None:
        tier = store.tier
        log.info(
            "row cache of %s for %s of parts: %d parts resident (%s), %d of %d rows of %d "
            "others fit; misses read %s",
            format_size(tier.nbytes),
            format_size(store.nbytes),
            len(tier.resident),
            format_size(tier.resident_bytes()),
            sum(p.slots for p in tier.parts),
            sum(p.row_end - p.row_start for p in tier.parts),
            len(tier.parts),
            "with O_DIRECT" if tier.direct else "buffered, then dropped from the page cache",
        )
    return store


async def probe_peers(shard: ShardPlan, config: ShardConfig) -> list[tuple[str, dict[str, Any]]]:
    """The ``info`` of the peer replicas that answer (the plan's other endpoints of this
    shard), for the artifact they serve and the versions they hold."""
    peers = [ep for r, ep in enumerate(shard.endpoints) if r != config.replica]
    if not peers or config.state_dir is None:
        return []
    keys = peer_keys(config)
    ctx = zmq.Context()
    out = []
    try:
        for peer in peers:
            # Short: at a cluster's first start the peers start too, and wait alike.
            info = await on_peer(
                ctx,
                peer,
                lambda c: c.simple("info", Deadline.after(PEER_PROBE_MS)),
                logging.INFO,
                keys,
            )
            if info is not None:
                out.append((peer, info))
    finally:
        ctx.term()
    return out


def peer_keys(config: ShardConfig) -> CurveKeys | None:
    """With ``--curve-keys``, the keys to talk to the peer replicas with."""
    return CurveKeys.for_peer(config.curve_keys) if config.curve_keys else None


async def on_peer(
    ctx: zmq.Context,
    peer: str,
    work: Callable[[ShardClient], Awaitable[T]],
    level: int,
    keys: CurveKeys | None = None,
) -> T | None:
    """``work`` on a client of ``peer`` (CURVE with ``keys``); None (logged at ``level``)
    if the peer fails."""
    client = ShardClient(peer, ctx, name="peer", keys=keys)
    try:
        return await work(client)
    except RecserveError as exc:
        log.log(level, "peer %s: %s", peer, exc)
        return None
    finally:
        await client.close()


def serving(config: ShardConfig, peers: list[tuple[str, dict[str, Any]]]) -> tuple[Path, int]:
    """The artifact to serve and its first version: ``--model``, unless the state directory
    records a deploy, or a peer serves a later one (deployed while this replica was down)."""
    path, since = config.model, 0
    recorded = deployed(config.state_dir)
    if recorded is not None:
        path, since = recorded
    for peer, info in peers:
        model = info.get("model") or {}
        later = int(model.get("since") or 0) > since and model.get("path")
        if later and Path(model["path"]).is_dir():
            path, since = Path(model["path"]), int(model["since"])
            log.info("peer %s serves %s from version %d: serving it too", peer, path, since)
        elif later:
            log.warning("peer %s serves %s, which this host lacks", peer, model["path"])
    if path != config.model:
        log.info("serving %s (deployed from version %d), not --model", path, since)
    return path, since


async def catch_up(
    store: PartStore, peers: list[tuple[str, dict[str, Any]]], keys: CurveKeys | None = None
) -> None:
    """Before reporting ready: fetch from a peer replica the versions committed while this
    one was down, and its dense weights."""
    loop = asyncio.get_running_loop()

    async def fetch(client: ShardClient) -> bool:
        history = await client.history(store.versions.current, deadline=Deadline.after(CATCH_UP_MS))
        applied = await loop.run_in_executor(None, store.versions.catch_up, history)
        log.info("caught up %d versions from %s: at %d", applied, client.name,
                 store.versions.current)  # fmt: skip
        version, dense = await client.dense(deadline=Deadline.after(CATCH_UP_MS))
        if version is not None and dense is not None:
            await loop.run_in_executor(None, store.versions.adopt_dense, version, dense)
        return True

    ctx = zmq.Context()
    try:
        for peer, info in peers:
            if int((info.get("versions") or {}).get("version") or 0) <= store.versions.current:
                continue
            if await on_peer(ctx, peer, fetch, logging.WARNING, keys):
                return
    finally:
        ctx.term()


def warm_cache(tier: CacheTier, config: ShardConfig, digest: str) -> None:
    tier.compile()
    path = config.warm_from
    if path is None or not path.exists():
        if path is not None:
            log.info("no trace at %s yet: the cache starts cold", path)
        return
    rows, seconds = tier.warm(path, digest)
    log.info("warmed the cache with %d rows from %s in %.2f s", rows, path, seconds)


def save_trace(loaded: Loaded, path: Path) -> None:
    """Write the cache trace of the artifact ``loaded`` serves."""
    tier = loaded.store.tier
    if tier is None:
        return
    try:
        rows = tier.save_trace(path, loaded.manifest.digest())
    except OSError as exc:
        log.error("could not write the cache trace %s: %s", path, exc)
        return
    log.info("wrote the cache trace: %d rows to %s", rows, path)


def default_kernel_threads() -> int:
    """Cores minus one: ZeroMQ's IO thread and the event loop need a core of their own.
    Measured on 2 cores with the client on the same box (2M x 64 table, 2048 x 40 lookups,
    4 in flight): one kernel thread (the serial kernel, no OpenMP) served 81-98 M ids/s over
    the wire, two served 64-66 M ids/s, and two workers of one thread each 65-72."""
    return max(1, kernels.default_threads() - 1)


async def _watchdog(notifier: Notifier) -> None:
    """Ping systemd from the loop itself: a stuck loop stops the pings."""
    assert notifier.watchdog_s
    while True:
        notifier.ping()
        await asyncio.sleep(notifier.watchdog_s / 2)


if __name__ == "__main__":
    sys.exit(main())
