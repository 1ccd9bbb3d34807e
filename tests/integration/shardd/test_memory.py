"""Larger than memory, measured by the kernel: a cached shard's memory (anonymous plus the
page cache it causes, as the cgroup v1 memory controller charges it) stays within its
--cache-bytes plus the stated overhead whatever it reads, and under a limit below its
table's size it serves the reference's values; a shard mapping the same table is charged
for every page it touches. Root and /sys/fs/cgroup/memory only."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import zmq

import kernels
from recserve.cli import main as cli
from recserve.contracts.manifest import AccessStats, TableSpec, read_manifest
from recserve.local import memcg
from recserve.model.artifact import open_table
from recserve.rpc.client import ShardClient
from recserve.rpc.deadline import Deadline
from recserve.rpc.wire import PartRequest
from tests.integration.shards import shard_cmd, stop, wait_healthy
from tests.models import manifest_of, write_random

pytestmark = pytest.mark.skipif(memcg.available() is not None, reason=str(memcg.available()))
ROWS, DIM = 1_000_000, 64  # 244 MiB of fp32 rows
CACHE = 32 << 20
OVERHEAD = 320 << 20  # README: a shard's own memory beside its cache (measured ~260 MiB)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("memory")
    stats = AccessStats(zipf=1.0, pooling_factor=10.0)
    manifest = manifest_of((TableSpec("a", ROWS, DIM, features=("fa",), stats=stats),), 4)
    write_random(root / "m", manifest, seed=1)
    assert cli(["plan", "--model", str(root / "m"), "--shards", "1", "--out", str(root / "p")]) == 0
    return root / "m", root / "p"


async def read_everywhere(endpoint: str, model: Path, rounds: int) -> None:
    """Lookups spread over the whole table; the last one checked against numpy."""
    ctx = zmq.Context()
    client = ShardClient(endpoint, ctx)
    rng = np.random.default_rng(0)
    try:
        for _ in range(rounds):
            ids = rng.integers(0, ROWS, 20_000)
            groups = await client.lookup(
                [PartRequest("a", 0, 2_000)],
                ids,
                np.full(2_000, 10, np.int32),
                deadline=Deadline.after(60_000),
            )
        table = open_table(model, read_manifest(model).table("a"))
        want = kernels.pool_numpy(table, ids, np.arange(0, 20_000, 10))
        np.testing.assert_allclose(groups[0].pooled[:, 0, :], want, rtol=1e-5, atol=1e-5)
    finally:
        await client.close()
        ctx.term()


def run_in_group(model: Path, plan: Path, tmp: Path, limit: int | None, *extra: str):
    memcg.drop_caches()
    with memcg.memory_group(limit, "recserve-test") as group:
        endpoint = f"ipc://{tmp}/s.sock"
        proc = group.popen(shard_cmd(plan, model, 0, endpoint, *extra))
        try:
            wait_healthy(endpoint, proc)
            start = group.stat()["cache"]
            asyncio.run(read_everywhere(endpoint, model, rounds=12))
            stat = group.stat()
            return group.max_usage, stat["cache"] - start, group.oom_kills, proc.poll()
        finally:
            stop(proc)


def test_cached_shard_is_charged_its_cache_not_its_table(big_model, tmp_path) -> None:
    model, plan = big_model
    peak, cache_growth, _, _ = run_in_group(
        model, plan, tmp_path, None, "--cache-bytes", str(CACHE)
    )
    assert peak <= CACHE + OVERHEAD, peak >> 20
    assert cache_growth < 16 << 20, cache_growth >> 20  # O_DIRECT: no table pages cached
    # The same reads through a mapped table: the page cache grows by most of the table.
    _, mapped_growth, _, _ = run_in_group(model, plan, tmp_path, None)
    assert mapped_growth > ROWS * DIM * 4 // 2, mapped_growth >> 20


def test_cached_shard_serves_under_a_limit_below_its_table(big_model, tmp_path) -> None:
    model, plan = big_model
    limit = CACHE + OVERHEAD  # < table (244 MiB) + the shard's own ~260 MiB
    peak, _, ooms, alive = run_in_group(model, plan, tmp_path, limit, "--cache-bytes", str(CACHE))
    assert ooms == 0 and alive is None and peak <= limit
