"""Benchmarks must keep running: each runs once on tiny inputs (no timing is asserted)."""

from __future__ import annotations

import pytest

from benchmarks import bench_pooling, bench_shardd


def test_bench_pooling_small(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_pooling.main(["--small", "--reps", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "vs torch" in out and "int8 vs fp32" in out and "ceilings on the memmap" in out
    assert "vs the row ceiling" in out
    rows = [line.split() for line in out.splitlines()]
    shapes = [r for r in rows if len(r) == 14 and r[1] in ("RAM", "mmap")]
    # --small: one batch size and pooling, fixed/variable lengths x uniform/Zipf ids, 2 tables
    assert len(shapes) == 8 and all(r[10].endswith("x") for r in shapes)
    # the row ceiling is measured on the memmap shapes only
    assert all((r[-1] == "-") == (r[1] == "RAM") for r in shapes)


def test_bench_shardd_small(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_shardd.main(["--small", "--requests", "4", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for path in ("tcp", "ipc", "bare kernel"):
        assert f"{path} " in out
    assert "target: over the wire" in out


def test_bench_e2e_small(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_e2e

    args = ["--size", "4MiB", "--shards", "2", "--rate", "10", "--duration", "1",
            "--warmup", "0.5"]  # fmt: skip
    assert bench_e2e.main(args) == 0
    out = capsys.readouterr().out
    for mode in ("capacity", "load", "net", "singular"):
        assert f"{mode} " in out
    assert "after 0.5 s not counted" in out


@pytest.mark.slow
def test_bench_dlrmv2_small(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_dlrmv2

    args = ["--size", "72MiB", "--batch", "32", "--duration", "1", "--rounds", "1"]
    assert bench_dlrmv2.main([*args, "--shards", "2", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("CrossNet (ours)", "torch in-process", "singular", "sharded", "target:"):
        assert row in out


@pytest.mark.slow
def test_bench_e2e_throughput_small(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_e2e_throughput

    args = ["--rows", "26000", "--batch", "32", "--duration", "0.5", "--shards", "2",
            "--workers", "2", "--socket", "--pin-workers", "--rounds", "2"]  # fmt: skip
    assert bench_e2e_throughput.main(args) == 0
    out = capsys.readouterr().out
    for row in ("KServe binary", "INT64 ids", "recserve.client", "msgpack samples",
                "against KServe binary", "loop+rest", "2 shards, socket, 2 workers",
                "shared memory", "medians of 2 rounds", "(target <= 1.15x)",
                "2 shards, socket, pinned workers, 2 workers",
                "2 workers, pinned workers, KServe binary: singular",
                "x the samples/s unpinned", "the shards, CPU ms per 1k samples"):  # fmt: skip
        assert row in out


def test_bench_rpc_floor_small(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_rpc_floor

    args = ["--size", "4MiB", "--shards", "2", "--rate", "20", "--duration", "0.5",
            "--warmup", "0.2", "--rounds", "2", "--workers", "1"]  # fmt: skip
    assert bench_rpc_floor.main(args) == 0
    out = capsys.readouterr().out
    for row in ("ticks ", "pings ", "net ", "empty round trips under the load",
                "floor under the distributed/singular CPU ratio",
                "net plan against singular", "against singular plus the round trips"):  # fmt: skip
        assert row in out
    assert "net plan over 2 shards" in out and "shards pinged a wake; 2 rounds" in out
