"""A shard larger than its memory: the row cache against a resident shard and a lazily
mapped one, under a real cgroup v1 memory limit, at one open-loop rate.

A ``drm1`` model of ``--size`` on one shard behind a gateway. Three runs at the same rate of
loadgen's Zipf traffic (fresh bodies: no request repeats), each after ``--warmup`` seconds of
the same traffic (another seed) and with the page cache dropped before the shard starts:

- (a) resident: ``--preload``, no memory limit;
- (b) mmap: the tables mapped lazily, the shard's cgroup limited to ``--limit`` (anonymous
  memory plus the page cache it causes);
- (c) cache: ``--cache-bytes`` under the same limit.

Printed: hit rate, disk reads per second and MB/s (the block device's counters over the
measured window), P50/P99, samples/s, errors and peak memory (the cgroup's), and the ratios
the targets are set on; with ``--rounds N`` the runs alternate N times and each ratio is
the median of the rounds' ratios (the host is noisy). Then the hit rate against cache size,
replayed through the same compiled cache (``kernels.rowcache``, the shard's budget split) on
the same traffic without disk reads, beside the Zipf model's upper bound; ``--plot`` draws
it. Needs root and /sys/fs/cgroup/memory.

    sudo python -m benchmarks.bench_cache [--size 4GiB] [--limit 1GiB] [--cache 768MiB]
        [--rate 10] [--warmup 40] [--duration 30] [--rounds 1] [--workdir DIR]
        [--plot curve.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import print_table, run_cli, shard_stats
from kernels import rowcache as rc
from recserve.contracts.manifest import read_manifest
from recserve.contracts.plan import read_plan
from recserve.contracts.units import format_size, parse_size
from recserve.local import memcg
from recserve.local.argv import gateway_argv, loadgen_argv, shardd_argv
from recserve.local.cluster import free_port
from recserve.model.workload import TableTraffic
from recserve.planning.hits import DEFAULT_ZIPF, SLOT_BYTES, CachedPart, expected_hit_rate
from recserve.rpc.probe import ready
from shardd.cache import split_budget


def block_stat(path: Path) -> tuple[int, int]:
    """(reads completed, bytes read) of the block device holding ``path``."""
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    fields = stat.read_text().split()
    return int(fields[0]), int(fields[2]) * 512


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the gateway was not ready in time")


def loadgen(url: str, model: Path, rate: float, duration: float, seed: int, out: Path) -> dict:
    bodies = int(rate * duration * 1.3) + 16
    argv = loadgen_argv(url, "--model", str(model), "--qps", str(rate))
    argv += ["--duration", str(duration), "--seed", str(seed), "--bodies", str(bodies)]
    argv += ["--format", "columns", "--quiet", "--report", str(out)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    run: dict = json.loads(out.read_text())["runs"][0]
    return run


def one_run(name: str, args: argparse.Namespace, model: Path, plan: Path, shard_args: list[str],
            limit: int | None) -> dict[str, Any]:  # fmt: skip
    work = args.workdir
    endpoint = read_plan(plan).shard(0).endpoints[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    memcg.drop_caches()
    with memcg.memory_group(limit, "recserve-bench") as group:
        log = open(work / f"{name}-shard.log", "wb")  # noqa: SIM115 - closed below
        shard = group.popen(shardd_argv(plan, model, 0, *shard_args), stdout=log, stderr=log)
        gateway = None
        try:
            end = time.monotonic() + 600
            while not ready(endpoint):
                if shard.poll() is not None or time.monotonic() > end:
                    raise SystemExit(f"{name}: the shard did not start (see {log.name})")
            glog = open(work / f"{name}-gateway.log", "wb")  # noqa: SIM115
            gateway = subprocess.Popen(
                gateway_argv(model, plan=plan, port=port), stdout=glog, stderr=glog
            )
            wait_http(url, gateway)
            loadgen(url, model, args.rate, args.warmup, 1, work / f"{name}-warm.json")
            before_disk, before = block_stat(model), shard_stats(endpoint).get("cache")
            t0 = time.monotonic()
            run = loadgen(url, model, args.rate, args.duration, 2, work / f"{name}.json")
            seconds = time.monotonic() - t0
            after_disk, after = block_stat(model), shard_stats(endpoint).get("cache")
            alive = shard.poll() is None
        finally:
            for proc in (gateway, shard):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            log.close()
        hit = None
        if before is not None and after is not None:
            hits = after["hits"] - before["hits"]
            asked = (
                hits + after["misses"] - before["misses"] + after["bypassed"] - before["bypassed"]
            )
            hit = hits / asked if asked else None
        return {
            "name": name,
            "hit_rate": hit,
            "reads_per_s": (after_disk[0] - before_disk[0]) / seconds,
            "read_mb_per_s": (after_disk[1] - before_disk[1]) / seconds / 1e6,
            "p50": run["latency_ms"]["p50"],
            "p99": run["latency_ms"]["p99"],
            "samples_per_s": run["samples_per_s"],
            "errors": sum(run["errors"].values()),
            "peak_mib": group.max_usage >> 20,
            "ooms": group.oom_kills,
            "alive": alive,
        }


def summary(run: dict[str, Any]) -> str:
    return (f"{run['name']} P50 {run['p50']:.1f} ms, P99 {run['p99']:.1f} ms, "
            f"{run['errors']} errors")  # fmt: skip


def per_round(ratios: list[float]) -> str:
    """The median of per-round ratios, and each round's."""
    each = ", ".join(f"{r:.2f}" for r in ratios)
    return f"{float(np.median(ratios)):.2f}x" + (f" (rounds: {each})" if len(ratios) > 1 else "")


