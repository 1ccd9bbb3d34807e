"""``--workers``: gateway processes behind one port, each connection handed to the next
worker; scores, summed metrics, drain, a dead worker, start-up refusals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from recserve.local.argv import gateway_argv
from recserve.local.cluster import family
from tests.integration.gateway.helpers import post
from tests.integration.shards import free_port
from tests.promtool import check_metrics


@contextlib.contextmanager
def gateway(
    model: Path, *extra: str, plan: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    # A file, not a pipe: nobody reads the log while the gateway runs.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            gateway_argv(model, "--workers", "2", *extra, plan=plan, port=port),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(1200):
                if proc.poll() is not None:
                    log.seek(0)
                    raise AssertionError(log.read().decode())
                with (
                    contextlib.suppress(urllib.error.URLError, ConnectionError),
                    urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as r,
                ):
                    if r.status == 200:
                        break
                time.sleep(0.05)
            yield url, proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def established(pid: int, port: int) -> int:
    """TCP connections process ``pid`` holds on local ``port``, established."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                count += 1
    return count


def test_workers_share_connections_and_score_as_the_model(deployments, fixtures_dir: Path) -> None:
    model, plan = deployments["D1"]
    samples = json.loads((fixtures_dir / "D1" / "batch_17" / "request.json").read_text())
    want = np.load(fixtures_dir / "D1" / "expected_17.npy")[:, 0]
    with gateway(model, plan=plan) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        workers = [p for p in family(proc.pid) if p != proc.pid]
        assert len(workers) == 2

        async def run() -> None:
            # Four connections held open at once: two on each worker, handed over in turn.
            sessions = [aiohttp.ClientSession() for _ in range(4)]
            try:
                for fmt in ("json", "msgpack"):
                    got = await asyncio.gather(
                        *(post(s, url, {"samples": samples}, fmt) for s in sessions)
                    )
                    for status, body, _ in got:
                        assert status == 200, body
                        np.testing.assert_allclose(body["scores"], want, rtol=0, atol=1e-5)
                assert sorted(established(p, port) for p in workers) == [2, 2]
                async with sessions[0].get(url + "/metrics") as r:
                    text = await r.text()
            finally:
                for s in sessions:
                    await s.close()
            check_metrics(text)
            served = [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith('recserve_gateway_requests_total{route="/v1/predict"')
            ]
            assert served == [8.0]  # both workers' counts, summed
            assert "process_cpu_seconds_total" not in text

        asyncio.run(run())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not any(Path(f"/proc/{p}").exists() for p in workers)


def affinity(pid: int) -> set[frozenset[int]]:
    """The CPU sets of process ``pid``'s threads."""
    return {
        frozenset(os.sched_getaffinity(int(t.name))) for t in Path(f"/proc/{pid}/task").iterdir()
    }


def test_pinned_workers_run_on_cpus_of_their_own(deployments, fixtures_dir: Path) -> None:
    model, plan = deployments["D1"]
    samples = json.loads((fixtures_dir / "D1" / "batch_17" / "request.json").read_text())
    want = np.load(fixtures_dir / "D1" / "expected_17.npy")[:, 0]
    allowed = sorted(os.sched_getaffinity(0))  # the gateway inherits this process's CPUs
    with gateway(model, "--pin-workers", plan=plan) as (url, proc):
        workers = [p for p in family(proc.pid) if p != proc.pid]

        async def run() -> None:  # the workers serve as unpinned ones do
            async with aiohttp.ClientSession() as s:
                status, body, _ = await post(s, url, {"samples": samples}, "json")
            assert status == 200, body
            np.testing.assert_allclose(body["scores"], want, rtol=0, atol=1e-5)

        asyncio.run(run())
        per_worker = [affinity(p) for p in workers]
        assert affinity(proc.pid) == {frozenset(allowed)}  # the supervisor is not pinned
    # Every thread of a worker (loop, executor, ZeroMQ's, OpenMP's) on that worker's CPUs.
    assert all(len(threads) == 1 for threads in per_worker), per_worker
    cpus = sorted((next(iter(t)) for t in per_worker), key=min)
    if len(allowed) == 1:
        assert cpus == [frozenset(allowed)] * 2
    else:  # two blocks of the CPUs, in order, splitting them as evenly as they divide
        assert cpus[0] | cpus[1] == set(allowed) and not cpus[0] & cpus[1]
        assert max(cpus[0]) < min(cpus[1]) and abs(len(cpus[0]) - len(cpus[1])) <= 1


def test_a_worker_that_dies_stops_the_gateway(deployments) -> None:
    model, _ = deployments["D1"]
    with gateway(model) as (_, proc):
        workers = [p for p in family(proc.pid) if p != proc.pid]
        os.kill(workers[0], signal.SIGKILL)
        assert proc.wait(30) == 1  # the service restarts whole (Restart=on-failure)
        assert not Path(f"/proc/{workers[1]}").exists()  # stopped and reaped


@pytest.mark.parametrize(
    "args, says",
    [
        (["--workers", "0"], "--workers must be >= 1"),
        (["--workers", "2", "--admin-token-file", "/dev/null"], "needs --admin-port"),
        (["--admin-port", "9", "--admin-token-file", "/dev/null"], "--admin-port needs"),
        (["--workers", "2", "--hugepages"], "--hugepages needs --workers 1"),
    ],
)
def test_workers_refusals_at_start(tmp_path: Path, capsys, args: list[str], says: str) -> None:
    from gateway.main import main

    assert main(["--model", str(tmp_path), "--singular", *args]) == 2
    assert says in capsys.readouterr().err
