"""The shard daemon as a real process on real sockets."""

from __future__ import annotations

import asyncio
import json
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
import zmq

import kernels
from recserve.cli import main as cli
from recserve.contracts.errors import (
    IdOutOfRange,
    Overloaded,
    RecserveError,
    UnknownTable,
)
from recserve.contracts.manifest import read_manifest
from recserve.contracts.plan import Plan, read_plan
from recserve.model.artifact import open_table
from recserve.rpc.client import ShardClient
from recserve.rpc.deadline import Deadline, now_ms
from recserve.rpc.wire import VERSION, PartRequest, encode_lookup
from shardd.cpus import parse_cpus
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


@pytest.fixture(scope="module")
def model_and_plan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Plan]:
    root = tmp_path_factory.mktemp("shardd")
    assert (
        cli(
            [
                "synth",
                "--profile",
                "drm3",
                "--size",
                "4MiB",
                "--seed",
                "3",
                "--out",
                str(root / "m"),
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "plan",
                "--model",
                str(root / "m"),
                "--shards",
                "2",
                "--strategy",
                "capacity",
                "--out",
                str(root / "plan.json"),
            ]
        )
        == 0
    )
    plan = read_plan(root / "plan.json")
    assert plan.report["split_tables"], "the test needs a table split by rows"
    return root / "m", root / "plan.json", plan


@pytest.fixture(scope="module")
def shards(model_and_plan, tmp_path_factory):
    model, plan_path, _ = model_and_plan
    run_dir = tmp_path_factory.mktemp("run")
    endpoints = [f"ipc://{run_dir}/s0.sock", f"tcp://127.0.0.1:{free_port()}"]
    # Shard 1 serves copies in huge-page memory, shard 0 the memory-mapped files: every
    # test on both shards covers both.
    extra = [(), ("--hugepages",)]
    procs = [
        start_shard(plan_path, model, k, ep, *extra[k], log=run_dir / f"s{k}.log")
        for k, ep in enumerate(endpoints)
    ]
    try:
        for ep, proc in zip(endpoints, procs, strict=True):
            wait_healthy(ep, proc)
        yield endpoints, procs, run_dir
    finally:
        for proc in procs:
            stop(proc)


def make_lookup(
    plan: Plan,
    shard: int,
    seed: int,
    *,
    weighted: bool = False,
    dtype: type = np.int64,
    bags: int = 9,
):
    rng = np.random.default_rng(seed)
    parts, ids, lengths, weights = [], [], [], []
    for i, p in enumerate(plan.shard(shard).parts):
        lens = rng.integers(0, 6, bags)
        lens[0] = 0  # an empty bag
        parts.append(PartRequest(p.table, p.row_start, bags, "mean" if i % 3 == 0 else "sum"))
        ids.append(rng.integers(p.row_start, p.row_end, int(lens.sum())))
        lengths.append(lens)
        weights.append(rng.random(int(lens.sum())).astype(np.float32))
    return (
        parts,
        np.concatenate(ids).astype(dtype),
        np.concatenate(lengths),
        np.concatenate(weights) if weighted else None,
        ids,
        lengths,
        weights,
    )


def reference(model: Path, parts, ids_per_part, lengths_per_part, weights_per_part, weighted):
    manifest = read_manifest(model)
    out = []
    for p, ids, lens, w in zip(
        parts, ids_per_part, lengths_per_part, weights_per_part, strict=True
    ):
        table = open_table(model, manifest.table(p.table))
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
        out.append(
            kernels.pool_numpy(table, ids, offsets, weights=w if weighted else None, mode=p.mode)
        )
    return out


async def lookup(endpoint: str, parts, ids, lengths, weights=None, deadline_ms=None):
    ctx = zmq.Context()
    client = ShardClient(endpoint, ctx)
    try:
        return await client.lookup(
            parts,
            ids,
            lengths,
            weights=weights,
            deadline=Deadline(deadline_ms or now_ms() + 10_000),
        )
    finally:
        await client.close()
        ctx.term()


