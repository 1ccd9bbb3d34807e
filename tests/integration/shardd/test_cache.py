"""A shard serving its parts from a row cache over the table files (--cache-bytes): the
same pooled values as a resident shard across hits, misses and evictions, on fp32, fp16 and
int8 tables; a cache of 5 % of the rows; a restart warmed from its trace; a failed disk read
answered as an error while the shard stays up; bad sizes refused at start."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from recserve.cli import main as cli
from recserve.contracts.errors import DiskReadError, IdOutOfRange
from recserve.contracts.manifest import AccessStats, TableSpec, read_manifest
from recserve.contracts.plan import Plan, read_plan
from recserve.model.workload import scatter, zipf_ranks
from recserve.rpc.client import ShardClient
from recserve.rpc.deadline import Deadline
from recserve.rpc.wire import PartRequest
from tests.integration.shardd.helpers import reference, stats
from tests.integration.shards import free_port, running, shard_cmd
from tests.models import manifest_of, write_random

ZIPF = 1.1


@pytest.fixture(scope="module")
def cached_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Plan]:
    """Three tables (fp32, fp16, int8) of 4-40k rows; two shards, a table split by rows."""
    root = tmp_path_factory.mktemp("cache")
    stats_ = AccessStats(zipf=ZIPF, pooling_factor=4.0)
    manifest = manifest_of(
        (
            TableSpec("a", 40_000, 16, features=("fa",), stats=stats_),
            TableSpec("b", 30_000, 16, dtype="int8", features=("fb",), stats=stats_),
            TableSpec("c", 4_000, 16, dtype="fp16", features=("fc",), stats=stats_),
        ),
        4,
        name="cached",
    )
    write_random(root / "m", manifest, seed=5)
    argv = ["plan", "--model", str(root / "m"), "--shards", "2", "--strategy", "capacity"]
    assert cli([*argv, "--out", str(root / "plan.json")]) == 0
    plan = read_plan(root / "plan.json")
    assert any(p.row_start > 0 or p.rows < 30_000 for p in plan.shard(0).parts)
    return root / "m", root / "plan.json", plan


async def lookup_once(endpoint: str, reqs, ids, lengths):
    """One lookup through a fresh ``ShardClient`` (its typed errors raised)."""
    ctx = zmq.Context()
    client = ShardClient(endpoint, ctx)
    try:
        return await client.lookup(reqs, ids, lengths, deadline=Deadline.after(10_000))
    finally:
        await client.close()
        ctx.term()


def shard_bytes(model: Path, plan: Plan, shard: int) -> int:
    manifest = read_manifest(model)
    return sum(p.rows * manifest.table(p.table).row_bytes for p in plan.shard(shard).parts)


def zipf_lookup(plan: Plan, shard: int, rng: np.random.Generator, bags: int = 64):
    """Bags of Zipf-drawn ids for every part of ``shard`` (hot rows scattered)."""
    parts, ids, lengths, ids_pp, len_pp = [], [], [], [], []
    for p in plan.shard(shard).parts:
        lens = rng.poisson(4.0, bags)
        n = int(lens.sum())
        part_ids = p.row_start + scatter(zipf_ranks(rng, n, p.rows, ZIPF), p.rows)
        parts.append(PartRequest(p.table, p.row_start, bags, "sum"))
        ids.append(part_ids)
        lengths.append(lens)
        ids_pp.append(part_ids)
        len_pp.append(lens)
    return parts, np.concatenate(ids), np.concatenate(lengths), ids_pp, len_pp


async def pooled(client: ShardClient, parts, ids, lengths) -> list[np.ndarray]:
    groups = await client.lookup(parts, ids, lengths, deadline=Deadline.after(20_000))
    out: list[np.ndarray] = [np.empty(0)] * len(parts)
    for g in groups:
        for j, i in enumerate(g.parts):
            out[i] = np.array(g.pooled[:, j, :])
    return out


async def compare(endpoints: list[str], plan: Plan, shard: int, rounds: int, seed: int):
    """``rounds`` Zipf lookups to every endpoint; returns the replies per endpoint and the
    lookups."""
    ctx = zmq.Context()
    clients = [ShardClient(ep, ctx) for ep in endpoints]
    rng = np.random.default_rng(seed)
    seen = []
    try:
        for _ in range(rounds):
            parts, ids, lengths, ids_pp, len_pp = zipf_lookup(plan, shard, rng)
            replies = [await pooled(c, parts, ids, lengths) for c in clients]
            seen.append(((parts, ids_pp, len_pp), replies))
    finally:
        for c in clients:
            await c.close()
        ctx.term()
    return seen


def test_cached_shard_pools_as_the_resident_one(cached_model, tmp_path) -> None:
    model, plan_path, plan = cached_model
    resident, cached = f"ipc://{tmp_path}/r.sock", f"ipc://{tmp_path}/c.sock"
    # ~20 % of the shard's rows: hits, misses and evictions on every table.
    budget = str(shard_bytes(model, plan, 0) // 5)
    with (
        running(plan_path, model, 0, resident, "--preload"),
        running(plan_path, model, 0, cached, "--cache-bytes", budget),
    ):
        seen = asyncio.run(compare([resident, cached], plan, 0, rounds=60, seed=1))
        for _, (want, got) in seen:
            for w, g in zip(want, got, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
        (parts, ids_pp, len_pp), (_, got) = seen[-1]
        ref = reference(model, parts, ids_pp, len_pp, ids_pp, False)
        for w, g in zip(ref, got, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        cache = asyncio.run(stats(cached))["cache"]
    assert cache["hits"] > 0 and cache["misses"] > 0 and cache["evictions"] > 0, cache
    assert cache["bytes"] <= int(budget) and 0 < cache["hit_rate"] < 1, cache
    assert cache["direct_io"] is True, cache


def test_cache_of_five_percent_serves_correctly(cached_model, tmp_path) -> None:
    model, plan_path, plan = cached_model
    endpoint = f"ipc://{tmp_path}/c.sock"
    budget = shard_bytes(model, plan, 1) // 20
    with running(plan_path, model, 1, endpoint, "--cache-bytes", str(budget)):
        seen = asyncio.run(compare([endpoint], plan, 1, rounds=30, seed=2))
        for (parts, ids_pp, len_pp), (got,) in seen:
            want = reference(model, parts, ids_pp, len_pp, ids_pp, False)
            for w, g in zip(want, got, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        cache = asyncio.run(stats(endpoint))["cache"]
    assert cache["evictions"] > 0 and cache["rows_cached"] <= cache["slots"], cache
    rows = sum(p.rows for p in plan.shard(1).parts)
    assert cache["slots"] < rows * 0.1, (cache, rows)


def test_restart_warms_from_its_trace(cached_model, tmp_path) -> None:
    """A shard that ran a while writes its trace at shutdown; restarted from it, its first
    lookups hit about as often as the warm shard's did, a cold one's far less."""
    model, plan_path, plan = cached_model
    endpoint = f"ipc://{tmp_path}/c.sock"
    trace = tmp_path / "trace.npz"
    args = ("--cache-bytes", str(shard_bytes(model, plan, 0) // 4), "--warm-from", str(trace))

    def first_hit_rate(seed: int) -> float:
        asyncio.run(compare([endpoint], plan, 0, rounds=5, seed=seed))
        return asyncio.run(stats(endpoint))["cache"]["hit_rate"]

    with running(plan_path, model, 0, endpoint, *args) as proc:
        cold = first_hit_rate(10)
        asyncio.run(compare([endpoint], plan, 0, rounds=60, seed=11))
        warm = asyncio.run(stats(endpoint))["cache"]["hit_rate"]
        proc.send_signal(signal.SIGUSR1)  # on request, while serving
        end = time.monotonic() + 20
        while not trace.exists() and time.monotonic() < end:
            time.sleep(0.05)
        assert trace.exists(), "SIGUSR1 wrote no trace"
        trace.unlink()
    assert trace.exists()  # and again at shutdown
    with running(plan_path, model, 0, endpoint, *args):
        restarted = first_hit_rate(12)
    assert restarted > cold + 0.15, (cold, warm, restarted)
    assert restarted > 0.9 * warm, (cold, warm, restarted)


def test_failed_disk_read_is_an_error_reply_and_the_shard_stays_up(cached_model, tmp_path) -> None:
    """The table file is cut short under the running shard: lookups of rows past the end
    get ``io_error``; the shard answers health and lookups of the rows still there."""
    model, plan_path, plan = cached_model
    copy = tmp_path / "m"
    subprocess.run(["cp", "-r", str(model), str(copy)], check=True)
    endpoint = f"ipc://{tmp_path}/c.sock"
    part = max(plan.shard(0).parts, key=lambda p: p.rows)
    with running(plan_path, copy, 0, endpoint, "--cache-bytes", "1MiB"):
        path = copy / "tables" / f"{part.table}.npy"
        row_bytes = read_manifest(copy).table(part.table).row_bytes
        os.truncate(path, path.stat().st_size - 100 * row_bytes)  # the last 100 rows
        high = np.arange(part.row_end - 50, part.row_end)
        req = [PartRequest(part.table, part.row_start, 50)]

        def ask(ids):
            return lookup_once(endpoint, req, ids, np.ones(50, np.int32))

        with pytest.raises(DiskReadError, match="ends before"):
            asyncio.run(ask(high))
        low = np.arange(part.row_start, part.row_start + 50)
        assert asyncio.run(ask(low))[0].pooled.shape == (50, 1, 16)
        counts = asyncio.run(stats(endpoint))["requests"]
    assert counts.get("lookup:io_error") == 1 and counts.get("lookup:ok") == 1, counts


@pytest.mark.parametrize(
    "extra, says",
    [
        (("--cache-bytes", "100"), "less than one row"),
        (("--cache-bytes", "64TiB"), "more than this machine's memory"),
        (("--cache-bytes", "1MiB", "--preload"), "drop --preload"),
        (("--warm-from", "x.npz"), "needs --cache-bytes"),
    ],
)
def test_bad_cache_sizes_are_refused_at_start(cached_model, extra, says) -> None:
    model, plan_path, _ = cached_model
    cmd = shard_cmd(plan_path, model, 0, f"tcp://127.0.0.1:{free_port()}", *extra)
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    told = [line for line in done.stderr.splitlines() if line.startswith("recserve shardd:")]
    assert len(told) == 1 and says in told[0], done.stderr
    assert time.monotonic() - start < 30


def test_cached_shard_refuses_an_id_outside_its_part(cached_model, tmp_path) -> None:
    """An id out of range in the second part of a lookup: ``id_out_of_range`` naming that
    part (the cache's map finds it; no separate check runs first), and the same rows in
    range are served right after."""
    model, plan_path, plan = cached_model
    endpoint = f"ipc://{tmp_path}/c.sock"
    first, second = plan.shard(0).parts[:2]
    reqs = [PartRequest(p.table, p.row_start, 2) for p in (first, second)]
    good = np.array([first.row_start, first.row_start + 1, second.row_start, second.row_start])
    bad = good.copy()
    bad[3] = second.row_end + 5

    def ask(ids):
        return lookup_once(endpoint, reqs, ids, np.ones(4, np.int32))

    with running(plan_path, model, 0, endpoint, "--cache-bytes", "1MiB"):
        with pytest.raises(IdOutOfRange, match="outside the rows this part serves") as err:
            asyncio.run(ask(bad))
        assert err.value.field == "parts[1]"
        assert sum(g.pooled.shape[1] for g in asyncio.run(ask(good))) == 2
        assert asyncio.run(stats(endpoint))["inflight"] == 0


def test_parts_the_budget_holds_whole_are_resident(cached_model, tmp_path) -> None:
    """Shard 1 with 600 KiB: the split gives the fp16 table all its rows, so it is read whole
    and served without misses, beside the other part's row cache; both pool as resident."""
    model, plan_path, plan = cached_model
    resident, cached = f"ipc://{tmp_path}/r.sock", f"ipc://{tmp_path}/c.sock"
    with (
        running(plan_path, model, 1, resident, "--preload"),
        running(plan_path, model, 1, cached, "--cache-bytes", "600KiB"),
    ):
        seen = asyncio.run(compare([resident, cached], plan, 1, rounds=20, seed=4))
        for _, (want, got) in seen:
            for w, g in zip(want, got, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
        cache = asyncio.run(stats(cached))["cache"]
    assert cache["resident_parts"] == 1 and cache["misses"] > 0, cache
    whole = next(p.rows for p in plan.shard(1).parts if p.table == "c")
    assert whole < cache["rows_cached"] <= whole + cache["slots"], (cache, whole)
    assert cache["bytes"] <= 600 << 10, cache
