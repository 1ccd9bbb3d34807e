"""Distributed (gateway + 4 shards) against singular serving at the same offered load.

A synthetic drm2 model; requests of ``--samples`` flat samples drawn from the model's access
statistics, pre-encoded as JSON; Poisson arrivals at ``--rate`` requests/s for
``--duration`` s (open loop: latency counts from each request's intended send time, so a
stalled server shows in the tail). CPU seconds are summed over every server process from
/proc. The two setups run one after the other, never sharing the machine.

    python -m benchmarks.bench_gateway [--size 256MiB] [--samples 16] [--rate 20]
                                       [--duration 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from benchmarks.common import print_table
from recserve.artifact import read_manifest
from recserve.cli import main as cli
from recserve.workload import Workload
from tests.integration.shards import free_port, start_shard, stop, wait_healthy

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_gateway(model: Path, port: int, plan: Path | None) -> subprocess.Popen:
    where = ["--plan", str(plan)] if plan else ["--singular", "--preload"]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "--model",
            str(model),
            *where,
            "--port",
            str(port),
            "--timeout-ms",
            "5000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_ready(url: str, timeout: float = 120) -> None:
    async with aiohttp.ClientSession() as s, asyncio.timeout(timeout):
        while True:
            try:
                async with s.get(url + "/v2/health/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


async def open_loop(
    url: str, bodies: list[bytes], rate: float, duration: float, seed: int
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, int(rate * duration * 1.2) + 10)
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:
        for body in bodies[:3]:  # warm-up
            async with session.post(
                url + "/v1/predict", data=body, headers={"Content-Type": "application/json"}
            ) as r:
                await r.read()

        async def one(body: bytes, intended: float) -> None:
            nonlocal errors
            async with session.post(
                url + "/v1/predict", data=body, headers={"Content-Type": "application/json"}
            ) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - intended)

        tasks = []
        start = time.perf_counter()
        t = start
        for i, gap in enumerate(gaps):
            t += gap
            if t - start > duration:
                break
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(bodies[i % len(bodies)], t)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "achieved": len(latencies) / elapsed,
        "offered": len(tasks) / duration,
        "errors": float(errors),
        "requests": float(len(latencies)),
    }


def prepare(root: Path, size: str, samples: int) -> tuple[Path, list[bytes]]:
    """A drm2 model under ``root`` and 64 pre-encoded request bodies drawn from it."""
    model = root / "m"
    assert (
        cli(["synth", "--profile", "drm2", "--size", size, "--seed", "1", "--out", str(model)]) == 0
    )
    work = Workload(read_manifest(model), seed=5)
    return model, [orjson.dumps({"samples": work.samples(samples)}) for _ in range(64)]


def local_plan(plan: Path) -> dict[str, Any]:
    """Rewrite ``plan``'s endpoints to private ipc sockets beside it; returns the plan."""
    doc: dict[str, Any] = json.loads(plan.read_text())
    for s in doc["shards"]:
        s["endpoints"] = [f"ipc://{plan.parent}/{plan.stem}-s{s['id']}.sock"]
    plan.write_text(json.dumps(doc))
    return doc


def measure(
    model: Path, plan: Path | None, bodies: list[bytes], rate: float, duration: float, samples: int
) -> tuple[dict[str, float], list[float]]:
    """Start the shards of ``plan`` (none: singular) and a gateway, drive the open-loop load,
    stop everything. Returns the load results (with CPU s per 1k samples) and RSS per process."""
    doc = json.loads(plan.read_text()) if plan else {"shards": []}
    shards = (
        [start_shard(plan, model, s["id"], s["endpoints"][0], "--preload") for s in doc["shards"]]
        if plan
        else []
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = None
    try:
        for s, p in zip(doc["shards"], shards, strict=True):
            wait_healthy(s["endpoints"][0], p)
        gw = start_gateway(model, port, plan)
        asyncio.run(wait_ready(url))
        pids = [gw.pid, *[p.pid for p in shards]]
        before = cpu_seconds(pids)
        r = asyncio.run(open_loop(url, bodies, rate, duration, seed=3))
        r["cpu_per_1k"] = (cpu_seconds(pids) - before) / (r["requests"] * samples / 1000)
        return r, [rss_mib(pid) for pid in pids]
    finally:
        for p in ([gw] if gw else []) + shards:
            stop(p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--strategy", default="load")
    parser.add_argument("--samples", type=int, default=16, help="samples per request")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=30.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, bodies = prepare(root, args.size, args.samples)
        plan = root / "plan.json"
        assert cli(["plan", "--model", str(model), "--shards", str(args.shards),
                    "--strategy", args.strategy, "--out", str(plan)]) == 0  # fmt: skip
        local_plan(plan)
        results, rss = {}, {}
        for mode in ("distributed", "singular"):
            where = plan if mode == "distributed" else None
            results[mode], rss[mode] = measure(model, where, bodies, args.rate, args.duration,
                                               args.samples)  # fmt: skip
    rows = []
    for mode, r in results.items():
        rows.append(
            [
                mode,
                f"{r['offered']:.1f}",
                f"{r['achieved']:.1f}",
                f"{r['p50']:.1f}",
                f"{r['p99']:.1f}",
                f"{r['cpu_per_1k']:.3f}",
                int(r["errors"]),
                " + ".join(f"{x:.0f}" for x in rss[mode]),
            ]
        )
    d, s = results["distributed"], results["singular"]
    rows.append(
        [
            "ratio",
            "",
            f"{d['achieved'] / s['achieved']:.2f}x",
            f"{d['p50'] / s['p50']:.2f}x",
            f"{d['p99'] / s['p99']:.2f}x",
            f"{d['cpu_per_1k'] / s['cpu_per_1k']:.2f}x",
            "",
            "",
        ]
    )
    print(
        f"\ndrm2 {args.size}, {args.shards} shards ({args.strategy}), {args.samples} samples "
        f"per request, Poisson {args.rate:g} req/s for {args.duration:g} s"
    )
    print_table(
        [
            "mode",
            "offered/s",
            "achieved/s",
            "p50 ms",
            "p99 ms",
            "CPU s/1k samples",
            "errors",
            "RSS MiB (gateway + shards)",
        ],
        rows,
    )
    ok = d["p99"] <= 1.25 * s["p99"]
    print(
        f"\ntarget: distributed P99 <= 1.25x singular where singular P99 < 50 ms: "
        f"{d['p99'] / s['p99']:.2f}x (singular P99 {s['p99']:.1f} ms) "
        f"{'met' if ok and s['p99'] < 50 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