@pytest.mark.parametrize("weighted, dtype", [(False, np.int64), (True, np.int32)])
def test_pooled_results_match_reference(shards, model_and_plan, weighted, dtype) -> None:
    endpoints, _, _ = shards
    model, _, plan = model_and_plan
    for k, endpoint in enumerate(endpoints):
        parts, ids, lengths, weights, ids_pp, len_pp, w_pp = make_lookup(
            plan, k, seed=k, weighted=weighted, dtype=dtype
        )
        groups = asyncio.run(lookup(endpoint, parts, ids, lengths, weights))
        want = reference(model, parts, ids_pp, len_pp, w_pp, weighted)
        seen = set()
        for g in groups:
            for j, i in enumerate(g.parts):
                np.testing.assert_allclose(g.pooled[:, j, :], want[i], rtol=1e-5, atol=1e-5)
                seen.add(i)
        assert seen == set(range(len(parts)))


async def stats(endpoint: str) -> dict:
    ctx = zmq.Context()
    client = ShardClient(endpoint, ctx)
    try:
        return await client.simple("stats", Deadline.after(5000))
    finally:
        await client.close()
        ctx.term()


def test_small_lookups_on_resident_parts_run_on_the_loop(shards, model_and_plan) -> None:
    """Shard 1 (--hugepages) pools lookups of up to --inline-ids ids on its loop and larger
    ones on a worker; shard 0 maps its parts lazily, so every lookup goes to a worker (a page
    fault must not stall the loop). Both paths give the reference's values."""
    endpoints, _, _ = shards
    model, _, plan = model_and_plan
    for k, endpoint in enumerate(endpoints):
        for bags in (9, 8000):  # a few dozen ids, then well over the default 16384
            before = asyncio.run(stats(endpoint))["inline"]
            parts, ids, lengths, _, ids_pp, len_pp, w_pp = make_lookup(plan, k, 7, bags=bags)
            groups = asyncio.run(lookup(endpoint, parts, ids, lengths))
            want = reference(model, parts, ids_pp, len_pp, w_pp, False)
            for g in groups:
                for j, i in enumerate(g.parts):
                    np.testing.assert_allclose(g.pooled[:, j, :], want[i], rtol=1e-5, atol=1e-5)
            inline = asyncio.run(stats(endpoint))["inline"] - before
            assert inline == (1 if k == 1 and ids.size <= 16384 else 0), (k, ids.size)
            assert (ids.size <= 16384) == (bags == 9)


def expect_error(endpoint: str, frames, kind: str) -> None:
    reply = msgpack.unpackb(raw(endpoint, frames)[0])
    assert reply["ok"] is False and reply["error"]["kind"] == kind, reply


