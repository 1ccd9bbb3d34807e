"""Lui et al.'s experiment on one box: every sharding strategy and singular serving at the
same offered load.

For each strategy (capacity, load, net) a plan over ``--shards`` shards, the shard daemons and
a gateway, then a singular gateway; each under the same open-loop Poisson load of flat
requests. Printed: P50/P99, CPU seconds per 1k samples summed over all server processes,
RSS per process, shards contacted per request, each with its ratio to singular.

With ``--pin-shards`` each strategy also runs with every shard daemon on one CPU of its
own, round robin (``recserve up --pin-shards``).

    python -m benchmarks.bench_e2e [--size 256MiB] [--rate 20] [--duration 20] [--pin-shards]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.bench_gateway import measure, prepare
from benchmarks.common import print_table, run_cli
from recserve.contracts.plan import read_plan
from recserve.planning import STRATEGIES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--pin-shards", action="store_true", help="also run shards pinned")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, bodies = prepare(root, args.size, args.samples)
        results = {}
        for strategy in STRATEGIES:
            plan = root / f"{strategy}.json"
            run_cli(["plan", "--model", str(model), "--shards", str(args.shards),
                     "--strategy", strategy, "--out", str(plan)])  # fmt: skip
            contacted = read_plan(plan).report["shards_contacted"]
            r, rss = measure(model, plan, bodies, args.rate, args.duration, args.samples)
            results[strategy] = (r, rss, contacted)
            if args.pin_shards:
                r, rss = measure(model, plan, bodies, args.rate, args.duration, args.samples,
                                 pin_shards=True)  # fmt: skip
                results[f"{strategy}, pinned"] = (r, rss, contacted)
        r, rss = measure(model, None, bodies, args.rate, args.duration, args.samples)
        results["singular"] = (r, rss, 0)
    base = results["singular"][0]
    rows = []
    for name, (r, rss, contacted) in results.items():
        rows.append(
            [
                name,
                f"{r['p50']:.1f}",
                f"{r['p50'] / base['p50']:.2f}x",
                f"{r['p99']:.1f}",
                f"{r['p99'] / base['p99']:.2f}x",
                f"{r['cpu_per_1k']:.3f}",
                f"{r['cpu_per_1k'] / base['cpu_per_1k']:.2f}x",
                " + ".join(f"{x:.0f}" for x in rss),
                contacted or "-",
                int(r["errors"]),
            ]
        )
    print(
        f"\ndrm2 {args.size}, {args.shards} shards, {args.samples} samples per request, "
        f"Poisson {args.rate:g} req/s for {args.duration:g} s each"
    )
    print_table(
        [
            "mode",
            "p50 ms",
            "vs singular",
            "p99 ms",
            "vs singular",
            "CPU s/1k",
            "vs singular",
            "RSS MiB (gateway + shards)",
            "fan-out",
            "errors",
        ],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
