"""Sharding plans: properties over random models, plus the file format and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.cli import main
from recserve.contracts.errors import PlanError
from recserve.contracts.manifest import (
    AccessStats,
    Manifest,
    TableSpec,
)
from recserve.contracts.plan import Plan, local_endpoints, parse_plan, read_hosts
from recserve.planning import STRATEGIES, build
from tests.models import manifest_of


def model(tables: list[tuple[int, str, str, float]], dim: int = 8) -> Manifest:
    specs = tuple(
        TableSpec(
            f"t{i}",
            rows,
            dim,
            dtype=dtype,
            features=(f"f{i}",),
            net=net,
            stats=AccessStats(pooling_factor=pf),
        )
        for i, (rows, dtype, net, pf) in enumerate(tables)
    )
    return manifest_of(specs, 4)


models = st.lists(
    st.tuples(
        st.integers(1, 5000),
        st.sampled_from(["fp32", "fp16", "int8"]),
        st.sampled_from(["user", "item", "ctx"]),
        st.floats(0.0, 100.0),
    ),
    min_size=1,
    max_size=12,
).map(model)


def shard_bytes(plan: Plan, m: Manifest) -> list[int]:
    rb = {t.name: t.row_bytes for t in m.tables}
    return [sum(p.rows * rb[p.table] for p in s.parts) for s in plan.shards]


def fan_out(plan: Plan, m: Manifest, net: str) -> int:
    nets = {t.name: t.net for t in m.tables}
    return sum(1 for s in plan.shards if any(nets[p.table] == net for p in s.parts))


@settings(max_examples=120, deadline=None)
@given(
    m=models,
    n=st.integers(1, 6),
    replicas=st.integers(1, 3),
    strategy=st.sampled_from([*STRATEGIES, "auto"]),
    slack=st.none() | st.floats(1.0, 2.0),
)
def test_plan_properties(
    m: Manifest, n: int, replicas: int, strategy: str, slack: float | None
) -> None:
    widest = max(t.row_bytes for t in m.tables)
    memory = None if slack is None else m.table_bytes / n * slack + widest
    endpoints = local_endpoints(n, replicas)
    plan = build(m, n, strategy, endpoints, shard_memory=memory)
    plan.check(m)  # every row of every table exactly once
    assert len(plan.shards) == n
    assert all(len(s.endpoints) == replicas for s in plan.shards)
    flat = [e for s in plan.shards for e in s.endpoints]
    assert len(set(flat)) == len(flat)
    if memory is not None:
        assert max(shard_bytes(plan, m)) <= memory
    again = build(m, n, strategy, endpoints, shard_memory=memory)
    assert again.to_json() == plan.to_json()  # deterministic
    assert parse_plan(plan.to_json()) == plan


@settings(max_examples=120, deadline=None)
@given(m=models, n=st.integers(1, 6), slack=st.none() | st.floats(1.0, 2.0))
def test_net_never_fans_out_more_than_capacity(m: Manifest, n: int, slack: float | None) -> None:
    widest = max(t.row_bytes for t in m.tables)
    memory = None if slack is None else m.table_bytes / n * slack + widest
    endpoints = local_endpoints(n, 1)
    net = build(m, n, "net", endpoints, shard_memory=memory)
    capacity = build(m, n, "capacity", endpoints, shard_memory=memory)
    for name in {t.net for t in m.tables}:
        assert fan_out(net, m, name) <= fan_out(capacity, m, name), name


def test_dominant_table_is_split_by_rows() -> None:
    m = model([(100_000, "fp32", "user", 5.0)] + [(1000, "fp32", "item", 2.0)] * 5)
    plan = build(m, 4, "capacity", local_endpoints(4, 1))
    parts = [p for _, p in plan.parts_of("t0")]
    assert len(parts) >= 3 and plan.report["bytes_imbalance"] < 1.1
    assert "t0" in plan.report["split_tables"]


def test_load_balances_work_not_bytes() -> None:
    # Capacity puts both hot tables beside the smaller cold one; load splits them up.
    m = model([(50_000, "fp32", "user", 0.5), (49_000, "fp32", "user", 0.5),
               (500, "fp32", "item", 80.0), (400, "fp32", "item", 80.0)])  # fmt: skip
    ends = local_endpoints(2, 1)
    cap, load = build(m, 2, "capacity", ends), build(m, 2, "load", ends)
    assert cap.report["bytes_imbalance"] <= load.report["bytes_imbalance"]
    assert load.report["load_imbalance"] < cap.report["load_imbalance"]
    assert load.report["load_imbalance"] < 1.05


def test_plan_that_cannot_fit_says_what_is_missing() -> None:
    m = model([(1000, "fp32", "user", 1.0)] * 4)  # 4 x 32000 bytes
    with pytest.raises(PlanError, match=r"28000 bytes missing.*--shards 6 or --shard-memory 32000"):
        build(m, 4, "capacity", local_endpoints(4, 1), shard_memory=25_000)


def test_cached_shards_may_hold_more_than_their_memory() -> None:
    """With --cache-bytes the parts live on disk: a plan whose shards hold more than
    --shard-memory is made, and reports each shard's expected hit rate, which grows with the
    cache and reaches 1 when the shard's rows fit."""
    m = model([(1000, "fp32", "user", 1.0)] * 4)  # 4 x 32000 bytes
    ends = local_endpoints(2, 1)
    rates = []
    for cache in (2_000, 8_000, 300_000):  # the last holds all 2 x 1000 rows + bookkeeping
        plan = build(m, 2, "capacity", ends, shard_memory=max(25_000, cache), cache_bytes=cache)
        assert max(plan.report["shard_bytes"]) > 25_000
        rates.append(plan.report["expected_hit_rate"])
    assert all(0 < a < b for a, b in zip(rates[0], rates[1], strict=True))
    assert rates[2] == [1.0, 1.0]
    with pytest.raises(PlanError, match="more than --shard-memory"):
        build(m, 2, "capacity", ends, shard_memory=25_000, cache_bytes=30_000)


