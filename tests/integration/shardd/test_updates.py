"""Online updates on a real shard: a staged and committed version pools as the tables with
those rows replaced (int8 rows quantized as ``recserve quantize`` does), older versions stay
readable, bad updates change nothing, a shard killed after a commit or between stage and
commit comes back from its log with exactly what it acknowledged, and compaction into new
part files (of the most-updated parts, the others' corrections carried) changes no
version's values, even when it stops part way."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest

import kernels
from recserve.contracts.manifest import read_manifest
from recserve.contracts.plan import Plan
from recserve.model.artifact import open_table
from recserve.rpc.wire import PartRequest, StagePart, decode_lookup, encode_lookup, encode_stage
from shardd import compaction
from shardd.store import LAYOUTS_KEPT, PartStore
from shardd.updates import UpdateLog
from tests.integration.shardd.test_cache import cached_model  # noqa: F401 - the fixture
from tests.integration.shards import header, raw, running, start_shard, stop, wait_healthy

ROWS = 64


def stage(endpoint: str, version: int, parts: list[StagePart], dense: bytes | None = None) -> dict:
    return msgpack.unpackb(raw(endpoint, encode_stage(1, None, version, parts, dense))[0])


def op(endpoint: str, name: str, **fields) -> dict:
    return msgpack.unpackb(raw(endpoint, [header(name, **fields)])[0])


def updates_for(plan: Plan, model: Path, seed: int) -> tuple[list[StagePart], dict]:
    """New rows for ROWS ids of every part of shard 0; returns the parts and, per table,
    the full replaced table (float32, as stored) for the reference."""
    manifest = read_manifest(model)
    rng = np.random.default_rng(seed)
    parts, tables = [], {}
    for p in plan.shard(0).parts:
        spec = manifest.table(p.table)
        ids = rng.choice(np.arange(p.row_start, p.row_end), min(ROWS, p.rows), replace=False)
        rows = rng.standard_normal((ids.size, spec.dim)).astype(np.float32)
        parts.append(StagePart(p.table, p.row_start, ids.astype(np.int64), rows))
        table = open_table(model, spec)
        full = (
            table.dequantize()
            if isinstance(table, kernels.Int8RowwiseTable)
            else np.array(table, np.float32)
        )
        if spec.dtype == "int8":
            stored = kernels.Int8RowwiseTable(kernels.quantize_rows(rows)).dequantize()
        elif spec.dtype == "fp16":
            stored = rows.astype(np.float16).astype(np.float32)
        else:
            stored = rows
        full[ids] = stored
        tables[p.table] = full
    return parts, tables


def pooled(endpoint: str, plan: Plan, version: int | None, seed: int) -> tuple[list, list]:
    """A lookup over every part of shard 0 (bags hit updated rows often), at ``version``."""
    rng = np.random.default_rng(seed)
    reqs, ids, lengths, per_part = [], [], [], []
    for p in plan.shard(0).parts:
        lens = rng.integers(0, 5, 40)
        part_ids = rng.integers(p.row_start, min(p.row_end, p.row_start + 200), int(lens.sum()))
        reqs.append(PartRequest(p.table, p.row_start, 40, "mean" if p.row_start else "sum"))
        ids.append(part_ids)
        lengths.append(lens)
        per_part.append((part_ids, lens))
    frames = encode_lookup(1, None, reqs, np.concatenate(ids), np.concatenate(lengths))
    head = msgpack.unpackb(frames[0])
    if version is not None:
        head["version"] = version
    frames[0] = msgpack.packb(head)
    reply = raw(endpoint, frames)
    meta = msgpack.unpackb(reply[0])
    assert meta["ok"], meta
    out: list = [None] * len(reqs)
    for g, frame in zip(meta["groups"], reply[1:], strict=True):
        arr = np.frombuffer(frame, np.float32).reshape(g["bags"], len(g["parts"]), g["dim"])
        for j, i in enumerate(g["parts"]):
            out[i] = arr[:, j, :]
    return out, list(zip(reqs, per_part, strict=True))


def reference(tables: dict, asked: list) -> list:
    out = []
    for req, (ids, lens) in asked:
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
        out.append(kernels.pool_numpy(tables[req.table], ids, offsets, mode=req.mode))
    return out


def originals(model: Path, plan: Plan) -> dict:
    manifest = read_manifest(model)
    out = {}
    for p in plan.shard(0).parts:
        t = open_table(model, manifest.table(p.table))
        out[p.table] = (
            t.dequantize() if isinstance(t, kernels.Int8RowwiseTable) else np.asarray(t, np.float32)
        )
    return out


# Resident, row-cached (200 KiB: every part cached) and with a cache that holds the shard's
# parts whole (4 MiB: every part read whole into it, and read again after compaction).
MEMORY = {"preload": ["--preload"], "cached": ["--cache-bytes", "200KiB"],
          "whole": ["--cache-bytes", "4MiB"]}  # fmt: skip


@pytest.mark.parametrize("memory", list(MEMORY))
def test_committed_version_pools_the_new_rows(cached_model, tmp_path, memory) -> None:  # noqa: F811
    model, plan_path, plan = cached_model
    endpoint = f"ipc://{tmp_path}/u.sock"
    flags = MEMORY[memory]
    old = originals(model, plan)
    with running(plan_path, model, 0, endpoint, *flags, "--state-dir", str(tmp_path / "state")):
        parts, new = updates_for(plan, model, seed=1)
        assert stage(endpoint, 1, parts)["ok"]
        got, asked = pooled(endpoint, plan, None, seed=2)  # staged is not served
        for g, w in zip(got, reference(old, asked), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        assert op(endpoint, "commit", version=1)["version"] == 1
        for version in (None, 1):
            got, asked = pooled(endpoint, plan, version, seed=3)
            for g, w in zip(got, reference(new, asked), strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        got, asked = pooled(endpoint, plan, 0, seed=3)  # the old version is still readable
        for g, w in zip(got, reference(old, asked), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        missing = msgpack.unpackb(raw(endpoint, [header("health")])[0])
        assert missing["version"] == 1 and missing["staged"] is None
        if memory == "whole":
            assert op(endpoint, "stats")["cache"]["resident_parts"] == len(plan.shard(0).parts)


def test_bad_updates_change_nothing(cached_model, tmp_path) -> None:  # noqa: F811
    model, plan_path, plan = cached_model
    endpoint = f"ipc://{tmp_path}/u.sock"
    with running(plan_path, model, 0, endpoint, "--state-dir", str(tmp_path / "state")):
        parts, _ = updates_for(plan, model, seed=1)
        p = parts[0]
        bad = {
            "unknown_table": StagePart("nope", 0, p.ids, p.rows),
            "id_out_of_range": StagePart(p.table, p.row_start, p.ids + 10**9, p.rows),
            "bad_request": StagePart(p.table, p.row_start, p.ids, p.rows[:, :-1]),
        }
        nan = p.rows.copy()
        nan[3, 1] = np.nan
        for kind, part in [
            *bad.items(),
            ("bad_request", StagePart(p.table, p.row_start, p.ids, nan)),
        ]:
            reply = stage(endpoint, 1, [*parts[1:], part])
            assert not reply["ok"] and reply["error"]["kind"] == kind, reply
        assert not stage(endpoint, 2, parts)["ok"]  # versions follow one another
        health = op(endpoint, "health")
        assert health["version"] == 0 and health["staged"] is None
        assert not op(endpoint, "commit", version=1)["ok"]  # nothing staged


@pytest.mark.parametrize("when", ["after-commit", "between-stage-and-commit"])
def test_killed_shard_comes_back_with_what_it_acknowledged(cached_model, tmp_path, when) -> None:  # noqa: F811
    model, plan_path, plan = cached_model
    endpoint = f"ipc://{tmp_path}/u.sock"
    state = ["--state-dir", str(tmp_path / "state")]
    proc = start_shard(plan_path, model, 0, endpoint, *state)
    try:
        wait_healthy(endpoint, proc)
        parts, new = updates_for(plan, model, seed=4)
        assert stage(endpoint, 1, parts)["ok"]
        if when == "after-commit":
            assert op(endpoint, "commit", version=1)["ok"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = start_shard(plan_path, model, 0, endpoint, *state)
        wait_healthy(endpoint, proc)
        health = op(endpoint, "health")
        if when == "after-commit":
            assert health["version"] == 1 and health["staged"] is None
        else:
            assert health["version"] == 0 and health["staged"] == 1
            assert op(endpoint, "commit", version=1)["ok"]  # the coordinator's decision
        got, asked = pooled(endpoint, plan, 1, seed=5)
        for g, w in zip(got, reference(new, asked), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    finally:
        stop(proc)


def near_rows(
    plan: Plan, model: Path, seed: int, tables: dict, counts: dict[str, int] | None = None
) -> tuple[list[StagePart], dict]:
    """New rows for ids near the start of every part of shard 0 (where ``pooled`` draws):
    ``counts`` of a table (50 unless said) among its first ``max(200, 2 * count)``; and
    ``tables`` with them replaced (stored as the table stores them)."""
    manifest = read_manifest(model)
    rng = np.random.default_rng(seed)
    parts, out = [], {name: t.copy() for name, t in tables.items()}
    for p in plan.shard(0).parts:
        spec = manifest.table(p.table)
        n = (counts or {}).get(p.table, 50)
        near = np.arange(p.row_start, min(p.row_end, p.row_start + max(200, 2 * n)))
        ids = rng.choice(near, n, False)
        rows = rng.standard_normal((ids.size, spec.dim)).astype(np.float32)
        parts.append(StagePart(p.table, p.row_start, ids.astype(np.int64), rows))
        if spec.dtype == "int8":
            rows = kernels.Int8RowwiseTable(kernels.quantize_rows(rows)).dequantize()
        elif spec.dtype == "fp16":
            rows = rows.astype(np.float16).astype(np.float32)
        out[p.table][ids] = rows
    return parts, out


def check(endpoint: str, plan: Plan, version: int, tables: dict, seed: int) -> None:
    got, asked = pooled(endpoint, plan, version, seed)
    for g, w in zip(got, reference(tables, asked), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def wait_compacted(endpoint: str, version: int) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = op(endpoint, "info")
        if info["versions"]["compacted"] == version:
            return info
        time.sleep(0.05)
    raise AssertionError(f"version {version} was not compacted: {info}")


@pytest.mark.parametrize("memory", list(MEMORY))
def test_compaction_folds_versions_into_files(cached_model, tmp_path, memory) -> None:  # noqa: F811
    """Each commit past --compact-at is folded into new part files and the log emptied;
    every version still readable pools as before, and a shard killed after it comes back
    from the files with the newest version and the dense weights it keeps."""
    model, plan_path, plan = cached_model
    endpoint = f"ipc://{tmp_path}/u.sock"
    state = tmp_path / "state"
    flags = [*MEMORY[memory], "--state-dir", str(state), "--compact-at", "0.0001"]
    v0 = originals(model, plan)
    v1_parts, v1 = near_rows(plan, model, 11, v0)
    v2_parts, v2 = near_rows(plan, model, 12, v1)  # overlaps version 1's rows
    proc = start_shard(plan_path, model, 0, endpoint, *flags)
    try:
        wait_healthy(endpoint, proc)
        check(endpoint, plan, 0, v0, seed=1)  # cache the old rows first
        dense = b"dense weights the shard keeps as they are"
        assert stage(endpoint, 1, v1_parts, dense)["ok"] and op(endpoint, "commit", version=1)["ok"]
        assert wait_compacted(endpoint, 1)["versions"]["log_bytes"] == 0
        for version, tables in [(1, v1), (0, v0)]:
            check(endpoint, plan, version, tables, seed=2)
        assert stage(endpoint, 2, v2_parts)["ok"] and op(endpoint, "commit", version=2)["ok"]
        wait_compacted(endpoint, 2)
        for version, tables in [(2, v2), (1, v1), (0, v0)]:
            check(endpoint, plan, version, tables, seed=3)
        (tables,) = state.glob("*/tables")  # the model's own state: state/<digest>/
        files = sorted(f.name for f in tables.iterdir())
        assert files == ["a.0.v2.bits.npy", "a.0.v2.npy", "b.0.v2.bits.npy", "b.0.v2.npy",
                         "dense.v1.npz"], files  # version 1's parts are gone  # fmt: skip
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = start_shard(plan_path, model, 0, endpoint, *flags)
        wait_healthy(endpoint, proc)
        info = op(endpoint, "info")
        assert info["versions"]["version"] == 2 and info["versions"]["compacted"] == 2
        kept = raw(endpoint, [header("dense")])  # kept through compaction and the restart
        assert msgpack.unpackb(kept[0])["version"] == 1 and kept[1] == dense
        check(endpoint, plan, 2, v2, seed=4)
        check(endpoint, plan, None, v2, seed=5)
    finally:
        stop(proc)


def test_replica_catches_up_across_a_compaction(cached_model, tmp_path) -> None:  # noqa: F811
    """A replica behind a peer's compaction gets the compacted rows as one version, then the
    peer's log; it then pools as the peer does."""
    model, _, plan = cached_model
    manifest = read_manifest(model)
    v0 = originals(model, plan)
    v1_parts, v1 = near_rows(plan, model, 21, v0)
    v2_parts, v2 = near_rows(plan, model, 22, v1)
    peer = PartStore(model, manifest, plan.shard(0), state_dir=tmp_path / "peer", compact_at=1e-4)
    peer.versions.stage(1, v1_parts)
    peer.versions.commit(1)
    assert peer.wants_compaction() and peer.compact() == len(v1_parts)
    peer.versions.stage(2, v2_parts)
    peer.versions.commit(2)
    behind = PartStore(model, manifest, plan.shard(0), state_dir=tmp_path / "behind")
    history = peer.versions.history(0)
    assert [v for v, _ in history] == [1, 2]
    assert behind.versions.catch_up(history) == 2 and behind.versions.current == 2
    for store in (peer, behind):
        pools_as(store, plan, v2)
    peer.close()
    behind.close()