def test_errors_are_typed_and_the_daemon_keeps_serving(shards, model_and_plan) -> None:
    endpoint = shards[0][0]
    _, _, plan = model_and_plan
    part = plan.shard(0).parts[0]
    good = encode_lookup(
        1,
        now_ms() + 10_000,
        [PartRequest(part.table, part.row_start, 1)],
        np.array([part.row_start]),
        np.array([1]),
    )
    hdr = msgpack.unpackb(good[0])
    bad_version = msgpack.packb({**hdr, "v": 99})
    expect_error(endpoint, [bad_version, *good[1:]], "unsupported_version")
    expect_error(endpoint, [header("explode")], "unknown_op")
    expect_error(endpoint, [b"\xc1garbage"], "bad_request")
    expect_error(endpoint, [header("health"), b"extra"], "bad_request")
    wrong_dtype = msgpack.packb({**hdr, "id_dtype": "<f8"})
    expect_error(endpoint, [wrong_dtype, *good[1:]], "bad_request")
    expect_error(endpoint, [good[0], good[1]], "bad_request")  # missing lengths
    expect_error(endpoint, [good[0], good[1], np.array([2], "<i4")], "bad_request")
    expect_error(endpoint, [good[0], b"\x01\x02\x03", good[2]], "bad_request")
    for parts, field in (
        ({**hdr["parts"], "bags": [-1]}, "parts.bags[0]"),
        ({**hdr["parts"], "mode": ["max"]}, "parts.mode[0]"),
        ({**hdr["parts"], "row_start": [0, 0]}, "parts"),
        ([hdr["parts"]], "parts"),
    ):
        reply = msgpack.unpackb(
            raw(endpoint, [msgpack.packb({**hdr, "parts": parts}), *good[1:]])[0]
        )
        assert reply["error"]["kind"] == "bad_request" and reply["error"]["field"] == field, reply
    unknown = encode_lookup(
        1, now_ms() + 10_000, [PartRequest(part.table, 7777777, 1)], np.array([1]), np.array([1])
    )
    expect_error(endpoint, unknown, "unknown_table")
    outside = encode_lookup(
        1,
        now_ms() + 10_000,
        [PartRequest(part.table, part.row_start, 1)],
        np.array([part.row_end]),
        np.array([1]),
    )
    expect_error(endpoint, outside, "id_out_of_range")
    negative = encode_lookup(
        1,
        now_ms() + 10_000,
        [PartRequest(part.table, part.row_start, 1)],
        np.array([-1]),
        np.array([1]),
    )
    expect_error(endpoint, negative, "id_out_of_range")
    reply = raw(endpoint, good)
    assert msgpack.unpackb(reply[0])["ok"] is True
    with pytest.raises(IdOutOfRange, match=r"outside the rows this part serves"):
        asyncio.run(
            lookup(
                endpoint,
                [PartRequest(part.table, part.row_start, 1)],
                np.array([part.row_end]),
                np.array([1]),
            )
        )
    with pytest.raises(UnknownTable):
        asyncio.run(lookup(endpoint, [PartRequest("nope", 0, 1)], np.array([0]), np.array([1])))


@pytest.mark.slow
def test_fuzz_then_a_correct_lookup(shards, model_and_plan) -> None:
    endpoint, proc = shards[0][0], shards[1][0]
    model, _, plan = model_and_plan
    rng = np.random.default_rng(1234)
    parts, ids, lengths, _, ids_pp, len_pp, w_pp = make_lookup(plan, 0, seed=5)
    good = encode_lookup(1, now_ms() + 60_000, parts, ids, lengths)
    good_bytes = [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in good]
    ctx = zmq.Context.instance()
    sent = 0
    with ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        for i in range(3000):
            choice = i % 6
            if choice == 0:  # random bytes in every frame
                frames = [rng.bytes(int(rng.integers(0, 64))) for _ in range(rng.integers(1, 5))]
            elif choice == 1:  # a valid header, corrupted data frames
                frames = [good_bytes[0]] + [
                    rng.bytes(int(rng.integers(0, 200))) for _ in range(rng.integers(0, 4))
                ]
            elif choice == 2:  # one flipped byte anywhere
                frames = [bytearray(f) for f in good_bytes]
                f = frames[int(rng.integers(0, len(frames)))]
                if f:
                    f[int(rng.integers(0, len(f)))] ^= 0xFF
                frames = [bytes(f) for f in frames]
            elif choice == 3:  # truncated frames
                frames = [f[: int(rng.integers(0, len(f) + 1))] for f in good_bytes]
            elif choice == 4:  # random msgpack structures as header
                bags = int(rng.integers(-5, 5))
                value = {
                    "v": VERSION,
                    "op": "lookup",
                    "id": int(rng.integers(0, 9)),
                    "parts": [
                        {"table": ["x"], "row_start": [0], "bags": [bags], "mode": ["sum"]},
                        {"table": "x", "bags": [bags]},
                        {"table": ["x"], "row_start": [0, 1], "bags": [bags], "mode": ["sum"]},
                        {"table": [1], "row_start": [0], "bags": [bags], "mode": [["sum"]]},
                        [{"table": "x", "bags": bags}],
                    ][int(rng.integers(0, 5))],
                    "id_dtype": ["<i8", "<i4", 3, None][int(rng.integers(0, 4))],
                    "weighted": [True, False, "no"][int(rng.integers(0, 3))],
                }
                frames = [msgpack.packb(value), *good_bytes[1:]]
            else:  # frames dropped or repeated
                frames = good_bytes[: int(rng.integers(1, 4))] * int(rng.integers(1, 3))
            sock.send_multipart(frames)
            sent += 1
        replies = 0
        while replies < sent and sock.poll(10_000):
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            assert isinstance(reply, dict) and "ok" in reply
            if not reply["ok"]:
                assert reply["error"]["kind"] and reply["error"]["message"]
            replies += 1
    assert replies == sent
    assert proc.poll() is None
    groups = asyncio.run(lookup(endpoint, parts, ids, lengths))
    want = reference(model, parts, ids_pp, len_pp, w_pp, False)
    for g in groups:
        for j, i in enumerate(g.parts):
            np.testing.assert_allclose(g.pooled[:, j, :], want[i], rtol=1e-5, atol=1e-5)


