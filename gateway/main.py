"""``recserve gateway``: serve a model over HTTP. ``main(argv)`` owns the loop.

With ``--plan`` the embedding tables are on the shards the plan names; with ``--singular``
every table is opened in this process (the single-server baseline). Readiness
(``/v2/health/ready``) turns true once every shard replica answered a probe. SIGTERM/SIGINT:
readiness false, refuse new requests, finish queued and running ones (``--drain-timeout``),
then stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import uvloop
import zmq
from aiohttp import web
from threadpoolctl import threadpool_limits

import kernels
from gateway.app import ApiSettings, Gateway, create_app
from gateway.batcher import Batcher, BatchSettings
from gateway.metrics import GatewayMetrics
from gateway.pooler import LocalPooler, Pooler, ShardedPooler
from kernels import DenseNet
from recserve import logs
from recserve.artifact import huge_page_bytes, load_dense, read_manifest
from recserve.errors import ConfigError, RecserveError
from recserve.manifest import Manifest
from recserve.model import Model
from recserve.plan import read_plan
from recserve.runtime import freeze_startup_heap
from recserve.shardclient import now_ms
from recserve.systemd import Notifier

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class GatewayConfig:
    model: Path
    plan: Path | None
    host: str = "127.0.0.1"
    port: int = 8080
    batching: BatchSettings = field(default_factory=BatchSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    threads: int = 2
    drain_timeout: float = 10.0
    preload: bool = False
    hugepages: bool = False

    def __post_init__(self) -> None:
        b = self.batching
        if (
            b.max_batch_samples < 1
            or b.max_queue_delay_us < 0
            or b.max_inflight_samples < 1
            or b.max_concurrent_batches < 1
        ):
            raise ConfigError("batch sizes and counts must be >= 1 and the queue delay >= 0")
        if self.api.default_timeout_ms <= 0 or self.threads < 1:
            raise ConfigError("--timeout-ms and --threads must be positive")


@contextlib.asynccontextmanager
async def gateway(config: GatewayConfig) -> AsyncIterator[Gateway]:
    """Every lifetime of a running gateway: executor, sockets, pooler, background tasks."""
    manifest = read_manifest(config.model)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(config.threads, thread_name_prefix="gateway")
    metrics = GatewayMetrics.create()
    ctx = zmq.Context()
    plan = None
    pooler: Pooler
    if config.plan is None:
        model = Model.open(config.model)
        if config.hugepages:
            seconds = await loop.run_in_executor(
                executor, functools.partial(model.preload, hugepages=True)
            )
            log.info(
                "copied %d MiB of tables into huge-page memory in %.1f s: %d MiB backed by "
                "2 MiB pages",
                manifest.table_bytes >> 20,
                seconds,
                huge_page_bytes(model.tables.values()) >> 20,
            )
        elif config.preload:
            seconds = await loop.run_in_executor(executor, model.preload)
            log.info("preloaded %d MiB of tables in %.1f s", manifest.table_bytes >> 20, seconds)
        pooler, dense = LocalPooler(model, executor), model.dense
    else:
        plan = read_plan(config.plan)
        plan.check(manifest)
        pooler, dense = (
            ShardedPooler(manifest, plan, ctx, executor, metrics),
            load_dense(config.model, manifest),
        )
    # Load the compiled kernel and run one dense forward before serving: the first requests
    # must not pay for them (they decided the P99 of short runs).
    await loop.run_in_executor(executor, _warm_up, dense, manifest)
    batcher = Batcher(pooler, dense.forward, config.batching, executor, metrics)
    gw = Gateway(manifest, plan, pooler, batcher, executor, metrics, config.api)
    gw.tasks.append(loop.create_task(batcher.run()))
    gw.tasks.append(loop.create_task(_readiness(gw)))
    try:
        yield gw
    finally:
        for task in gw.tasks:
            task.cancel()
        await asyncio.gather(*gw.tasks, return_exceptions=True)
        await pooler.close()
        ctx.term()
        executor.shutdown(wait=False, cancel_futures=True)


def _warm_up(dense: DenseNet, manifest: Manifest) -> None:
    kernels.warm_up()
    features = sum(1 for _ in manifest.features())
    dense.forward(
        np.zeros((8, manifest.dense_width), np.float32),
        np.zeros((8, features, manifest.embedding_dim), np.float32),
    )


async def _readiness(gw: Gateway) -> None:
    """Ready once every shard replica answers; then keep checking every few seconds."""
    while True:
        missing = await gw.pooler.probe(now_ms() + 1000)
        if gw.ready != (not missing):
            log.info("ready" if not missing else "not ready: no answer from %s", ", ".join(missing))
        gw.ready = not missing
        await asyncio.sleep(0.1 if not gw.ready else 2.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recserve gateway", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--plan", type=Path, help="tables live on the shards of this plan")
    where.add_argument("--singular", action="store_true", help="all tables in this process")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-batch-samples", type=int, default=1024)
    p.add_argument("--max-queue-delay-us", type=int, default=500)
    p.add_argument("--max-inflight-samples", type=int, default=32768)
    p.add_argument(
        "--max-concurrent-batches",
        type=int,
        default=BatchSettings.max_concurrent_batches,
        help="batches pooled and scored at once; the next waits (and grows) in the queue",
    )
    p.add_argument("--max-request-samples", type=int, default=8192)
    p.add_argument("--max-request-ids", type=int, default=4_000_000)
    p.add_argument("--timeout-ms", type=float, default=1000.0, help="default request deadline")
    p.add_argument("--threads", type=int, default=2, help="executor threads (numpy work)")
    p.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="BLAS threads per dense MLP (1: batches run side by side instead)",
    )
    p.add_argument("--drain-timeout", type=float, default=10.0)
    p.add_argument(
        "--preload",
        action="store_true",
        help="with --singular: touch every table page before serving",
    )
    p.add_argument(
        "--hugepages",
        action="store_true",
        help="with --singular: score from copies of the tables in huge-page memory "
        "(fewer TLB misses; costs the tables' size in anonymous memory)",
    )
    p.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(logging.DEBUG if args.verbose else logging.INFO, json=args.log_json)
    # One compute pool at a time: OpenBLAS's spinning threads alternating with numba's
    # doubled the CPU per sample (1.12 -> 0.43 CPU s per 1k drm2 samples with one BLAS
    # thread, bench_gateway); the executor runs batches side by side instead.
    threadpool_limits(limits=max(1, args.blas_threads), user_api="blas")
    try:
        config = GatewayConfig(
            model=args.model, plan=None if args.singular else args.plan, host=args.host,
            port=args.port,
            batching=BatchSettings(args.max_batch_samples, args.max_queue_delay_us,
                                   args.max_inflight_samples, args.max_concurrent_batches),
            api=ApiSettings(default_timeout_ms=args.timeout_ms,
                            max_request_samples=args.max_request_samples,
                            max_request_ids=args.max_request_ids),
            threads=args.threads, drain_timeout=args.drain_timeout, preload=args.preload,
            hugepages=args.hugepages,
        )  # fmt: skip
        return uvloop.run(serve(config))
    except RecserveError as exc:
        print(f"recserve gateway: error: {exc.message}", file=sys.stderr)
        return 2


async def serve(config: GatewayConfig, notifier: Notifier | None = None) -> int:
    notifier = notifier or Notifier()
    async with gateway(config) as gw:
        runner = web.AppRunner(create_app(gw), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror}"
            ) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "serving %s on http://%s:%d (%s)",
            gw.manifest.name,
            config.host,
            config.port,
            "singular" if gw.plan is None else f"{len(gw.plan.shards)} shards",
        )
        frozen = freeze_startup_heap()
        log.debug("%d start-up objects exempt from garbage collection", frozen)
        notifier.ready(f"http://{config.host}:{config.port}")
        await stop.wait()
        notifier.stopping()
        gw.draining = True
        await gw.batcher.drain(config.drain_timeout)
        await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