def test_layouts_are_kept_per_generation_and_bounded(cached_model, tmp_path) -> None:  # noqa: F811
    """Lookups of many bag counts pool right, and a generation keeps at most
    ``LAYOUTS_KEPT`` of their layouts."""
    model, _, plan = cached_model
    store = PartStore(model, read_manifest(model), plan.shard(0))
    tables = originals(model, plan)
    p = plan.shard(0).parts[0]
    rng = np.random.default_rng(3)
    for bags in range(1, LAYOUTS_KEPT + 6):
        ids = rng.integers(p.row_start, p.row_start + 100, 2 * bags)
        frames = encode_lookup(1, None, [PartRequest(p.table, p.row_start, bags, "sum")] * 2,
                               ids, np.ones(2 * bags, np.int32))  # fmt: skip
        lookup = decode_lookup(msgpack.unpackb(frames[0]), frames[1:])
        for _ in range(2):  # laid out, then from the kept layout
            got = store.prepare(lookup).run()[0].pooled
            want = tables[p.table][ids].reshape(2, bags, -1).transpose(1, 0, 2)
            np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(store.view.layouts) == LAYOUTS_KEPT
    store.close()


def pools_as(store: PartStore, plan: Plan, tables: dict, version: int | None = None) -> None:
    """Every part of ``store`` (shard 0) pools as ``tables`` at ``version`` (None: newest),
    in-process."""
    rng = np.random.default_rng(7)
    for p in plan.shard(0).parts:
        ids = rng.integers(p.row_start, p.row_start + 200, 64)
        frames = encode_lookup(1, None, [PartRequest(p.table, p.row_start, 16, "sum")], ids,
                               np.full(16, 4))  # fmt: skip
        lookup = decode_lookup(msgpack.unpackb(frames[0]), frames[1:])
        want = kernels.pool_numpy(tables[p.table], ids, np.arange(0, 64, 4), mode="sum")
        got = store.prepare(lookup, version=version).run()[0].pooled[:, 0, :]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@dataclass
