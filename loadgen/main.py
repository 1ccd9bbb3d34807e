"""``recserve loadgen``: drive load at a gateway and report latency percentiles.

recserve loadgen --url URL [--qps Q --duration S | --concurrency C --duration S |
                 --sweep --slo-ms P99] [--candidates K | --samples N]
                 [--format json|msgpack|columns] [--report r.json] [--plot p.png]
                 [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadgen.runner import Run, closed_loop, open_loop
from loadgen.workload import Bodies
from recserve.runtime.heap import freeze_startup_heap

PERCENTILES = (50, 90, 95, 99, 99.9)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recserve loadgen", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8080")
    p.add_argument(
        "--model", type=Path, help="read the workload from this artifact instead of GET /v1/model"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--qps", type=float, help="open loop: Poisson arrivals per second")
    mode.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    mode.add_argument("--sweep", action="store_true", help="raise the rate until P99 > SLO")
    p.add_argument("--slo-ms", type=float, default=50.0, help="P99 objective for --sweep")
    p.add_argument("--duration", type=float, default=20.0, help="seconds (per step: --sweep)")
    p.add_argument("--candidates", type=int, default=0, help="ranking requests of K candidates")
    p.add_argument("--samples", type=int, default=16, help="flat requests of N samples")
    p.add_argument(
        "--format",
        choices=("json", "msgpack", "columns"),
        default="json",
        help="request bodies: JSON or msgpack samples, or msgpack columns (recserve.client's)",
    )
    p.add_argument(
        "--bodies",
        type=int,
        default=64,
        help="distinct request bodies, drawn before the run and sent round robin (a cache "
        "benchmark wants at least one per request sent)",
    )
    p.add_argument("--report", type=Path, help="write the results as JSON")
    p.add_argument("--plot", type=Path, help="write a latency-percentile plot (matplotlib)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def fetch_model(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url.rstrip("/") + "/v1/model", timeout=10) as r:
        doc: dict[str, Any] = json.loads(r.read())
    return doc


def summary(run: Run, label: str, offered: float | None) -> dict[str, Any]:
    return {
        "label": label,
        "offered_qps": offered,
        "achieved_qps": run.ok / run.elapsed if run.elapsed else 0.0,
        "samples_per_s": run.ok * run.samples_per_request / run.elapsed if run.elapsed else 0.0,
        "requests": run.sent,
        "ok": run.ok,
        "errors": dict(sorted((k, v) for k, v in run.statuses.items() if k != "200")),
        "latency_ms": {f"p{p:g}": run.percentile_ms(p) for p in PERCENTILES}
        | {"max": run.histogram.get_max_value() / 1e3},
        # Every latency (us) in HdrHistogram's compressed base64 form, so runs can be pooled
        # (``HdrHistogram.decode`` then ``add``) for percentiles over all their requests.
        "histogram_us": run.histogram.encode().decode("ascii"),
    }


def print_summary(rows: list[dict[str, Any]]) -> None:
    cols = [
        "run",
        "offered/s",
        "achieved/s",
        "samples/s",
        *[f"p{p:g} ms" for p in PERCENTILES],
        "max ms",
        "errors",
    ]
    table = [cols]
    for r in rows:
        lat = r["latency_ms"]
        table.append(
            [
                r["label"],
                f"{r['offered_qps']:.1f}" if r["offered_qps"] else "-",
                f"{r['achieved_qps']:.1f}",
                f"{r['samples_per_s']:.0f}",
                *[f"{lat[f'p{p:g}']:.1f}" for p in PERCENTILES],
                f"{lat['max']:.1f}",
                str(sum(r["errors"].values())),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for i, row in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def progress(run: Run) -> None:
    import time

    elapsed = time.perf_counter() - run.started
    print(
        f"\r{elapsed:6.1f} s  {run.ok / max(elapsed, 1e-9):8.1f} req/s  p50 "
        f"{run.percentile_ms(50):7.1f} ms  p99 {run.percentile_ms(99):7.1f} ms  errors "
        f"{run.errors}",
        end="",
        file=sys.stderr,
        flush=True,
    )


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'recserve[plot]'", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        keys = [f"p{p:g}" for p in PERCENTILES]
        ax.plot(keys, [r["latency_ms"][k] for k in keys], marker="o", label=r["label"])
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_title("latency percentiles (from intended send times)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def model_from_artifact(path: Path) -> dict[str, Any]:
    """The ``GET /v1/model`` fields the workload needs, from a model artifact."""
    from recserve.contracts.http import feature_list
    from recserve.contracts.manifest import read_manifest

    m = read_manifest(path)
    return {"dense_width": m.dense_width, "features": feature_list(m)}


async def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = model_from_artifact(args.model) if args.model else fetch_model(args.url)
    bodies = Bodies(
        model, samples=args.samples, candidates=args.candidates, fmt=args.format, seed=args.seed
    )
    pool = bodies.pool(args.bodies)
    freeze_startup_heap()  # a long GC pause here would count as the server's latency
    show = None if args.quiet else progress
    rows = []

    async def open_step(rate: float, label: str) -> dict[str, Any]:
        run = Run(bodies.samples_per_request)
        await open_loop(
            args.url,
            pool,
            bodies.content_type,
            run,
            rate=rate,
            duration=args.duration,
            seed=args.seed,
            progress=show,
        )
        if show:
            print(file=sys.stderr)  # end the progress line
        return summary(run, label, rate)

    if args.concurrency:
        run = Run(bodies.samples_per_request)
        await closed_loop(
            args.url,
            pool,
            bodies.content_type,
            run,
            concurrency=args.concurrency,
            duration=args.duration,
            progress=show,
        )
        rows.append(summary(run, f"closed x{args.concurrency}", None))
        if show:
            print(file=sys.stderr)  # end the progress line
    elif args.sweep:
        rate, held = 5.0, None
        while True:
            row = await open_step(rate, f"{rate:.0f}/s")
            rows.append(row)
            if row["latency_ms"]["p99"] > args.slo_ms or row["errors"]:
                break
            held, rate = row, rate * 1.5
        label = f"max within P99 {args.slo_ms:g} ms"
        rows.append({**(held or rows[-1]), "label": label if held else "no rate held the SLO"})
    else:
        rate = args.qps or 10.0
        rows.append(await open_step(rate, f"open {rate:g}/s"))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples < 1 or args.candidates < 0 or args.duration <= 0 or args.bodies < 1:
        print(
            "recserve loadgen: error: --samples, --candidates, --duration and --bodies must be "
            "positive",
            file=sys.stderr,
        )
        return 2
    try:
        rows = asyncio.run(run_all(args))
    except OSError as exc:
        print(f"recserve loadgen: error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    print_summary(rows)
    if args.report:
        args.report.write_text(json.dumps({"url": args.url, "runs": rows}, indent=2))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
