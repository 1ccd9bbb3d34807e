"""What a distributed request's round trips alone cost on one box: a floor under its CPU.

Two clusters run side by side from the same drm2 model: a singular gateway, and the net
plan's shard daemons with their gateway. ``bench_e2e``'s open-loop load (JSON requests of
16 samples, Poisson arrivals) goes to one of them at a time, in three phases:

- ticks: the load on the singular gateway, and this process's pinger wakes at the load's
  rate (a Poisson schedule of its own) and does nothing;
- pings: the same, but each wake the pinger sends ``health`` to ``--contacts`` of the shard
  daemons at once (the net plan's fan-out, rounded, by default) and waits for every answer;
- net: the load on the net plan's gateway, the pinger ticking.

The phases rotate over ``--rounds`` rounds with the same schedules; the host's speed drifts,
so the phases are short and the rounds many. The load generator and the pinger run on uvloop,
as the gateway's loops do.

Pings less ticks, in CPU summed over every process per wake, is what that many empty round
trips cost under the load: the ZeroMQ transport, its I/O threads and the two event loops,
woken on cores the load keeps busy (the pinger's share of a ping is somewhat more than a
gateway's: it is a process of its own). A distributed request pays at least that on top of
singular's work, so ``1 + trips / singular`` (singular: the servers' CPU per request in the
ticks phase) is a floor under the distributed/singular CPU ratio whatever the lookups' own
work costs. Printed beside it, each the median of the rounds' own: the net plan's CPU per
request against singular's (``bench_e2e``'s ratio) and against singular's plus the round
trips' (what the distribution costs beyond its round trips). The servers' CPU counts both
clusters' processes in every phase; the one without the load idles.

    python -m benchmarks.bench_rpc_floor [--size 512MiB] [--rate 100] [--duration 6]
        [--rounds 10] [--contacts N] [--workers 2] [--pin-workers]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop

from benchmarks.bench_gateway import prepare
from benchmarks.common import print_table, rotated, run_cli
from loadgen.runner import Run, open_loop
from recserve.contracts.plan import Plan, read_plan
from recserve.local.cluster import LocalCluster, free_port
from recserve.rpc.client import ShardClient
from recserve.rpc.context import serving_context
from recserve.rpc.deadline import Deadline

PHASES = ("ticks", "pings", "net")


async def pinger(endpoints: list[str], rate: float, duration: float, seed: int, ping: bool) -> int:
    """Wake at Poisson times for ``duration`` s; with ``ping`` send ``health`` to every
    endpoint at once each time and wait for the answers. Returns the wakes."""
    ctx = serving_context()
    clients = [ShardClient(e, ctx) for e in endpoints]
    try:
        for c in clients:  # connected and answering before the clock starts
            await c.simple("health", Deadline.after(5000))
        rng = np.random.default_rng(seed)
        begin = due = time.perf_counter()
        wakes = 0
        while due - begin < duration:
            due += float(rng.exponential(1.0 / rate))
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            wakes += 1
            if ping:
                deadline = Deadline.after(1000)
                await asyncio.gather(*(c.simple("health", deadline) for c in clients))
        return wakes
    finally:
        for c in clients:
            await c.close()
        ctx.term()


async def phase(
    url: str,
    bodies: list[bytes],
    endpoints: list[str],
    args: argparse.Namespace,
    duration: float,
    seed: int,
    ping: bool,
) -> tuple[Run, int]:
    """The load and the pinger together for ``duration`` s, on this process's loop."""
    run = Run(args.samples)
    load = open_loop(url, bodies, "application/json", run, rate=args.rate,
                     duration=duration, seed=seed)  # fmt: skip
    _, wakes = await asyncio.gather(load, pinger(endpoints, args.rate, duration, seed + 1, ping))
    return run, wakes


