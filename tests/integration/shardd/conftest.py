"""Fixtures shared by the shardd integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from recserve.cli import main as cli
from recserve.contracts.plan import Plan, read_plan
from tests.integration.shards import (
    free_port,
    start_shard,
    stop,
    wait_healthy,
)


@pytest.fixture(scope="package")
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


@pytest.fixture(scope="package")
def shards(model_and_plan, tmp_path_factory):
    model, plan_path, _ = model_and_plan
    run_dir = tmp_path_factory.mktemp("run")
    endpoints = [f"ipc://{run_dir}/s0.sock", f"tcp://127.0.0.1:{free_port()}"]
    # Shard 1 serves copies in huge-page memory, shard 0 the memory-mapped files: every
    # test on both shards covers both.
    extra = [(), ("--hugepages", "--inline-ids", "16384")]
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
