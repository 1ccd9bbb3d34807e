"""Helpers of the shardd integration tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import numpy as np
import zmq

import kernels
from recserve.contracts.manifest import read_manifest
from recserve.contracts.plan import Plan
from recserve.model.artifact import open_table
from recserve.rpc.client import ShardClient
from recserve.rpc.deadline import Deadline, now_ms
from recserve.rpc.wire import PartRequest
from shardd.cpus import parse_cpus
from tests.integration.shards import (
    raw,
)


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


async def stats(endpoint: str) -> dict:
    ctx = zmq.Context()
    client = ShardClient(endpoint, ctx)
    try:
        return await client.simple("stats", Deadline.after(5000))
    finally:
        await client.close()
        ctx.term()


def expect_error(endpoint: str, frames, kind: str) -> None:
    reply = msgpack.unpackb(raw(endpoint, frames)[0])
    assert reply["ok"] is False and reply["error"]["kind"] == kind, reply


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


def cpus_of(tid_path: Path) -> frozenset[int]:
    for line in (tid_path / "status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpus(line.split(":", 1)[1])
    raise AssertionError(f"no Cpus_allowed_list in {tid_path}/status")