class Partial:
    """Shard 0's store with version 1 committed: 2,000 new rows of its first part (that
    part alone meets ``compact_at``) and 50 of each other; version 2's rows, not staged."""

    store: PartStore
    key: str  # the first part's
    rows: int  # the first part's
    tables: list[dict]  # per version 0, 1, 2: every table as it should pool
    v2_parts: list[StagePart]


def partial(model: Path, plan: Plan, state: Path, seed: int) -> Partial:
    first = plan.shard(0).parts[0]
    v0 = originals(model, plan)
    v1_parts, v1 = near_rows(plan, model, seed, v0, {first.table: 2000})
    v2_parts, v2 = near_rows(plan, model, seed + 1, v1)
    store = reopen(model, plan, state)
    store.versions.stage(1, v1_parts)
    store.versions.commit(1)
    return Partial(store, f"{first.table}@{first.row_start}", first.rows, [v0, v1, v2], v2_parts)


def reopen(model: Path, plan: Plan, state: Path) -> PartStore:
    """Shard 0's store on ``state`` (a restart when it exists), ``compact_at`` at 2,000 rows."""
    total = sum(p.rows for p in plan.shard(0).parts)
    return PartStore(model, read_manifest(model), plan.shard(0), state_dir=state,
                     compact_at=2000 / total)  # fmt: skip