def per_k(run: dict[str, Any]) -> str:
    if not run["samples_per_s"]:
        return "-"
    return f"{run['reads_per_s'] / run['samples_per_s'] * 1e3:.0f}"


def curve(model: Path, sizes: list[int], requests: int, samples: int) -> list[tuple]:
    """Hit rate against cache size: the shard's split (parts held whole are all hits) and
    compiled cache, replayed."""
    manifest = read_manifest(model)
    specs = list(manifest.tables)
    traffic = [(t, f, TableTraffic.of(t)) for t in specs for f in t.features]
    rng = np.random.default_rng(3)
    stream = []  # per request: ids per table
    for _ in range(requests):
        per_table: dict[str, list[np.ndarray]] = {}
        for t, _, tt in traffic:
            ids, _ = tt.bags(rng, samples)
            per_table.setdefault(t.name, []).append(ids)
        stream.append({k: np.concatenate(v) for k, v in per_table.items()})
    out = []
    for size in sizes:
        whole, slots = split_budget([(t, 0, t.rows) for t in specs], size)
        states = {t.name: rc.new_state(0 if w else n)
                  for t, w, n in zip(specs, whole, slots, strict=True)}  # fmt: skip
        resident = {t.name for t, w in zip(specs, whole, strict=True) if w}
        hits = total = 0
        for k, req in enumerate(stream):
            for name, ids in req.items():
                st = states[name]
                n = ids.size
                if name in resident:  # read whole at start: every id a hit
                    if k >= requests // 2:
                        hits += n
                        total += n
                    continue
                reads = np.unique(ids).size  # no slots: every distinct row read around it
                if st.slot_id.size:
                    counts = np.zeros(4, np.int64)
                    pinned = np.empty(n, np.int32)
                    status = rc.resolve(
                        ids, 0, n, 0, 1 << 62, np.empty(n, np.int64), k + 1, st.keys, st.vals,
                        st.slot_id, st.ref, st.seg, st.pins, st.stamp, st.window, st.free,
                        st.sketch, st.meta, np.empty(n, np.int64), np.empty(n, np.int32),
                        pinned, counts,
                    )  # fmt: skip
                    rc.unpin(st.pins, pinned, counts[2], st.keys, st.vals, st.slot_id, st.seg,
                             st.free, st.meta)  # fmt: skip
                    reads = int(counts[1]) + (reads if status == rc.OVERFLOW else 0)
                if k >= requests // 2:  # the second half: after warm-up
                    hits += n - reads
                    total += n
        model_rate = expected_hit_rate(
            [
                CachedPart(
                    t.rows,
                    t.stats.zipf if t.stats.zipf is not None else DEFAULT_ZIPF,
                    (t.stats.pooling_factor or 1.0) * len(t.features),
                    t.row_bytes + SLOT_BYTES,
                )
                for t in specs
            ],
            size,
        )
        out.append((size, hits / total, model_rate))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4GiB")
    parser.add_argument("--limit", default="1GiB", help="the shard's cgroup memory limit")
    parser.add_argument("--cache", default="768MiB", help="--cache-bytes of run (c)")
    parser.add_argument("--rate", type=float, default=10.0, help="requests/s of 16 samples")
    parser.add_argument("--warmup", type=float, default=40.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/recserve-bench-cache"))
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of the runs")
    parser.add_argument("--curve-requests", type=int, default=800, help="0: no curve")
    parser.add_argument("--plot", type=Path)
    parser.add_argument(
        "--only", choices=("resident", "mmap", "cache"), action="append", help="run only these"
    )
    args = parser.parse_args(argv)
    why = memcg.available()
    if why is not None:
        print(f"bench_cache: {why}", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, plan = args.workdir / f"drm1-{args.size}", args.workdir / "plan.json"
    if not (model / "manifest.json").exists():
        run_cli(["synth", "--profile", "drm1", "--size", args.size, "--seed", "1",
                 "--out", str(model)])  # fmt: skip
    run_cli(["plan", "--model", str(model), "--shards", "1", "--base-port", str(free_port()),
             "--out", str(plan)])  # fmt: skip
    limit, cache = parse_size(args.limit), parse_size(args.cache)
    print(
        f"drm1 {args.size} on one shard; limit {args.limit}, cache {args.cache}; {args.rate:g} "
        f"req/s of 16 samples, warm-up {args.warmup:g} s, {args.duration:g} s measured"
    )
    configs = {
        "resident": (["--preload"], None),
        "mmap": ([], limit),
        "cache": (["--cache-bytes", str(cache)], limit),
    }
    names = [n for n in configs if not args.only or n in args.only]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(args.rounds):  # alternating: each round runs every config once
        for name in names:
            flags, lim = configs[name]
            runs[name].append(one_run(name, args, model, plan, flags, lim))
            print(f"round {r + 1}: {summary(runs[name][-1])}", flush=True)
    rows = [
        [
            f"{r['name']}" + (f" #{k + 1}" if args.rounds > 1 else ""),
            "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}",
            f"{r['reads_per_s']:.0f}",
            per_k(r),
            f"{r['read_mb_per_s']:.1f}",
            f"{r['p50']:.1f}",
            f"{r['p99']:.1f}",
            f"{r['samples_per_s']:.0f}",
            r["errors"],
            r["peak_mib"],
            "yes" if r["alive"] and not r["ooms"] else f"no ({r['ooms']} OOM kills)",
        ]
        for name in names
        for k, r in enumerate(runs[name])
    ]
    print_table(["run", "hit rate", "reads/s", "reads/1k samples", "MB/s", "p50 ms", "p99 ms",
                 "samples/s", "errors", "peak MiB", "survived"], rows)  # fmt: skip
    a, b, c = runs.get("resident"), runs.get("mmap"), runs.get("cache")
    if a and c:
        ratios = [x["p99"] / y["p99"] for x, y in zip(c, a, strict=True)]
        print(f"(c) P99 / (a) P99: {per_round(ratios)} (target <= 1.5x)")
    if b and c:
        if all(x["samples_per_s"] for x in b + c):
            ratios = [
                (x["reads_per_s"] / x["samples_per_s"]) / (y["reads_per_s"] / y["samples_per_s"])
                for x, y in zip(b, c, strict=True)
            ]
            print(f"(b) disk reads per sample / (c): {per_round(ratios)} (target >= 3x)")
        else:
            print("(b) served no request in some round: its reads per sample are unbounded")
    if c and all(x["hit_rate"] is not None for x in c):
        rates = [x["hit_rate"] for x in c]
        print(f"(c) hit rate: {float(np.median(rates)):.3f} (target >= 0.95)")
    sizes = [parse_size(s) for s in ("64MiB", "128MiB", "256MiB", "512MiB", "768MiB", "1GiB",
                                     "2GiB")]  # fmt: skip
    if not args.curve_requests:
        return 0
    points = curve(model, sizes, args.curve_requests, 16)
    print("hit rate against cache size (replayed through the compiled cache; model: Zipf bound)")
    print_table(["cache", "replayed", "model"],
                [[format_size(s), f"{h:.3f}", f"{m:.3f}"] for s, h, m in points])  # fmt: skip
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        mib = [s / 2**20 for s, _, _ in points]
        ax.plot(mib, [h for _, h, _ in points], "o-", label="row cache (replayed)")
        ax.plot(mib, [m for _, _, m in points], "--", label="Zipf model (upper bound)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache MiB")
        ax.set_ylabel("hit rate")
        ax.set_title(f"drm1 {args.size}: hit rate against cache size")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
