"""The daemon as a process: signals, systemd, endpoints, plans, metrics, CPUs."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest

from recserve.cli import main as cli
from tests.integration.shardd.helpers import (
    big_lookup,
    burst,
    cpus_of,
    lookup,
    make_lookup,
    reference,
)
from tests.integration.shards import (
    free_port,
    header,
    raw,
    running,
    shard_cmd,
    start_shard,
    stop,
    wait_healthy,
)
from tests.promtool import check_metrics
from tests.threads import io_threads


def test_sigterm_finishes_lookups_in_flight(model_and_plan, tmp_path: Path) -> None:
    model, plan_path, plan = model_and_plan
    endpoint = f"ipc://{tmp_path}/drain.sock"
    proc = start_shard(plan_path, model, 0, endpoint, "--kernel-threads", "1")
    try:
        wait_healthy(endpoint, proc)
        results = asyncio.run(
            burst(
                endpoint,
                big_lookup(plan, 2_000_000),
                6,
                after_accepted=lambda: proc.send_signal(signal.SIGTERM),
            )
        )
        assert all(isinstance(r, list) for r in results), results
        assert proc.wait(30) == 0
    finally:
        stop(proc)
    assert not list(tmp_path.glob("drain.sock*")), "ipc socket or lock file left behind"


def test_readiness_watchdog_and_stopping_notifications(model_and_plan, tmp_path: Path) -> None:
    model, plan_path, _ = model_and_plan
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(60)
    endpoint = f"ipc://{tmp_path}/n.sock"
    proc = start_shard(
        plan_path, model, 1, endpoint, env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"}
    )
    try:
        messages = [sock.recv(4096).decode()]
        assert messages[0].startswith("READY=1")
        assert sock.recv(4096).decode() == "WATCHDOG=1"
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages:
            messages.append(sock.recv(4096).decode())
        assert proc.wait(30) == 0
    finally:
        stop(proc)
        sock.close()


def test_two_daemons_cannot_share_an_ipc_endpoint(model_and_plan, tmp_path: Path) -> None:
    model, plan_path, _ = model_and_plan
    endpoint = f"ipc://{tmp_path}/one.sock"
    with running(plan_path, model, 0, endpoint):
        second = subprocess.run(
            [*shard_cmd(plan_path, model, 1, endpoint)], capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2
        assert "served by another shard daemon" in second.stderr
        assert msgpack.unpackb(raw(endpoint, [header("info")])[0])["shard"] == 0


def test_plan_for_another_model_is_refused(model_and_plan, tmp_path: Path) -> None:
    model, _, _ = model_and_plan
    assert (
        cli(["synth", "--profile", "drm1", "--size", "1MiB", "--out", str(tmp_path / "other")]) == 0
    )
    assert (
        cli(
            [
                "plan",
                "--model",
                str(tmp_path / "other"),
                "--shards",
                "1",
                "--out",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    done = subprocess.run(
        shard_cmd(tmp_path / "p.json", model, 0, f"ipc://{tmp_path}/x.sock"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "run `recserve plan` again" in done.stderr


def test_metrics_endpoint(model_and_plan, tmp_path: Path) -> None:
    """The counts on /metrics are those of what the shard was sent, and ``stats`` says
    the same."""
    model, plan_path, plan = model_and_plan
    port = free_port()
    endpoint = f"ipc://{tmp_path}/m.sock"
    parts, ids, lengths, *_ = make_lookup(plan, 0, 5, bags=7)
    with running(plan_path, model, 0, endpoint, "--metrics-port", str(port)):
        raw(endpoint, [header("health")])
        waited = 0.0
        for _ in range(2):
            began = time.perf_counter()
            asyncio.run(lookup(endpoint, parts, ids, lengths))
            waited += time.perf_counter() - began
        stats = msgpack.unpackb(raw(endpoint, [header("stats")])[0])
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    text = body.decode()
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("recserve_shard_")
    }
    health = samples['recserve_shard_requests_total{op="health",outcome="ok"}']
    assert health == stats["requests"]["health:ok"] >= 1  # (ours, and the start's)
    assert samples['recserve_shard_requests_total{op="lookup",outcome="ok"}'] == 2
    assert samples["recserve_shard_ids_total"] == 2 * ids.size == stats["ids"]
    assert samples["recserve_shard_bags_total"] == 2 * lengths.size == stats["bags"]
    assert samples["recserve_shard_received_bytes_total"] > 2 * ids.nbytes
    assert samples["recserve_shard_queue_depth"] == 0
    assert samples["recserve_shard_lookup_seconds_count"] == 2
    # Where the two lookups' CPU went on the shard: every stage took some, the same on
    # /metrics as in stats, and together less than the client waited for them.
    stages = {
        stage: samples[f'recserve_shard_lookup_stage_cpu_seconds_total{{stage="{stage}"}}']
        for stage in ("decode", "prepare", "pool", "reply")
    }
    assert stages == stats["stage_cpu_seconds"]
    assert all(seconds > 0 for seconds in stages.values())
    assert sum(stages.values()) < waited
    assert "process_resident_memory_bytes" in text
    check_metrics(text)


def pooled_right_then_masks(
    endpoint: str, pid: int, model: Path, plan, bags: int
) -> tuple[dict[int, frozenset[int]], dict]:
    """A lookup of ``bags`` bags a part matches the reference; then each thread's CPUs and
    the shard's ``info``."""
    parts, ids, lengths, _, ids_pp, len_pp, w_pp = make_lookup(plan, 0, 11, bags=bags)
    groups = asyncio.run(lookup(endpoint, parts, ids, lengths))
    want = reference(model, parts, ids_pp, len_pp, w_pp, False)
    for g in groups:
        for j, i in enumerate(g.parts):
            np.testing.assert_allclose(g.pooled[:, j, :], want[i], rtol=1e-5, atol=1e-5)
    masks = {int(t.name): cpus_of(t) for t in Path(f"/proc/{pid}/task").iterdir()}
    return masks, msgpack.unpackb(raw(endpoint, [header("info")])[0])