def test_compaction_rewrites_the_most_updated_parts_only(cached_model, tmp_path) -> None:  # noqa: F811
    """Only the parts whose corrections pass the threshold are rewritten; the others' are
    carried in memory and in the log, through a restart and a replica's catch-up."""
    model, _, plan = cached_model
    got = partial(model, plan, tmp_path / "state", 31)
    store, (v0, v1, v2) = got.store, got.tables
    pools_as(store, plan, v1)  # lookups laid out before the compaction, asked again after it
    assert store.wants_compaction() and store.compact() == 1
    assert store.base is not None and list(store.base.files) == [got.key]
    info = store.versions.describe()
    n_parts = len(plan.shard(0).parts)
    assert info["rows_updated"] == 50 * (n_parts - 1) and info["log_bytes"] > 0
    row_bytes = read_manifest(model).table(plan.shard(0).parts[0].table).row_bytes
    assert info["compacted_bytes"] == got.rows * row_bytes
    pools_as(store, plan, v1)
    pools_as(store, plan, v0, version=0)
    store.versions.stage(2, got.v2_parts)
    store.versions.commit(2)
    assert not store.wants_compaction()
    store.close()
    again = reopen(model, plan, tmp_path / "state")  # a restart: files, carry, log
    assert again.versions.current == 2 and again.versions.base_version == 1
    pools_as(again, plan, v2)
    pools_as(again, plan, v1, version=1)
    behind = PartStore(model, read_manifest(model), plan.shard(0), state_dir=tmp_path / "behind")
    history = again.versions.history(0)
    assert [v for v, _ in history] == [1, 2]  # the snapshot holds the carried rows
    assert behind.versions.catch_up(history) == 2
    pools_as(behind, plan, v2)
    pools_as(behind, plan, v1, version=1)
    again.close()
    behind.close()


