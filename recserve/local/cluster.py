"""``recserve up``: a local cluster (shard daemons + gateway) as child processes.

The daemons run as ``python -m shardd`` / ``python -m gateway`` children (recserve never
imports them). Shards listen on ipc sockets in a private run directory. Every child gets a
parent-death signal, so even a killed ``up`` leaves no orphans; a normal stop sends SIGTERM
to the gateway, then the shards, waits, and removes the run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from recserve.contracts.errors import RecserveError
from recserve.contracts.manifest import read_manifest
from recserve.contracts.plan import read_plan
from recserve.local.argv import gateway_argv, shardd_argv
from recserve.planning import build
from recserve.rpc.curve import CurveKeys
from recserve.rpc.probe import ready
from recserve.runtime.parent import die_with_parent

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes ``pids`` and their children (a gateway's
    workers) have used so far."""
    total = 0
    for pid in {d for p in pids for d in family(p)}:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def family(pid: int) -> list[int]:
    """``pid`` and its descendants alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in children.read_text().split()]
    return out


def rss_mib(pid: int) -> int:
    """Resident memory of ``pid`` and its children (shared pages count in each)."""
    kib = 0
    for p in family(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kib += int(line.split()[1])
    return kib // 1024


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )


class LocalCluster:
    def __init__(
        self,
        model: Path,
        *,
        plan: Path | None = None,
        shards: int = 4,
        replicas: int = 1,
        strategy: str = "net",
        port: int = 8080,
        singular: bool = False,
        gateway_args: tuple[str, ...] = (),
        shard_args: tuple[str, ...] = (),
        curve_keys: Path | None = None,
        cache_bytes: int | None = None,
        admin_token_file: Path | None = None,
        admin_port: int | None = None,
        pin_shards: bool = False,
    ) -> None:
        """``pin_shards``: each shard daemon runs on one CPU of this process's, round robin
        in the plan's order (``shardd --cpus``); the gateway is not pinned."""
        self.model = Path(model)
        self.pin_shards = pin_shards
        self.admin = ["--admin-token-file", str(admin_token_file)] if admin_token_file else []
        if admin_port is not None:  # updates on a port (and a worker process) of their own
            self.admin += ["--admin-port", str(admin_port)]
        self.cache_bytes = cache_bytes
        self.curve = ["--curve-keys", str(curve_keys)] if curve_keys else []
        self.keys = CurveKeys.for_client(curve_keys) if curve_keys else None
        self.run_dir = Path(tempfile.mkdtemp(prefix="recserve-"))
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}" if admin_port else self.url
        self.singular = singular
        self.gateway_args = gateway_args
        self.shard_args = shard_args
        self.plan_path: Path | None = None
        self.shards: list[subprocess.Popen] = []
        self.gateway: subprocess.Popen | None = None
        if not singular:
            self.plan_path = self.run_dir / "plan.json"
            if plan is not None:
                doc = json.loads(Path(plan).read_text())
            else:
                manifest = read_manifest(self.model)
                doc = json.loads(
                    build(
                        manifest, shards, strategy, [("tcp://127.0.0.1:1",) * replicas] * shards
                    ).to_json()
                )
            for s in doc["shards"]:  # private ipc endpoints, one per replica
                s["endpoints"] = [
                    f"ipc://{self.run_dir}/shard{s['id']}-{r}.sock"
                    for r in range(len(s["endpoints"]))
                ]
            self.plan_path.write_text(json.dumps(doc))
            self.plan = read_plan(self.plan_path)

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the gateway and every shard daemon."""
        return cpu_seconds(self.pids)

    def rss_mib(self) -> list[int]:
        """Resident memory of the gateway, then each shard daemon."""
        return [rss_mib(pid) for pid in self.pids]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in ([self.gateway] if self.gateway else []) + self.shards]

    def start(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        if self.plan_path is not None:
            for shard in self.plan.shards:
                for r, _ in enumerate(shard.endpoints):
                    self.shards.append(self.start_shard(shard.id, r))
            names = [
                (f"shard{s.id}-{r}", ep)
                for s in self.plan.shards
                for r, ep in enumerate(s.endpoints)
            ]
            for (name, ep), proc in zip(names, self.shards, strict=True):
                while not ready(ep, keys=self.keys):
                    self._check(proc, name, deadline)
        self.start_gateway(deadline)

    def start_gateway(self, deadline: float) -> None:
        """Start the gateway (again, after it stopped) and wait until it is ready."""
        extra = ["--preload"] if self.plan_path is None else []
        argv = gateway_argv(
            self.model,
            *extra,
            *self.curve,
            *self.admin,
            *self.gateway_args,
            plan=self.plan_path,
            port=self.port,
        )
        self.gateway = _spawn(argv, self.run_dir / "gateway.log")
        while True:
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            self._check(self.gateway, "gateway", deadline)
            time.sleep(0.1)

    def start_shard(self, shard: int, replica: int) -> subprocess.Popen:
        """Start one shard daemon of the plan (again, after it stopped: a rolling restart);
        the caller waits for it with ``wait_ready``."""
        assert self.plan_path is not None, "a singular cluster has no shards"
        if self.cache_bytes is None:
            memory = ["--preload"]
        else:  # a restarted shard warms from the trace its predecessor wrote at shutdown
            trace = self.run_dir / f"shard{shard}-{replica}.trace.npz"
            memory = ["--cache-bytes", str(self.cache_bytes), "--warm-from", str(trace)]
        state = ["--state-dir", str(self.run_dir / f"state{shard}-{replica}")]  # online updates
        argv = shardd_argv(
            self.plan_path, self.model, shard, *memory, *state, *self.curve,
            *self.pinned(shard, replica), *self.shard_args, replica=replica,
        )  # fmt: skip
        return _spawn(argv, self.run_dir / f"shard{shard}-{replica}.log")

    def pinned(self, shard: int, replica: int) -> list[str]:
        """The daemon's ``--cpus`` flag with ``pin_shards``, else nothing."""
        cpu = self.cpu_of(shard, replica)
        return [] if cpu is None else ["--cpus", str(cpu)]

    def cpu_of(self, shard: int, replica: int) -> int | None:
        """The CPU of a shard daemon with ``pin_shards`` (the same after a restart)."""
        if not self.pin_shards:
            return None
        daemons = [(s.id, r) for s in self.plan.shards for r in range(len(s.endpoints))]
        cpus = sorted(os.sched_getaffinity(0))
        return cpus[daemons.index((shard, replica)) % len(cpus)]

    def wait_ready(self, shard: int, replica: int, proc: subprocess.Popen, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not ready(self.plan.shard(shard).endpoints[replica], keys=self.keys):
            self._check(proc, f"shard{shard}-{replica}", end)

    def _check(self, proc: subprocess.Popen, what: str, deadline: float) -> None:
        if proc.poll() is not None:
            log = self.run_dir / f"{what}.log"
            lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            last = f": {lines[-1]}" if lines else ""
            raise RecserveError(f"the {what} exited with {proc.returncode} during start-up{last}")
        if time.monotonic() > deadline:
            raise RecserveError(f"the {what} was not ready in time (logs in {self.run_dir})")

    def stop(self, timeout: float = 20.0) -> None:
        for group in ([self.gateway] if self.gateway else [], self.shards):
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_up(
    model: Path,
    *,
    plan: Path | None,
    shards: int,
    strategy: str,
    port: int,
    singular: bool,
    curve_keys: Path | None = None,
    replicas: int = 1,
    cache_bytes: int | None = None,
    admin_token_file: Path | None = None,
    admin_port: int | None = None,
    workers: int = 1,
    pin_shards: bool = False,
    pin_workers: bool = False,
) -> int:
    """The ``recserve up`` command: start, print the endpoints, wait for Ctrl-C/SIGTERM."""
    cluster = LocalCluster(
        model,
        plan=plan,
        shards=shards,
        replicas=replicas,
        strategy=strategy,
        port=port,
        singular=singular,
        curve_keys=curve_keys,
        cache_bytes=cache_bytes,
        admin_token_file=admin_token_file,
        admin_port=admin_port,
        gateway_args=(
            *(("--workers", str(workers)) if workers != 1 else ()),
            *(("--pin-workers",) if pin_workers else ()),
        ),
        pin_shards=pin_shards,
    )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with cluster:
            print(f"gateway: {cluster.url}  (POST /v1/predict, GET /v1/model, /metrics)")
            if admin_port is not None:
                print(f"updates: {cluster.admin_url}  (POST /v1/updates, /v1/deploy)")
            if not singular:
                for shard in cluster.plan.shards:
                    cpus = [cluster.cpu_of(shard.id, r) for r in range(len(shard.endpoints))]
                    where = f", CPU {' / '.join(map(str, cpus))}" if pin_shards else ""
                    print(
                        f"shard {shard.id}: {', '.join(shard.endpoints)} "
                        f"({len(shard.parts)} parts{where})"
                    )
            print(f"logs: {cluster.run_dir}; Ctrl-C stops everything", flush=True)
            while not stop and all(
                p.poll() is None for p in [cluster.gateway, *cluster.shards] if p
            ):
                time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
