"""``recserve demo``: the biggest end-to-end path that exists, on an embedded default.

Synthesizes a drm2 model, quantizes it to int8 (printing the error that introduces), plans
it over 4 shards with every strategy (printing the comparison), and scores sampled traffic
in-process with both models, printing throughput. It will grow into the local-cluster demo
(shards + gateway + loadgen) as those land.
"""

from __future__ import annotations

import time
from pathlib import Path

from recserve.artifact import read_manifest
from recserve.errors import ArtifactError
from recserve.model import Model
from recserve.plan import local_endpoints
from recserve.planner import STRATEGIES, Traffic, build, compare_table
from recserve.quantize import quantize_model
from recserve.synth import synthesize
from recserve.units import format_size
from recserve.workload import Workload

PROFILE = "drm2"
SEED = 7
BATCH = 512
SHARDS = 4


def _ensure_model(path: Path, size: int) -> None:
    """Reuse a model from an earlier demo run if it matches, else synthesize it."""
    try:
        m = read_manifest(path)
        if (
            m.name == PROFILE
            and m.version == f"synth-{SEED}"
            and abs(m.table_bytes - size) <= 0.01 * size
        ):
            print(f"reusing {path}")
            return
    except ArtifactError:
        pass
    synthesize(PROFILE, size, path, seed=SEED, overwrite=True)


def _throughput(model: Model, samples: int) -> tuple[float, float]:
    work = Workload(model.manifest, seed=1)
    batches = [work.batch(BATCH) for _ in range(max(1, samples // BATCH))]
    model.score(batches[0])  # warm the page cache and BLAS
    start = time.perf_counter()
    total = 0.0
    for batch in batches:
        total += float(model.score(batch).sum())
    elapsed = time.perf_counter() - start
    return len(batches) * BATCH / elapsed, total / (len(batches) * BATCH)


def run_demo(workdir: Path, size: int, samples: int) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    fp32, int8 = workdir / "model-fp32", workdir / "model-int8"
    print(f"== synthesize {PROFILE} ({format_size(size)}) -> {fp32}")
    _ensure_model(fp32, size)
    print(f"== quantize to int8 row-wise -> {int8}")
    _, report = quantize_model(fp32, "int8", int8, overwrite=True)
    for line in report.lines():
        print(f"   {line}")
    print(f"== plan {SHARDS} shards (user features once per request, {BATCH} candidates)")
    manifest = read_manifest(fp32)
    traffic = Traffic(BATCH, frozenset({"user"}))
    plans = {
        s: build(manifest, SHARDS, s, local_endpoints(SHARDS, 1), traffic=traffic)
        for s in STRATEGIES
    }
    for line in compare_table(plans):
        print(f"   {line}")
    (workdir / "plan.json").write_bytes(plans["net"].to_json())
    print(f"   wrote {workdir / 'plan.json'} (net)")
    print(f"== score {samples} sampled requests in-process, batches of {BATCH}")
    print(f"   {'model':<8} {'tables':>10} {'samples/s':>10} {'mean score':>11}")
    for name, path in (("fp32", fp32), ("int8", int8)):
        model = Model.open(path)
        rate, mean = _throughput(model, samples)
        print(
            f"   {name:<8} {format_size(model.manifest.table_bytes):>10} {rate:>10.0f} "
            f"{mean:>11.4f}"
        )
    print(
        "== done; distributed serving (shards + gateway) lands with the shardd and gateway issues"
    )
    return 0