@pytest.mark.parametrize("fails", ["base", "log"])
def test_a_compaction_cut_short_loses_nothing(cached_model, tmp_path, monkeypatch, fails) -> None:  # noqa: F811
    """A compaction that stops before ``base.json`` names its version (the carried rows
    are then in the log twice), or before the log is shortened (base.json names it, the
    log still holds every record), comes back with every version."""
    model, _, plan = cached_model
    got = partial(model, plan, tmp_path / "state", 41)
    store, (_, v1, v2) = got.store, got.tables

    def broken(*args, **kwargs) -> None:
        raise OSError("no space left on device")

    if fails == "base":
        monkeypatch.setattr(compaction, "write_base", broken)
        with pytest.raises(OSError):
            store.compact()
    else:
        monkeypatch.setattr(UpdateLog, "reset", broken)
        assert store.compact() == 1
    store.versions.stage(2, got.v2_parts)  # appended after the carry record
    store.versions.commit(2)
    pools_as(store, plan, v2)
    store.close()
    monkeypatch.undo()
    again = reopen(model, plan, tmp_path / "state")
    assert again.versions.current == 2
    assert again.versions.base_version == (0 if fails == "base" else 1)
    pools_as(again, plan, v2)
    pools_as(again, plan, v1, version=1)
    before = again.versions.describe()["log_bytes"]
    again.compact()  # a later compaction completes and shortens the log
    assert again.versions.base_version == 2 and again.versions.describe()["log_bytes"] < before
    pools_as(again, plan, v2)
    again.close()
