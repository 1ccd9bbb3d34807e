"""``--workers N``: N gateway processes serving one listening socket, each with its own GIL.

A gateway process runs its event loop, the requests' parsing, the batching and the Python
around the compiled kernels under one GIL; under a closed loop of large requests the three
threads queue for it and a quarter of two cores stayed idle (``bench_e2e_throughput``).

The process started (by systemd, ``recserve up`` or a shell) is the supervisor: it binds the
socket, forks the workers before any thread exists, and once every worker is ready it
accepts connections and hands them to the workers in turn (over a unix socket, the
descriptor itself: ``SCM_RIGHTS``), as Node's cluster module does. Left to the kernel, a
shared socket is not fair: libuv accepts every pending connection on each wake-up, and a
client's four connections split unevenly (43-52k samples/s from run to run where handing
them over gives 55k). Connections are balanced, not requests, so a
client should keep several open (``recserve.client``, loadgen and HTTP pools do). The
supervisor passes SIGTERM/SIGINT on; each worker drains as a lone gateway does. The
supervisor exits 0 when every worker did; when a worker dies unasked it stops the others and
exits 1, so ``Restart=on-failure`` restarts the service whole. Metrics are prometheus_client's
multiprocess mode in a directory the supervisor makes and removes: ``/metrics`` on any worker
reports the sums over all (gauges: ``livesum``, the version ``livemax``; no ``process_*``).

With ``--pin-workers`` each serving worker runs only on its share of the CPUs
(``recserve.runtime.cpus``): its loop, its executor threads and its ZeroMQ I/O thread wake
each other on one CPU instead of across them. Two workers on two cores
(``benchmarks/RESULTS.md``): four shards on the same cores served 1.15x and 1.04x the
samples/s of unpinned workers in two runs, singular the same (0.99x, 1.00x; +7 % in an
interleaved A/B); at 100 requests/s
of 16 JSON samples an interleaved A/B saw every P99 16 % shorter, singular's and the
sharded path's alike, which ``bench_e2e``'s runs did not show beyond their spread. Pinned
workers cannot move off a CPU another process keeps busy, so it is a flag, not the default.

Online updates and deploys need one process that orders versions: with ``--admin-port`` the
supervisor forks one more worker, the admin, and hands it the connections of that port; the
serving workers follow the versions it publishes (``gateway.follow``). ``--workers`` above 1
with ``--admin-token-file`` needs ``--admin-port``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from gateway.config import GatewayConfig
from gateway.follow import Role, VersionCell
from gateway.metrics import use_multiprocess
from recserve.contracts.errors import ConfigError, RecserveError
from recserve.runtime.cpus import pin_process, share
from recserve.runtime.parent import die_with_parent
from recserve.runtime.priority import lower_priority
from recserve.runtime.systemd import Notifier

log = logging.getLogger("gateway")
STOP_GRACE_S = 10.0  # beyond --drain-timeout, before a worker is killed


class PipeNotifier(Notifier):
    """A worker's notifier: readiness goes to the supervisor as one byte on a pipe."""

    def __init__(self, fd: int) -> None:
        super().__init__({})
        self.fd = fd

    def ready(self, status: str = "") -> bool:
        with contextlib.suppress(OSError):
            os.write(self.fd, b"r")
            return True
        return False


