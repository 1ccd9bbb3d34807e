"""``recserve demo`` (``make demo``): the whole system on one box, on an embedded default.

Synthesizes a drm2 model sized for this machine, plans it over 4 shards with ``net``
(printing every strategy side by side), starts the shard daemons and the gateway, drives
open-loop ranking traffic at them with the load generator, then the same load at a
``--singular`` gateway, and prints one table: P50/P99, achieved rate, CPU seconds per 1k
samples over all server processes, resident memory per process, shards contacted per
request. Everything is torn down; the reports stay in the work directory.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from recserve.contracts.errors import ArtifactError
from recserve.contracts.manifest import read_manifest
from recserve.contracts.plan import local_endpoints
from recserve.contracts.units import format_size
from recserve.local.argv import loadgen_argv
from recserve.local.cluster import LocalCluster, free_port
from recserve.model.synth import synthesize
from recserve.planning import STRATEGIES, Traffic, build, compare_table

PROFILE, SEED, SHARDS, STRATEGY = "drm2", 7, 4, "net"
CANDIDATES, QPS = 32, 20.0


def _ensure_model(path: Path, size: int, profile: str) -> None:
    try:
        m = read_manifest(path)
        if (
            m.name == profile
            and m.version == f"synth-{SEED}"
            and abs(m.table_bytes - size) <= 0.01 * size
        ):
            print(f"   reusing {path}")
            return
    except ArtifactError:
        pass
    synthesize(profile, size, path, seed=SEED, overwrite=True)


def _load(cluster: LocalCluster, report: Path, duration: float) -> dict[str, Any]:
    before = cluster.cpu_seconds()
    subprocess.run(
        loadgen_argv(
            cluster.url,
            "--qps",
            str(QPS),
            "--duration",
            str(duration),
            "--candidates",
            str(CANDIDATES),
            "--report",
            str(report),
            "--plot",
            str(report.with_suffix(".png")),
            "--quiet",
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    cpu = cluster.cpu_seconds() - before
    run = json.loads(report.read_text())["runs"][0]
    samples = run["ok"] * CANDIDATES
    return {
        **run,
        "cpu_per_1k": cpu / max(samples / 1000, 1e-9),
        "rss": cluster.rss_mib(),
    }


def run_demo(workdir: Path, size: int, duration: float, *, profile: str = PROFILE) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / ("model" if profile == PROFILE else f"model-{profile}")
    print(f"== synthesize {profile} ({format_size(size)}) -> {model}")
    _ensure_model(model, size, profile)
    manifest = read_manifest(model)
    print(f"== plan {SHARDS} shards ({CANDIDATES} candidates per request, user features once)")
    traffic = Traffic(CANDIDATES, frozenset({"user"}))
    plans = {
        s: build(manifest, SHARDS, s, local_endpoints(SHARDS, 1), traffic=traffic)
        for s in STRATEGIES
    }
    for line in compare_table(plans):
        print(f"   {line}")
    plan = workdir / "plan.json"
    plan.write_bytes(plans[STRATEGY].to_json())
    results = {}
    for label, singular in (("distributed", False), ("singular", True)):
        print(f"== {label}: start, then {QPS:g} ranking requests/s for {duration:g} s")
        with LocalCluster(
            model, plan=None if singular else plan, singular=singular, port=free_port()
        ) as cluster:
            results[label] = _load(cluster, workdir / f"loadgen-{label}.json", duration)
    contacted = plans[STRATEGY].report["shards_contacted"]
    print(
        f"\n{profile} {format_size(manifest.table_bytes)}, {SHARDS} shards ({STRATEGY}), "
        f"open-loop {QPS:g} requests/s x {CANDIDATES} candidates"
    )
    head = f"   {'':<12}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'CPU s/1k':>10}  RSS MiB"
    print(head)
    for label, r in results.items():
        lat = r["latency_ms"]
        print(
            f"   {label:<12}{lat['p50']:>9.1f}{lat['p99']:>9.1f}{r['achieved_qps']:>8.1f}"
            f"{r['cpu_per_1k']:>10.3f}  {' + '.join(str(x) for x in r['rss'])}"
        )
    d, s = results["distributed"], results["singular"]
    print(
        f"   {'ratio':<12}{d['latency_ms']['p50'] / s['latency_ms']['p50']:>8.2f}x"
        f"{d['latency_ms']['p99'] / s['latency_ms']['p99']:>8.2f}x"
        f"{d['achieved_qps'] / s['achieved_qps']:>7.2f}x"
        f"{d['cpu_per_1k'] / s['cpu_per_1k']:>9.2f}x"
    )
    print(f"   shards contacted per request: {contacted} of {SHARDS}")
    summary = {
        "model": manifest.name,
        "bytes": manifest.table_bytes,
        "shards": SHARDS,
        "strategy": STRATEGY,
        "qps": QPS,
        "candidates": CANDIDATES,
        "results": results,
    }
    (workdir / "demo-report.json").write_text(json.dumps(summary, indent=2))
    print(f"== done: reports in {workdir}")
    return 0
