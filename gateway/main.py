"""``recserve gateway``: serve a model over HTTP. ``main(argv)`` owns the loop.

With ``--plan`` the embedding tables are on the shards the plan names; with ``--singular``
every table is opened in this process (the single-server baseline). Readiness
(``/v2/health/ready``) is true while every shard has a replica that answers its probe.
SIGTERM/SIGINT: readiness false, refuse new requests, finish queued and running ones
(``--drain-timeout``), then stop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop
from aiohttp import web
from threadpoolctl import threadpool_limits

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.follow import Role
from gateway.listener import listen
from gateway.state import GATEWAY
from gateway.workers import supervise
from kernels import KernelError
from kernels.blas import select as select_blas
from recserve.contracts.errors import ConfigError, RecserveError
from recserve.runtime import logs
from recserve.runtime.config import add_arguments, from_args
from recserve.runtime.heap import freeze_startup_heap
from recserve.runtime.systemd import Notifier

log = logging.getLogger("gateway")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recserve gateway", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--plan", type=Path, help="tables live on the shards of this plan")
    where.add_argument("--singular", action="store_true", help="all tables in this process")
    add_arguments(p, GatewayConfig)
    p.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(logging.DEBUG if args.verbose else logging.INFO, json=args.log_json)
    try:
        config = from_args(GatewayConfig, args, plan=None if args.singular else args.plan)
        # One compute pool at a time: OpenBLAS's spinning threads alternating with numba's
        # doubled the CPU per sample (1.12 -> 0.43 CPU s per 1k drm2 samples with one BLAS
        # thread, bench_gateway); the executor runs batches side by side instead.
        threadpool_limits(limits=config.blas_threads, user_api="blas")
        # numba's OpenMP threads sleep between kernels instead of spinning for the next one:
        # spinning, they took the cores from the executor and the other workers (two workers
        # of one executor thread each served 26k samples/s spinning, 53k sleeping). Read when
        # the first parallel kernel starts the runtime, so a setting of the user's wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            blas = select_blas(
                "openblas" if config.blas == "auto" and config.blas_threads > 1 else config.blas
            )
        except KernelError as exc:
            raise ConfigError(str(exc)) from None
        log.info("dense GEMMs by %s", blas)
        if config.workers > 1 or config.admin_port is not None:
            return supervise(config, run_worker)
        return uvloop.run(serve(config))
    except RecserveError as exc:
        print(f"recserve gateway: error: {exc.message}", file=sys.stderr)
        return 2


def run_worker(
    config: GatewayConfig, notifier: Notifier, channel: socket.socket, role: Role | None
) -> int:
    """One of ``--workers`` (or the admin worker): a gateway serving the connections handed
    over ``channel``."""
    return uvloop.run(serve(config, notifier, channel, role))


async def serve(
    config: GatewayConfig,
    notifier: Notifier | None = None,
    channel: socket.socket | None = None,
    role: Role | None = None,
) -> int:
    notifier = notifier or Notifier()
    app = create_app(config, role)
    runner = web.AppRunner(
        app,
        access_log=None,
        # aiohttp arms this timer when a connection opens and closes a connection that is
        # idle or still sending its headers when it fires: the header deadline.
        keepalive_timeout=config.api.header_timeout_s,
        shutdown_timeout=config.drain_timeout,
    )
    await runner.setup()  # builds the gateway's state (cleanup_ctx)
    server = None
    try:
        gw = app[GATEWAY]
        try:
            server = await listen(
                runner, config.host, config.port, config.api.max_connections, gw.metrics, channel
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror}"
            ) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "%s %s on http://%s:%d (%s)",
            "updating" if role is not None and role.admin else "serving",
            gw.manifest.name,
            config.host,
            config.admin_port if role is not None and role.admin else config.port,
            "singular" if gw.plan is None else f"{len(gw.plan.shards)} shards",
        )
        frozen = freeze_startup_heap()
        log.debug("%d start-up objects exempt from garbage collection", frozen)
        notifier.ready(f"http://{config.host}:{config.port}")
        await stop.wait()
        notifier.stopping()
        gw.draining = True
        await gw.batcher.drain(config.drain_timeout)
    finally:
        if server is not None:
            server.close()
        await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
