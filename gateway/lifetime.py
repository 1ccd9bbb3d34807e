"""A running gateway's lifetimes: executor, ZeroMQ context, pooler, batcher and background
tasks, opened in order and closed in reverse by one async context manager, which the app's
``cleanup_ctx`` enters (``gateway.app.create_app``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import kernels
from gateway import updates
from gateway.batcher import Batcher
from gateway.config import GatewayConfig
from gateway.dense import DenseVersions
from gateway.follow import Follower, Role
from gateway.metrics import GatewayMetrics
from gateway.pooler import LocalPooler, Pooler, ShardedPooler
from gateway.state import Gateway
from kernels import DenseNet
from recserve.contracts.errors import RecserveError
from recserve.contracts.manifest import DENSE_FILE, Manifest, read_manifest
from recserve.contracts.plan import read_plan
from recserve.model.artifact import dense_net, huge_page_bytes, read_dense
from recserve.model.scorer import Model
from recserve.rpc.context import serving_context
from recserve.rpc.curve import CurveKeys
from recserve.rpc.deadline import Deadline

log = logging.getLogger("gateway")


@contextlib.asynccontextmanager
async def running(config: GatewayConfig, role: Role | None = None) -> AsyncIterator[Gateway]:
    manifest = read_manifest(config.model)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(config.executor_threads, thread_name_prefix="gateway")
    metrics = GatewayMetrics.create()
    ctx = serving_context()
    plan = None
    pooler: Pooler
    try:
        if config.plan is None:
            model = await loop.run_in_executor(executor, _open_model, config)
            # Workers share the cores: each pools on its share of them (two workers on two
            # cores: one thread each, whose batches never wait for an OpenMP team's wake-up).
            threads = max(1, kernels.default_threads() // config.workers)
            pooler, dense = LocalPooler(model, executor, metrics, threads), model.dense
            weights: dict[str, np.ndarray] = {}  # a singular gateway takes no updates
        else:
            plan = read_plan(config.plan)
            plan.check(manifest)
            keys = CurveKeys.for_client(config.curve_keys) if config.curve_keys else None
            pooler = ShardedPooler(
                manifest, plan, ctx, executor, metrics, config.replicas, keys,
                batch_samples=config.batching.max_batch_samples,
            )  # fmt: skip
            path = config.model / DENSE_FILE
            weights = read_dense(path)
            dense = dense_net(manifest, weights, str(path))
        # Load the compiled kernel and run one dense forward before serving: the first
        # requests must not pay for them (they decided the P99 of short runs).
        await loop.run_in_executor(executor, _warm_up, dense, manifest)
        nets = DenseVersions(dense, weights)
        batcher = Batcher(pooler, nets.at, config.batching, executor, metrics)
        gw = Gateway(config, manifest, plan, pooler, batcher, executor, metrics)
        if isinstance(pooler, ShardedPooler) and plan is not None:
            gw.updater = updates.Updater(gw, plan, nets)  # versions, also without admin
        if role is not None and not role.admin:  # a serving worker: the admin's versions
            gw.follower = Follower(gw, role)
            gw.admin_port = config.admin_port
            batcher.version = gw.follower.version
            gw.tasks.append(loop.create_task(gw.follower.run()))
        elif config.api.admin_token_file is not None:
            gw.admin_token = updates.read_token(config.api.admin_token_file)
            if role is not None and gw.updater is not None:
                gw.updater.cell = role.cell  # the admin: it publishes the versions
        gw.tasks.append(loop.create_task(batcher.run()))
        gw.tasks.append(loop.create_task(_readiness(gw)))
        try:
            yield gw
        finally:
            for task in gw.tasks:
                task.cancel()
            await asyncio.gather(*gw.tasks, return_exceptions=True)
            await pooler.close()
            if gw.updater is not None:
                gw.updater.close()
    finally:
        ctx.term()
        executor.shutdown(wait=False, cancel_futures=True)


def _open_model(config: GatewayConfig) -> Model:
    model = Model.open(config.model)
    mib = model.manifest.table_bytes >> 20
    if config.hugepages:
        seconds = model.preload(hugepages=True)
        log.info(
            "copied %d MiB of tables into huge-page memory in %.1f s: %d MiB backed by 2 MiB pages",
            mib,
            seconds,
            huge_page_bytes(model.tables.values()) >> 20,
        )
    elif config.preload:
        seconds = model.preload()
        log.info("preloaded %d MiB of tables in %.1f s", mib, seconds)
    return model


def _warm_up(dense: DenseNet, manifest: Manifest) -> None:
    kernels.warm_up()
    features = sum(1 for _ in manifest.features())
    dense.forward(
        np.zeros((8, manifest.dense_width), np.float32),
        np.zeros((8, features, manifest.embedding_dim), np.float32),
    )


async def _readiness(gw: Gateway) -> None:
    """Ready while every shard has a replica that answers; checked every few seconds (and
    every 0.1 s while not ready)."""
    while True:
        missing = await gw.pooler.probe(Deadline.after(1000))
        if not missing and not gw.ready and gw.updater is not None:
            try:  # the version the shards hold, before the first request reads one
                version = await gw.updater.sync(settle=gw.follower is None)
                log.info("shards at model version %d", version)
                if gw.follower is not None and not gw.follower.start():
                    missing = ["the admin worker's version"]
            except RecserveError as exc:
                log.warning("could not learn the shards' version: %s", exc)
                missing = ["the shards' version"]
        if gw.ready != (not missing):
            if missing:
                log.info("not ready: no answer from %s", ", ".join(missing))
            else:
                log.info("ready")
        gw.ready = not missing
        await asyncio.sleep(0.1 if not gw.ready else 2.0)