def contacts_of(plan: Plan) -> int:
    """The plan's mean shards contacted per request, rounded (at least one)."""
    return max(1, round(float(plan.report["shards_contacted"])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512MiB")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds a phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load first")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--contacts", type=int, help="shards pinged a wake (net plan's fan-out)")
    parser.add_argument("--workers", type=int, default=2, help="gateway --workers")
    parser.add_argument("--pin-workers", action="store_true", help="gateway --pin-workers")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.workers < 1 or (args.contacts is not None and args.contacts < 1):
        parser.error("--rounds, --workers and --contacts must be >= 1")
    gateway_args: tuple[str, ...] = ("--timeout-ms", "5000", "--workers", str(args.workers))
    gateway_args += ("--pin-workers",) if args.pin_workers else ()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, bodies = prepare(root, args.size, args.samples)
        plan_path = root / "net.json"
        run_cli(["plan", "--model", str(model), "--shards", str(args.shards),
                 "--strategy", "net", "--out", str(plan_path)])  # fmt: skip
        plan = read_plan(plan_path)
        contacts = args.contacts or contacts_of(plan)
        if contacts > len(plan.shards):
            parser.error(f"--contacts: the plan has {len(plan.shards)} shards")
        net = LocalCluster(model, plan=plan_path, port=free_port(), gateway_args=gateway_args)
        singular = LocalCluster(model, singular=True, port=free_port(), gateway_args=gateway_args)
        with net, singular:
            endpoints = [s.endpoints[0] for s in net.plan.shards[:contacts]]
            if args.warmup > 0:
                for name in PHASES:
                    measure(name, singular, net, bodies, endpoints, args, args.warmup, 1)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in PHASES}
            for k in range(args.rounds):
                for name in rotated(PHASES, k):
                    got = measure(
                        name, singular, net, bodies, endpoints, args, args.duration, 10 + k
                    )
                    runs[name].append(got)
    report(args, runs, contacts, len(plan.shards))
    return 0


def measure(
    name: str,
    singular: LocalCluster,
    net: LocalCluster,
    bodies: list[bytes],
    endpoints: list[str],
    args: argparse.Namespace,
    duration: float,
    seed: int,
) -> dict[str, float]:
    """One phase: the servers' CPU ms per request (both clusters: the one not loaded idles),
    every process's CPU ms per wake of the pinger, and the load's P99."""
    url = net.url if name == "net" else singular.url
    servers, own = singular.cpu_seconds() + net.cpu_seconds(), time.process_time()
    run, wakes = uvloop.run(
        phase(url, bodies, endpoints, args, duration, seed, ping=name == "pings")
    )
    servers = singular.cpu_seconds() + net.cpu_seconds() - servers
    own = time.process_time() - own
    if run.errors:
        raise SystemExit(f"{name}: {run.errors} requests failed")
    return {
        "request": servers * 1e3 / max(run.ok, 1),
        "wake": (servers + own) * 1e3 / max(wakes, 1),
        "p99": run.percentile_ms(99),
    }


def report(
    args: argparse.Namespace, runs: dict[str, list[dict[str, float]]], contacts: int, shards: int
) -> None:
    """The phases' medians, then the floor and the net plan's ratios, each the median of the
    rounds' own."""
    ticks, pings, nets = runs["ticks"], runs["pings"], runs["net"]
    trips = [p["wake"] - t["wake"] for p, t in zip(pings, ticks, strict=True)]
    floor = [1 + d / t["request"] for d, t in zip(trips, ticks, strict=True)]
    ratio = [n["request"] / t["request"] for n, t in zip(nets, ticks, strict=True)]
    beyond = [n["request"] / (t["request"] + d) for n, t, d in zip(nets, ticks, trips, strict=True)]
    print(
        f"\ndrm2 {args.size}, net plan over {shards} shards, {args.workers} gateway worker(s)"
        f"{' pinned' if args.pin_workers else ''}, Poisson {args.rate:g} requests/s of "
        f"{args.samples} samples; pings: the singular load and {contacts} shards pinged a wake; "
        f"{args.rounds} rounds of {args.duration:g} s a phase (medians)"
    )

    def median(rows: list[dict[str, float]], key: str, fmt: str) -> str:
        return format(statistics.median(r[key] for r in rows), fmt)

    print_table(
        ["phase", "servers' CPU ms a request", "all CPU ms a wake", "P99 ms"],
        [[name, median(runs[name], "request", ".3f"), median(runs[name], "wake", ".3f"),
          median(runs[name], "p99", ".1f")] for name in PHASES],
    )  # fmt: skip
    trip_ms = statistics.median(trips)
    print(f"\n{contacts} empty round trips under the load: {trip_ms:.3f} ms of CPU "
          f"({trip_ms / contacts * 1e3:.0f} us each; per round: "
          + " ".join(f"{d:.3f}" for d in trips) + ")")  # fmt: skip
    print(f"floor under the distributed/singular CPU ratio: {statistics.median(floor):.2f}x")
    print(f"net plan against singular: {statistics.median(ratio):.2f}x (issue 18's target: "
          f"<= 1.15x); against singular plus the round trips: "
          f"{statistics.median(beyond):.2f}x")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