def bind(config: GatewayConfig, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    try:
        sock = socket.create_server((config.host, port), family=family, backlog=1024)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {config.host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


Serve = Callable[[GatewayConfig, Notifier, socket.socket, Role | None], int]


def supervise(config: GatewayConfig, serve: Serve, notifier: Notifier | None = None) -> int:
    """Fork ``config.workers`` processes running ``serve(config, notifier, channel, role)``
    (``channel``: the unix socket their connections arrive on), and with ``--admin-port``
    the admin worker; hand them connections; wait."""
    notifier = notifier or Notifier()
    sock = bind(config, config.port)
    try:
        admin = bind(config, config.admin_port) if config.admin_port is not None else None
    except ConfigError:
        sock.close()
        raise
    port = sock.getsockname()[1]
    cell = VersionCell(config.workers) if admin is not None else None
    metrics_dir = tempfile.mkdtemp(prefix="recserve-gateway-metrics-")
    ready_r, ready_w = os.pipe()
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    live: set[int] = set()  # forked and not reaped yet
    channels: list[socket.socket] = []  # the serving workers', then the admin's
    supervisor = os.getpid()
    roles: list[Role | None] = [None] * config.workers
    if cell is not None:
        roles = [*(Role(cell, i) for i in range(config.workers)), Role(cell, None)]
    allowed = sorted(os.sched_getaffinity(0))
    cpus = [
        share(allowed, k, config.workers) if config.pin_workers and k < config.workers else None
        for k in range(len(roles))
    ]  # the admin (last) runs anywhere, at a lower priority
    try:
        for role, mine_cpus in zip(roles, cpus, strict=True):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = os.fork()
            if pid == 0:  # the worker: never returns into the supervisor's code
                os.close(ready_r)
                for other in (sock, admin, mine, *channels):
                    if other is not None:
                        other.close()
                os._exit(_worker(config, serve, theirs, role, metrics_dir, ready_w, supervisor,
                                 mine_cpus))  # fmt: skip
            theirs.close()
            mine.setblocking(False)  # a stuck worker's full channel must not stop the accepts
            live.add(pid)
            channels.append(mine)
        os.close(ready_w)
        log.info("%d workers on port %d%s: %s%s", config.workers, port,
                 f", the admin on port {config.admin_port}" if admin else "", sorted(live),
                 "; CPUs " + " / ".join(",".join(map(str, sorted(c))) for c in cpus if c)
                 if config.pin_workers else "")  # fmt: skip
        url = f"http://{config.host}:{port}"
        listening = [(sock, channels[: config.workers])]
        if admin is not None:
            listening.append((admin, channels[config.workers :]))
        return _watch(config, notifier, live, listening, ready_r, stop, url)
    finally:
        sock.close()
        if admin is not None:
            admin.close()
        for channel in channels:
            channel.close()
        for pid in live:  # whatever still runs: the supervisor itself failed
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _worker(
    config: GatewayConfig,
    serve: Serve,
    channel: socket.socket,
    role: Role | None,
    metrics_dir: str,
    ready_fd: int,
    supervisor: int,
    cpus: frozenset[int] | None = None,
) -> int:
    die_with_parent()  # gone with the supervisor, even if it is SIGKILLed
    if os.getppid() != supervisor:  # it died before the request above took effect
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)  # serve() installs its own on its loop
    if cpus is not None:  # before serve() starts any thread: they all inherit it
        pin_process(cpus)
    if role is not None and role.admin:
        lower_priority()  # updates wait for the cores, serving does not (before any thread)
    try:
        use_multiprocess(metrics_dir)
        return serve(config, PipeNotifier(ready_fd), channel, role)
    except RecserveError as exc:
        print(f"recserve gateway worker {os.getpid()}: error: {exc.message}", file=sys.stderr)
        return 2
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stderr.flush()


def _watch(
    config: GatewayConfig,
    notifier: Notifier,
    live: set[int],
    listening: list[tuple[socket.socket, list[socket.socket]]],
    ready_fd: int,
    stop: list[int],
    url: str,
) -> int:
    """Until every worker in ``live`` has exited (each is removed once reaped); the
    connections of each listening socket go to its workers' channels in turn."""
    workers = list(live)
    failed, ready, deadline = False, 0, None
    return_code = 1
    turns = [0] * len(listening)
    while live:
        if stop and deadline is None:
            log.info("stopping %d workers", len(live))
            notifier.stopping()
            for sock, _ in listening:
                sock.close()  # new connections are refused; the workers drain theirs
            _signal(live, signal.SIGTERM)
            deadline = time.monotonic() + config.drain_timeout + STOP_GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            log.error("workers %s did not stop in time: killed", sorted(live))
            _signal(live, signal.SIGKILL)
            failed, deadline = True, float("inf")
        waiting: list[Any] = [ready_fd] if ready < len(workers) else []
        if ready == len(workers) and deadline is None:
            waiting += [sock for sock, _ in listening]
        with contextlib.suppress(InterruptedError):
            readable, _, _ = select.select(waiting, [], [], 0.2)
            if ready_fd in readable:
                ready += len(os.read(ready_fd, 64))
                if ready == len(workers):
                    log.info("all %d workers ready", ready)
                    notifier.ready(url)
            for k, (sock, channels) in enumerate(listening):
                if sock in readable:
                    turns[k] = _hand_over(sock, channels, turns[k])
        for pid in list(live):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            live.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if code == 2 and ready < len(workers):
                return_code = 2  # it could not start: the configuration, not a crash
            if code != 0 or deadline is None:
                failed = True
                log.error("worker %d exited with %d%s", pid, code, "" if stop else " unasked")
                if not stop:
                    stop.append(signal.SIGTERM)  # stop the rest: the service restarts whole
    return return_code if failed else 0


def _hand_over(sock: socket.socket, channels: list[socket.socket], turn: int) -> int:
    """Accept what is pending; each connection to the next worker in turn. Returns the
    next turn."""
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return turn
        except OSError as exc:  # out of descriptors, a connection reset while queued
            log.warning("accept failed: %s", exc)
            return turn
        with conn:  # the worker has its own descriptor once sent
            for _ in channels:
                channel, turn = channels[turn], (turn + 1) % len(channels)
                try:
                    socket.send_fds(channel, [b"c"], [conn.fileno()])
                    break
                except OSError:  # full (busy) or gone: the next worker takes it
                    continue


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
