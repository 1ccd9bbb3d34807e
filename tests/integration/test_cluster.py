"""``recserve up``: a real local cluster that leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from recserve.cli import main as cli
from recserve.contracts.manifest import read_manifest
from recserve.model.scorer import Model
from recserve.model.workload import Workload, to_samples
from tests.integration.shardd.helpers import cpus_of
from tests.integration.shards import free_port


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_up(model: Path, port: int, *extra: str, out: Path | None = None) -> subprocess.Popen:
    """``recserve up`` of ``model`` on ``port``, ready; its output to ``out`` if given."""
    argv = [sys.executable, "-m", "recserve.cli", "up", "--model", str(model), "--shards", "2",
            "--strategy", "capacity", "--port", str(port), *extra]  # fmt: skip
    with open(out or os.devnull, "wb") as stdout:  # the child has its own copy
        proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
        assert proc.poll() is None, f"recserve up exited with {proc.returncode}"
    raise TimeoutError("recserve up did not become ready")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("up")
    assert cli(["synth", "--profile", "drm1", "--size", "2MiB", "--out", str(root / "m")]) == 0
    return root / "m"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_up_leaves_no_processes_or_files(model: Path, how: str) -> None:
    proc = start_up(model, free_port())
    try:
        kids = children(proc.pid)
        assert len(kids) == 3  # two shards and the gateway
        run_dirs = {
            Path(p).parent
            for k in kids
            for p in Path(f"/proc/{k}/cmdline").read_text().split("\0")
            if p.endswith("plan.json")
        }
        proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGKILL)
        proc.wait(60)
        end = time.monotonic() + 30
        while any(alive(k) for k in kids) and time.monotonic() < end:
            time.sleep(0.1)
        assert not any(alive(k) for k in kids), "orphaned daemons"
        if how == "sigint":
            assert proc.returncode == 0
            assert run_dirs and not any(d.exists() for d in run_dirs), "run dir left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_pins_each_shard_to_a_cpu_of_its_own(model: Path, tmp_path: Path) -> None:
    """``--pin-shards``: every thread of shard k runs on the k-th CPU (round robin), as
    ``up`` prints; ``--pin-workers``: each gateway worker on CPUs of its own, the gateway's
    supervisor anywhere; and the cluster serves."""
    cpus = sorted(os.sched_getaffinity(0))
    printed = tmp_path / "up.out"
    proc = start_up(model, port := free_port(), "--pin-shards", "--shards", "3",
                    "--workers", "2", "--pin-workers", out=printed)  # fmt: skip
    try:
        pinned: dict[int, set[frozenset[int]]] = {}
        gateways, workers = [], []
        for kid in children(proc.pid):
            argv = Path(f"/proc/{kid}/cmdline").read_text().split("\0")
            masks = {cpus_of(t) for t in Path(f"/proc/{kid}/task").iterdir()}
            if "shardd" in argv:
                pinned[int(argv[argv.index("--shard") + 1])] = masks
            else:
                gateways.append(masks)
                for worker in children(kid):
                    workers.append({cpus_of(t) for t in Path(f"/proc/{worker}/task").iterdir()})
        assert pinned == {k: {frozenset({cpus[k % len(cpus)]})} for k in range(3)}
        # Two workers: the first half of the CPUs and the second (one CPU: both on it).
        halves = [frozenset(cpus[: len(cpus) // 2] or cpus), frozenset(cpus[len(cpus) // 2 :])]
        assert sorted(workers, key=lambda m: min(map(min, m))) == [{h} for h in halves]
        end = time.monotonic() + 30  # up prints once the cluster is ready, just after this
        while "logs: " not in printed.read_text() and time.monotonic() < end:
            time.sleep(0.05)
        lines = printed.read_text().splitlines()
        for k in range(3):
            assert any(
                line.startswith(f"shard {k}: ") and line.endswith(f"CPU {cpus[k % len(cpus)]})")
                for line in lines
            ), lines
        assert gateways == [{frozenset(cpus)}]
        batch = Workload(read_manifest(model), seed=1).batch(8)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/predict",
            data=json.dumps({"samples": to_samples(batch)}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            scores = json.loads(r.read())["scores"]
        want = Model.open(model).score(batch)  # in this process: no shards, no pinning
        np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's main command, on a small model: real shard daemons, gateway, loadgen."""
    before = set(Path(tempfile.gettempdir()).glob("recserve-*"))
    assert cli(["demo", "--workdir", str(tmp_path), "--size", "8MiB", "--duration", "2"]) == 0
    out = capsys.readouterr().out
    assert "distributed" in out and "singular" in out and "shards contacted" in out
    report = json.loads((tmp_path / "demo-report.json").read_text())
    for mode in ("distributed", "singular"):
        assert report["results"][mode]["ok"] > 0 and not report["results"][mode]["errors"]
    assert set(Path(tempfile.gettempdir()).glob("recserve-*")) == before  # run dirs removed
