"""Lui et al.'s experiment on one box: every sharding strategy and singular serving at the
same offered load.

For each strategy (capacity, load, net) a plan over ``--shards`` shards, the shard daemons and
a gateway, then a singular gateway; each under the same open-loop Poisson load of flat
requests. Printed: P50/P99, CPU seconds per 1k samples summed over all server processes,
RSS per process, shards contacted per request, each with its ratio to singular.

With ``--pin-shards`` each strategy also runs with every shard daemon on one CPU of its
own, round robin (``recserve up --pin-shards``). ``--strategies`` picks the strategies.
``--pin-workers`` pins every setup's gateway workers, singular's too (``gateway
--pin-workers``; with ``--workers 1`` it changes nothing).

Each setup first serves ``--warmup`` seconds of the same load that count for nothing: the
figures are a started cluster's steady state, not its first requests (cold caches and first
calls in every process, more of them in a sharded cluster; rows of ``benchmarks/RESULTS.md``
before session l counted them).

A shared host's speed drifts over minutes, and one P99 of a few thousand requests moves
with it. ``--rounds N`` runs every setup once a round, singular among them, each round in
a rotated order; the figures are medians over the rounds and each ratio the median of the
rounds' own ratios (a setup against the singular run of its round), with the per-round
P99 ratios printed too.

    python -m benchmarks.bench_e2e [--size 256MiB] [--rate 20] [--duration 20] [--warmup 2]
        [--pin-shards] [--rounds 1] [--strategies capacity,load,net] [--workers 1]
        [--pin-workers]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.bench_gateway import measure, prepare
from benchmarks.common import median_ratio, print_table, rotated, run_cli
from recserve.contracts.plan import read_plan
from recserve.planning import STRATEGIES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of the load first, not counted"
    )
    parser.add_argument("--pin-shards", action="store_true", help="also run shards pinned")
    parser.add_argument("--rounds", type=int, default=1, help="every setup once a round")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    parser.add_argument("--workers", type=int, default=1, help="gateway --workers")
    parser.add_argument(
        "--pin-workers", action="store_true", help="gateway --pin-workers, in every setup"
    )
    args = parser.parse_args(argv)
    strategies = args.strategies.split(",")
    if args.rounds < 1 or args.workers < 1:
        parser.error("--rounds and --workers must be >= 1")
    if not set(strategies) <= set(STRATEGIES):
        parser.error(f"--strategies must be among {', '.join(STRATEGIES)}")
    runs: dict[str, list[tuple[dict[str, float], list[int]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, bodies = prepare(root, args.size, args.samples)
        setups: list[tuple[str, Path | None, bool]] = []
        contacted: dict[str, object] = {"singular": 0}
        for strategy in strategies:
            plan = root / f"{strategy}.json"
            run_cli(["plan", "--model", str(model), "--shards", str(args.shards),
                     "--strategy", strategy, "--out", str(plan)])  # fmt: skip
            contacted[strategy] = read_plan(plan).report["shards_contacted"]
            setups.append((strategy, plan, False))
            if args.pin_shards:
                contacted[f"{strategy}, pinned"] = contacted[strategy]
                setups.append((f"{strategy}, pinned", plan, True))
        setups.append(("singular", None, False))
        for k in range(args.rounds):
            for name, path, pin in rotated(setups, k):
                result = measure(model, path, bodies, args.rate, args.duration, args.samples,
                                 args.workers, pin,
                                 ("--pin-workers",) if args.pin_workers else (),
                                 warmup=args.warmup)  # fmt: skip
                runs.setdefault(name, []).append(result)
    base = runs["singular"]

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r, _ in runs[name])

    def ratio(name: str, key: str) -> float:
        return median_ratio([r[key] for r, _ in runs[name]], [b[key] for b, _ in base])

    rows = []
    for name, _, _ in setups:
        rss = runs[name][-1][1]
        rows.append(
            [
                name,
                f"{median(name, 'p50'):.1f}",
                f"{ratio(name, 'p50'):.2f}x",
                f"{median(name, 'p99'):.1f}",
                f"{ratio(name, 'p99'):.2f}x",
                f"{median(name, 'cpu_per_1k'):.3f}",
                f"{ratio(name, 'cpu_per_1k'):.2f}x",
                " + ".join(f"{x:.0f}" for x in rss),
                contacted[name] or "-",
                int(sum(r["errors"] for r, _ in runs[name])),
            ]
        )
    print(
        f"\ndrm2 {args.size}, {args.shards} shards, {args.samples} samples per request, "
        f"Poisson {args.rate:g} req/s for {args.duration:g} s each after {args.warmup:g} s "
        f"not counted, {args.rounds} round(s), "
        f"{args.workers} gateway worker(s){' pinned' if args.pin_workers else ''}"
        + (" (medians; ratios: medians of each round's)" if args.rounds > 1 else "")
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
    if args.rounds > 1:
        print("\nP99 against singular, round by round:")
        for name, _, _ in setups[:-1]:
            each = [r["p99"] / b["p99"] for (r, _), (b, _) in zip(runs[name], base, strict=True)]
            print(f"  {name}: " + " ".join(f"{x:.2f}x" for x in each))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
