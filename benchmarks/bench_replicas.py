"""Replicas under failure, with and without hedging.

A synthetic drm2 model on 2 shards x 2 replicas; open-loop Poisson load of 16-sample
requests (the load generator's runner: latency from each request's intended send time).
Scenarios: steady; one replica killed (SIGKILL) at the start; one replica stalled (SIGSTOP
for 2 s of every 5 s). Each runs with hedging off and with ``--hedge-after-ms`` (default
p95). Printed: P50/P99/P99.9, errors, and extra lookups (retries and hedges over all
lookups). Targets: no errors anywhere; stalled P99 with hedging <= 1.5x steady's; extra
lookups <= 10 %.

    python -m benchmarks.bench_replicas [--size 128MiB] [--rate 50] [--duration 15]
                                        [--hedge p95]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import print_table, run_cli
from loadgen.runner import Run, open_loop
from recserve.contracts.manifest import read_manifest
from recserve.local.cluster import LocalCluster, free_port
from recserve.model.workload import Workload

SAMPLES = 16


def metric_sum(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


def stall(proc: subprocess.Popen, stop: threading.Event) -> None:
    """SIGSTOP for 2 s of every 5 s until ``stop``."""
    while not stop.wait(3.0):
        proc.send_signal(signal.SIGSTOP)
        stop.wait(2.0)
        proc.send_signal(signal.SIGCONT)


def scenario(model: Path, bodies: list[bytes], what: str, hedge: str, args: Any) -> list[str]:
    gateway = ("--timeout-ms", "2000", "--hedge-after-ms", hedge)
    with LocalCluster(
        model, shards=2, replicas=2, strategy="capacity", port=free_port(), gateway_args=gateway
    ) as cluster:
        victim = cluster.shards[1]  # shard 0, replica 1
        stop = threading.Event()
        staller = threading.Thread(target=stall, args=(victim, stop), daemon=True)
        if what == "killed":
            victim.kill()
            victim.wait()
        elif what == "stalled":
            staller.start()
        run = Run(SAMPLES)
        try:
            asyncio.run(
                open_loop(
                    cluster.url,
                    bodies,
                    "application/json",
                    run,
                    rate=args.rate,
                    duration=args.duration,
                    seed=3,
                )
            )
        finally:
            stop.set()
            if staller.is_alive():
                staller.join()
                victim.send_signal(signal.SIGCONT)
        with urllib.request.urlopen(cluster.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    lookups = metric_sum(text, "recserve_gateway_replica_requests_total")
    extra = metric_sum(text, "recserve_gateway_retries_total") + _sent(text)
    return [
        what,
        hedge,
        f"{run.percentile_ms(50):.1f}",
        f"{run.percentile_ms(99):.1f}",
        f"{run.percentile_ms(99.9):.1f}",
        str(run.errors),
        f"{100 * extra / max(lookups, 1):.1f} %",
    ]


def _sent(text: str) -> float:
    return sum(
        float(v)
        for v in re.findall(
            r'^recserve_gateway_hedges_total\{outcome="sent",shard="\d+"\} ([0-9.e+]+)$', text, re.M
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="128MiB")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--hedge", default="p95", help="--hedge-after-ms of the hedged runs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "m"
        run_cli(
            ["synth", "--profile", "drm2", "--size", args.size, "--seed", "1", "--out", str(model)]
        )
        work = Workload(read_manifest(model), seed=5)
        bodies = [orjson.dumps({"samples": work.samples(SAMPLES)}) for _ in range(64)]
        rows = [
            scenario(model, bodies, what, hedge, args)
            for what in ("steady", "killed", "stalled")
            for hedge in ("off", args.hedge)
        ]
    print(
        f"\ndrm2 {args.size}, 2 shards x 2 replicas, {args.rate:g} requests/s of {SAMPLES} "
        f"samples for {args.duration:g} s each"
    )
    print_table(["scenario", "hedge", "p50 ms", "p99 ms", "p99.9 ms", "errors", "extra"], rows)
    p99 = {(r[0], r[1]): float(r[3]) for r in rows}
    steady = p99[("steady", args.hedge)]
    ratio = p99[("stalled", args.hedge)] / steady
    errors = sum(int(r[5]) for r in rows)
    extra = max(float(r[6].split()[0]) for r in rows)
    print(
        f"\ntargets: errors 0: {errors} {'met' if not errors else 'MISSED'}; stalled P99 with "
        f"hedging <= 1.5x steady: {ratio:.2f}x {'met' if ratio <= 1.5 else 'MISSED'} "
        f"(without: {p99[('stalled', 'off')] / p99[('steady', 'off')]:.2f}x); extra lookups "
        f"<= 10 %: {extra:.1f} % {'met' if extra <= 10 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