def test_kernel_cpus_keep_the_workers_apart(model_and_plan, tmp_path: Path) -> None:
    """With --kernel-cpus the worker (and its OpenMP team) pools on those CPUs only and
    every other thread of the daemon (loop, ZeroMQ, /metrics, OpenBLAS) runs on the rest;
    results stay right. (And the threads' scheduling policies.)"""
    model, plan_path, plan = model_and_plan
    allowed = frozenset(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    kernel = frozenset({max(allowed)})
    endpoint = f"ipc://{tmp_path}/pinned.sock"
    # Two threads a lookup: the worker's OpenMP team must land on the kernel CPU too.
    flags = (
        "--kernel-cpus",
        str(max(allowed)),
        "--kernel-threads",
        "2",
        "--metrics-port",
        str(free_port()),
    )
    with running(plan_path, model, 0, endpoint, *flags) as proc:
        # Its ZeroMQ I/O thread does not preempt the loop (read before any lookup: pyzmq's
        # zero-copy sends start a context of their own, which moves no messages).
        policies = io_threads(proc.pid)
        assert set(policies.values()) == {os.SCHED_BATCH}, policies
        masks, info = pooled_right_then_masks(endpoint, proc.pid, model, plan, bags=2000)
    assert info["kernel_cpus"] == sorted(kernel)
    assert masks[proc.pid] == allowed - kernel
    assert set(masks.values()) == {kernel, allowed - kernel}, masks
    assert sum(m == kernel for m in masks.values()) == 2  # the worker and its team's thread


def test_cpus_confine_the_whole_shard(model_and_plan, tmp_path: Path) -> None:
    """With --cpus every thread of the daemon runs on those CPUs; with --kernel-cpus too the
    workers take theirs out of them; results stay right."""
    model, plan_path, plan = model_and_plan
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    whole, kernel = frozenset(allowed[:2]), frozenset(allowed[1:2])
    endpoint = f"ipc://{tmp_path}/confined.sock"
    flags = ("--cpus", ",".join(map(str, sorted(whole))), "--kernel-cpus", str(min(kernel)),
             "--inline-ids", "0")  # fmt: skip
    with running(plan_path, model, 0, endpoint, *flags) as proc:
        masks, info = pooled_right_then_masks(endpoint, proc.pid, model, plan, bags=500)
    assert info["cpus"] == sorted(whole) and info["kernel_cpus"] == sorted(kernel)
    assert masks[proc.pid] == whole - kernel
    assert set(masks.values()) == {kernel, whole - kernel}, masks


@pytest.mark.parametrize(
    ("flag", "cpus"), [("--cpus", "9999"), ("--cpus", "x"), ("--kernel-cpus", "9999")]
)
def test_cpus_the_shard_may_not_use_are_refused(
    model_and_plan, tmp_path: Path, flag: str, cpus: str
) -> None:
    model, plan_path, _ = model_and_plan
    cmd = shard_cmd(plan_path, model, 0, f"ipc://{tmp_path}/x.sock", flag, cpus)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and f"{flag} " in done.stderr and cpus in done.stderr, done.stderr


@pytest.mark.parametrize("cpus", ["all", "x", "9999"])
def test_bad_kernel_cpus_are_refused(model_and_plan, tmp_path: Path, cpus: str) -> None:
    model, plan_path, _ = model_and_plan
    if cpus == "all":
        cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    cmd = shard_cmd(plan_path, model, 0, f"ipc://{tmp_path}/x.sock", "--kernel-cpus", cpus)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--kernel-cpus" in done.stderr, done.stderr
