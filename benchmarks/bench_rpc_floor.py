"""What a distributed request's round trips alone cost on one box: a floor under its CPU.

A singular cluster serves ``bench_e2e``'s open-loop load (drm2, JSON requests of 16 samples,
Poisson arrivals). Beside it run the shard daemons of the net plan, idle but for this
process's pinger: at the load's rate (a Poisson schedule of its own) it wakes, and in the
"pings" phase sends a ``health`` to each of ``--contacts`` shards at once (the net plan's
fan-out, rounded, by default) and waits for every answer; in the "ticks" phase it only
wakes. The phases alternate over ``--rounds`` with the same schedules, each round in the
other order; the host's speed drifts, so the phases are short and the rounds many.

CPU is summed over every process: the singular gateway, the shards, this one (the load
generator and the pinger, on uvloop as the gateway's loops are). The difference between the
phases, per wake, is what that many empty round trips cost under the load: the ZeroMQ
transport, its I/O threads and the two event loops, woken on cores the load keeps busy. A
distributed request does at least that on top of singular's work, so ``1 + pings /
singular`` (singular: the singular cluster's CPU per request) is a floor under the
distributed/singular CPU ratio that ``bench_e2e`` prints, whatever its lookups' own work
costs.

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
from benchmarks.common import print_table, run_cli
from loadgen.runner import Run, open_loop
from recserve.contracts.plan import Plan, read_plan
from recserve.local.cluster import LocalCluster, cpu_seconds, free_port
from recserve.rpc.client import ShardClient
from recserve.rpc.context import serving_context
from recserve.rpc.deadline import Deadline


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
        shards = LocalCluster(model, plan=plan_path, port=free_port(), gateway_args=gateway_args)
        singular = LocalCluster(model, singular=True, port=free_port(), gateway_args=gateway_args)
        with shards, singular:
            endpoints = [s.endpoints[0] for s in shards.plan.shards[:contacts]]
            shard_pids = [p.pid for p in shards.shards]
            if args.warmup > 0:
                uvloop.run(phase(singular.url, bodies, endpoints, args, args.warmup, 1, True))
            per: dict[bool, list[float]] = {False: [], True: []}
            served: list[float] = []
            p99: dict[bool, list[float]] = {False: [], True: []}
            for k in range(args.rounds):
                for ping in (k % 2 == 1, k % 2 == 0):
                    before = singular.cpu_seconds()
                    others = cpu_seconds(shard_pids) + time.process_time()
                    run, wakes = uvloop.run(
                        phase(singular.url, bodies, endpoints, args, args.duration, 10 + k, ping)
                    )
                    own = singular.cpu_seconds() - before
                    total = own + cpu_seconds(shard_pids) + time.process_time() - others
                    per[ping].append(total / max(wakes, 1))
                    p99[ping].append(run.percentile_ms(99))
                    if not ping:
                        served.append(own / max(run.ok, 1))
                    if run.errors:
                        raise SystemExit(f"{run.errors} requests failed")
    diffs = [p - t for p, t in zip(per[True], per[False], strict=True)]
    ping_ms, singular_ms = statistics.median(diffs) * 1e3, statistics.median(served) * 1e3
    mean_ms = statistics.fmean(diffs) * 1e3
    print(
        f"\ndrm2 {args.size}, singular gateway ({args.workers} worker(s)"
        f"{', pinned' if args.pin_workers else ''}) under Poisson {args.rate:g} requests/s "
        f"of {args.samples} samples; {contacts} of the net plan's {len(plan.shards)} shards "
        f"pinged a wake; {args.rounds} rounds of {args.duration:g} s a phase (medians)"
    )
    rows = [
        [name, f"{statistics.median(per[p]) * 1e3:.3f}", f"{statistics.median(p99[p]):.1f}"]
        for name, p in (("ticks", False), ("pings", True))
    ]
    print_table(["phase", "CPU ms a wake (all processes)", "load P99 ms"], rows)
    print(f"\n{contacts} empty round trips under the load: {ping_ms:.3f} ms of CPU, median "
          f"({ping_ms / contacts * 1e3:.0f} us each; mean {mean_ms:.3f} ms; per round: "
          + " ".join(f"{d * 1e3:.3f}" for d in diffs) + ")")  # fmt: skip
    print(f"singular's CPU per request (its gateway): {singular_ms:.3f} ms")
    print(f"floor under the distributed/singular CPU ratio: {1 + ping_ms / singular_ms:.2f}x "
          f"(mean: {1 + mean_ms / singular_ms:.2f}x; issue 18's target: <= 1.15x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