def test_plan_for_another_model_is_refused() -> None:
    m = model([(100, "fp32", "user", 1.0)])
    other = model([(101, "fp32", "user", 1.0)])
    plan = build(m, 1, "capacity", local_endpoints(1, 1))
    with pytest.raises(PlanError, match="run `recserve plan` again"):
        plan.check(other)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["shards"][0]["parts"][0].update(row_end=50), "parts cover 50 of 100 rows"),
        (
            lambda d: d["shards"][0]["parts"].append(
                {"table": "t0", "row_start": 0, "row_end": 10}
            ),
            "not covered exactly once",
        ),
        (lambda d: d["shards"][0]["parts"][0].update(table="zz"), "unknown table"),
    ],
)
def test_damaged_plan_is_refused(mutate, message: str) -> None:
    m = model([(100, "fp32", "user", 1.0)])
    doc = json.loads(build(m, 1, "capacity", local_endpoints(1, 1)).to_json())
    mutate(doc)
    with pytest.raises(PlanError, match=message):
        parse_plan(json.dumps(doc).encode()).check(m)


def test_plan_file_rejects_unknown_keys_and_bad_endpoints() -> None:
    m = model([(100, "fp32", "user", 1.0)])
    doc = json.loads(build(m, 1, "capacity", local_endpoints(1, 1)).to_json())
    doc["shards"][0]["colour"] = 1
    with pytest.raises(PlanError, match="colour: unknown key"):
        parse_plan(json.dumps(doc).encode())
    del doc["shards"][0]["colour"]
    doc["shards"][0]["endpoints"] = ["http://x"]
    with pytest.raises(PlanError, match="endpoints"):
        parse_plan(json.dumps(doc).encode())


def test_hosts_file(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(
        '[[shards]]\nendpoints = ["tcp://10.0.0.1:5600", "tcp://10.0.0.2:5600"]\n'
        '[[shards]]\nendpoints = ["tcp://10.0.0.3:5600", "tcp://10.0.0.4:5600"]\n'
    )
    assert read_hosts(hosts, 2, 2)[1] == ("tcp://10.0.0.3:5600", "tcp://10.0.0.4:5600")
    with pytest.raises(PlanError, match="lists 2 shards, the plan has 3"):
        read_hosts(hosts, 3, 2)
    with pytest.raises(PlanError, match="needs 1 endpoints"):
        read_hosts(hosts, 2, 1)


def test_cli_plan_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--profile", "drm3", "--size", "2MiB", "--out", str(tmp_path / "m")]) == 0
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"tables": {"user_000": {"pooling_factor": 50.0}}}))
    assert (
        main(
            [
                "plan",
                "--model",
                str(tmp_path / "m"),
                "--shards",
                "3",
                "--compare",
                "--access-stats",
                str(stats),
                "--out",
                str(tmp_path / "plan.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "shards contacted (user only)" in out and "auto chose" in out
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["report"]["chosen_because"].startswith("lowest request cost")
    assert (
        main(
            [
                "plan",
                "--model",
                str(tmp_path / "m"),
                "--shards",
                "2",
                "--shard-memory",
                "100KiB",
                "--out",
                str(tmp_path / "p.json"),
            ]
        )
        == 2
    )
    assert "bytes missing" in capsys.readouterr().err