def test_deadline_in_the_past_is_refused_without_work(shards, model_and_plan) -> None:
    endpoint = shards[0][0]
    _, _, plan = model_and_plan
    parts, ids, lengths, *_ = make_lookup(plan, 0, seed=1)
    frames = encode_lookup(1, now_ms() - 1, parts, ids, lengths)
    expect_error(endpoint, frames, "deadline_exceeded")


def test_client_deadline_against_a_silent_endpoint() -> None:
    # Nothing listens: the call must fail within its deadline, naming the shard.
    start = time.monotonic()
    with pytest.raises(RecserveError, match="did not answer within"):
        asyncio.run(
            lookup(
                f"tcp://127.0.0.1:{free_port()}",
                [PartRequest("t", 0, 1)],
                np.array([0]),
                np.array([1]),
                deadline_ms=now_ms() + 300,
            )
        )
    assert time.monotonic() - start < 2.0


def big_lookup(plan: Plan, n: int, bags: int = 1000):
    part = max(plan.shard(0).parts, key=lambda p: p.rows)
    ids = np.random.default_rng(0).integers(part.row_start, part.row_end, n)
    return [PartRequest(part.table, part.row_start, bags)], ids, np.full(bags, n // bags)


async def burst(endpoint: str, request, count: int, after_accepted=None) -> list[object]:
    """``count`` concurrent lookups on one client; ``after_accepted`` runs once the shard
    reports them all in flight."""
    ctx = zmq.Context()
    client = ShardClient(endpoint, ctx)
    parts, ids, lengths = request
    tasks = [
        asyncio.ensure_future(client.lookup(parts, ids, lengths, deadline=Deadline.after(60_000)))
        for _ in range(count)
    ]
    if after_accepted is not None:
        # Once the shard holds every lookup (done or in flight) and some are still running.
        async with asyncio.timeout(20):
            while True:
                stats = await client.simple("stats", Deadline.after(5000))
                received = stats["requests"].get("lookup:ok", 0) + stats["inflight"]
                if received >= count:
                    assert stats["inflight"] >= 1, "every lookup finished before SIGTERM"
                    break
                await asyncio.sleep(0.001)
        after_accepted()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()
    ctx.term()
    return results


def test_overload_is_refused_at_once(model_and_plan, tmp_path: Path) -> None:
    """One large lookup holds the only slot; lookups sent meanwhile are refused at once."""
    model, plan_path, plan = model_and_plan
    endpoint = f"ipc://{tmp_path}/busy.sock"
    big = big_lookup(plan, 4_000_000)
    small = big_lookup(plan, 1, bags=1)

    async def run() -> tuple[object, list[object]]:
        ctx = zmq.Context()
        client = ShardClient(endpoint, ctx)
        try:
            held = asyncio.ensure_future(
                client.lookup(*big[:2], big[2], deadline=Deadline.after(60_000))
            )
            async with asyncio.timeout(20):
                while (await client.simple("health", Deadline.after(5000)))["inflight"] < 1:
                    await asyncio.sleep(0.001)
            start = time.monotonic()
            refused = await asyncio.gather(
                *(
                    client.lookup(*small[:2], small[2], deadline=Deadline.after(60_000))
                    for _ in range(5)
                ),
                return_exceptions=True,
            )
            assert time.monotonic() - start < 1.0
            return await held, refused
        finally:
            await client.close()
            ctx.term()

    with running(plan_path, model, 0, endpoint, "--queue-limit", "1", "--kernel-threads", "1"):
        done, refused = asyncio.run(run())
    assert isinstance(done, list)
    assert all(isinstance(r, Overloaded) for r in refused), refused


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
    model, plan_path, _ = model_and_plan
    port = free_port()
    endpoint = f"ipc://{tmp_path}/m.sock"
    with running(plan_path, model, 0, endpoint, "--metrics-port", str(port)):
        raw(endpoint, [header("health")])
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    text = body.decode()
    assert 'recserve_shard_requests_total{op="health",outcome="ok"}' in text
    assert "process_resident_memory_bytes" in text
    assert "recserve_shard_lookup_seconds_bucket" in text


def test_info_names_the_model_and_parts(shards, model_and_plan) -> None:
    endpoint = shards[0][1]
    model, _, plan = model_and_plan
    info = msgpack.unpackb(raw(endpoint, [header("info")])[0])
    assert info["model"]["digest"] == read_manifest(model).digest()
    assert [(p["table"], p["row_start"], p["row_end"]) for p in info["parts"]] == [
        (p.table, p.row_start, p.row_end) for p in plan.shard(1).parts
    ]


def test_hugepages_copy_is_logged(shards) -> None:
    """Shard 1 runs with --hugepages (its lookups are checked above): it says how much of
    the copy the kernel backs with 2 MiB pages (0 where THP is off)."""
    lines = [json.loads(x) for x in (shards[2] / "s1.log").read_text().splitlines() if x]
    copied = [x["msg"] for x in lines if "huge-page memory" in x.get("msg", "")]
    assert copied and "backed by 2 MiB pages" in copied[0], lines


def cpus_of(tid_path: Path) -> frozenset[int]:
    for line in (tid_path / "status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpus(line.split(":", 1)[1])
    raise AssertionError(f"no Cpus_allowed_list in {tid_path}/status")


def test_kernel_cpus_keep_the_workers_apart(model_and_plan, tmp_path: Path) -> None:
    """With --kernel-cpus the worker (and its OpenMP team) pools on those CPUs only and
    every other thread of the daemon (loop, ZeroMQ, /metrics, OpenBLAS) runs on the rest;
    results stay right."""
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
        parts, ids, lengths, _, ids_pp, len_pp, w_pp = make_lookup(plan, 0, 11, bags=2000)
        groups = asyncio.run(lookup(endpoint, parts, ids, lengths))
        want = reference(model, parts, ids_pp, len_pp, w_pp, False)
        for g in groups:
            for j, i in enumerate(g.parts):
                np.testing.assert_allclose(g.pooled[:, j, :], want[i], rtol=1e-5, atol=1e-5)
        masks = {int(t.name): cpus_of(t) for t in Path(f"/proc/{proc.pid}/task").iterdir()}
        info = msgpack.unpackb(raw(endpoint, [header("info")])[0])
    assert info["kernel_cpus"] == sorted(kernel)
    assert masks[proc.pid] == allowed - kernel
    assert set(masks.values()) == {kernel, allowed - kernel}, masks
    assert sum(m == kernel for m in masks.values()) == 2  # the worker and its team's thread


@pytest.mark.parametrize("cpus", ["all", "x", "9999"])
def test_bad_kernel_cpus_are_refused(model_and_plan, tmp_path: Path, cpus: str) -> None:
    model, plan_path, _ = model_and_plan
    if cpus == "all":
        cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    cmd = shard_cmd(plan_path, model, 0, f"ipc://{tmp_path}/x.sock", "--kernel-cpus", cpus)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--kernel-cpus" in done.stderr, done.stderr
