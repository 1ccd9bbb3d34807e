"""Distributed (gateway + 4 shards) against singular serving at the same offered load.

A synthetic drm2 model; requests of ``--samples`` flat samples drawn from the model's access
statistics, pre-encoded as JSON; Poisson arrivals at each of ``--rates`` requests/s for
``--duration`` s (the load generator's open loop: latency counts from each request's
intended send time). Each setup runs as a ``recserve up``-style local cluster; CPU seconds
are summed over every server process. At each rate the two setups run one after the other.

Several rates, because on this 2-core VM the light load flatters the single process: at 20
requests/s the cores are mostly idle, and every one of a distributed request's RPCs pays for
waking half a dozen sleeping threads (gateway loop, ZeroMQ IO threads, the shard's loop):
a 2048-bag shard lookup took 0.4-0.7 ms back to back and 1.6-2.2 ms after 50 ms idle.

    python -m benchmarks.bench_gateway [--size 256MiB] [--samples 16] [--rates 20,40]
                                       [--duration 30] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import orjson

from benchmarks.common import print_table, run_cli
from loadgen.runner import Run, open_loop
from recserve.contracts.manifest import read_manifest
from recserve.local.cluster import LocalCluster, free_port
from recserve.model.workload import Workload


def prepare(root: Path, size: str, samples: int) -> tuple[Path, list[bytes]]:
    """A drm2 model under ``root`` and 64 pre-encoded request bodies drawn from it."""
    model = root / "m"
    run_cli(["synth", "--profile", "drm2", "--size", size, "--seed", "1", "--out", str(model)])
    work = Workload(read_manifest(model), seed=5)
    return model, [orjson.dumps({"samples": work.samples(samples)}) for _ in range(64)]


def measure(
    model: Path,
    plan: Path | None,
    bodies: list[bytes],
    rate: float,
    duration: float,
    samples: int,
    workers: int = 1,
    pin_shards: bool = False,
    gateway_args: tuple[str, ...] = (),
    warmup: float = 0.0,
) -> tuple[dict[str, float], list[int]]:
    """Run the cluster of ``plan`` (none: singular) under the open-loop load, after
    ``warmup`` seconds of the same load that count for nothing (a started cluster's first
    requests meet cold caches and first calls in every process of it). Returns the results
    (with CPU s per 1k samples) and RSS per process (gateway first)."""
    with LocalCluster(
        model,
        plan=plan,
        singular=plan is None,
        port=free_port(),
        gateway_args=("--timeout-ms", "5000", "--workers", str(workers), *gateway_args),
        pin_shards=pin_shards,
    ) as cluster:
        if warmup > 0:
            asyncio.run(open_loop(cluster.url, bodies, "application/json", Run(samples),
                                  rate=rate, duration=warmup, seed=2))  # fmt: skip
        before = cluster.cpu_seconds()
        run = Run(samples)
        asyncio.run(
            open_loop(
                cluster.url, bodies, "application/json", run, rate=rate, duration=duration, seed=3
            )
        )
        cpu = cluster.cpu_seconds() - before
        rss = cluster.rss_mib()
    return {
        "p50": run.percentile_ms(50),
        "p99": run.percentile_ms(99),
        "achieved": run.ok / run.elapsed,
        "offered": run.sent / duration,
        "errors": float(run.errors),
        "requests": float(run.ok),
        "cpu_per_1k": cpu / max(run.ok * samples / 1000, 1e-9),
    }, rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--strategy", default="load")
    parser.add_argument("--samples", type=int, default=16, help="samples per request")
    parser.add_argument(
        "--rates", default="20,40", help="offered requests per second, comma-separated"
    )
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of the load first, not counted"
    )
    parser.add_argument("--workers", type=int, default=1, help="each gateway's --workers")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, bodies = prepare(root, args.size, args.samples)
        plan = root / "plan.json"
        run_cli(["plan", "--model", str(model), "--shards", str(args.shards),
                 "--strategy", args.strategy, "--out", str(plan)])  # fmt: skip
        rates = [float(x) for x in args.rates.split(",")]
        results: dict[float, dict[str, dict[str, float]]] = {}
        rss: dict[str, list[int]] = {}
        for rate in rates:
            results[rate] = {}
            for mode in ("distributed", "singular"):
                where = plan if mode == "distributed" else None
                results[rate][mode], rss[mode] = measure(
                    model,
                    where,
                    bodies,
                    rate,
                    args.duration,
                    args.samples,
                    args.workers,
                    warmup=args.warmup,
                )
    rows = []
    for rate, by_mode in results.items():
        for mode, r in by_mode.items():
            rows.append(
                [
                    f"{rate:g}",
                    mode,
                    f"{r['achieved']:.1f}",
                    f"{r['p50']:.1f}",
                    f"{r['p99']:.1f}",
                    f"{r['cpu_per_1k']:.3f}",
                    int(r["errors"]),
                ]
            )
        d, s = by_mode["distributed"], by_mode["singular"]
        rows.append(
            [
                "",
                "ratio",
                f"{d['achieved'] / s['achieved']:.2f}x",
                f"{d['p50'] / s['p50']:.2f}x",
                f"{d['p99'] / s['p99']:.2f}x",
                f"{d['cpu_per_1k'] / s['cpu_per_1k']:.2f}x",
                "",
            ]
        )
    print(
        f"\ndrm2 {args.size}, {args.shards} shards ({args.strategy}), {args.samples} samples "
        f"per request, Poisson arrivals for {args.duration:g} s at each rate; RSS MiB: "
        + "; ".join(f"{m} {' + '.join(f'{x:.0f}' for x in v)}" for m, v in rss.items())
    )
    print_table(
        ["req/s", "mode", "achieved/s", "p50 ms", "p99 ms", "CPU s/1k samples", "errors"],
        rows,
    )
    print("\ntarget: distributed P99 <= 1.25x singular where singular P99 < 50 ms")
    for rate, by_mode in results.items():
        d, s = by_mode["distributed"], by_mode["singular"]
        ratio = d["p99"] / s["p99"]
        verdict = (
            "not a qualifying load" if s["p99"] >= 50 else "met" if ratio <= 1.25 else "MISSED"
        )
        print(f"  {rate:g} req/s: {ratio:.2f}x (singular P99 {s['p99']:.1f} ms) {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
