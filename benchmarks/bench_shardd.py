"""One shard daemon over loopback tcp and ipc against the bare kernel on the same data.

A 2M x 64 fp32 table (512 MiB), lookups of 2048 bags x 40 int32 ids (81,920 ids, fresh ids
each request). Latency: one request at a time (round-trip p50/p99). Throughput: ``--inflight``
requests in flight from one client. The bare kernel pools the same requests in this
process, with the daemon's kernel thread count (the target: what the daemon and the wire
cost over the work itself) and on all cores. Rounds alternate the paths, and each round's
wire rate is compared with the bare kernel's of the same round.

The client runs on the daemon's machine. The tcp and ipc daemons run with
``--kernel-cpus`` set to the last CPU, and the client keeps off that CPU while it sends
to them, as a process sharing a shard's host should (systemd's ``CPUAffinity=``), and as
a gateway on another host does; on 2 cores the kernel thread then has one core and the
client, the loop and ZeroMQ the other. A third daemon ("tcp, shared cores") runs without
``--kernel-cpus`` and its client anywhere: the scheduler mixes everything on all cores.
A fourth ("tcp, CURVE") is the tcp daemon with ``--curve-keys``: encryption and client
authentication, compared with plaintext tcp round by round (target >= 0.85x).

    python -m benchmarks.bench_shardd [--small] [--requests N] [--rounds N] [--inflight N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

import kernels
from benchmarks.common import fmt_ratio, print_table
from recserve.contracts.manifest import DenseSpec, InteractionSpec, Manifest, MLPSpec, TableSpec
from recserve.contracts.plan import local_endpoints
from recserve.model.artifact import ArtifactWriter, hugepage_copies, open_table
from recserve.planning import build
from recserve.rpc.client import ShardClient
from recserve.rpc.curve import CurveKeys, keygen
from recserve.rpc.deadline import Deadline
from recserve.rpc.probe import ready
from recserve.rpc.wire import PartRequest
from recserve.runtime.cpus import pin_process
from shardd.main import default_kernel_threads
from tests.integration.shards import free_port, start_shard, stop

DIM, BAGS, POOLING = 64, 2048, 40

CURVE = "tcp, CURVE"


def write_model(root: Path, rows: int) -> Manifest:
    spec = TableSpec("t", rows, DIM, features=("f",))
    inter = InteractionSpec("dot")
    manifest = Manifest(
        "bench",
        "1",
        4,
        (spec,),
        DenseSpec(
            MLPSpec((4, DIM), ("relu",)),
            inter,
            MLPSpec((inter.output_width(DIM, 1), 1), ("sigmoid",)),
        ),
    )
    writer = ArtifactWriter(root, overwrite=True)
    step = 1 << 20
    writer.write_table(
        spec,
        (
            np.random.default_rng(i).random((min(step, rows - s), DIM), np.float32)
            for i, s in enumerate(range(0, rows, step))
        ),
    )
    rng = np.random.default_rng(0)
    writer.write_dense(
        {
            "bottom.0.weight": rng.random((DIM, 4)),
            "bottom.0.bias": np.zeros(DIM),
            "top.0.weight": rng.random((1, manifest.dense.top.sizes[0])),
            "top.0.bias": np.zeros(1),
        }
    )
    return writer.finish(manifest)


def requests(rows: int, count: int) -> list[np.ndarray]:
    """Int32 ids, as the gateway sends them for tables under 2**31 rows."""
    return [
        np.random.default_rng(100 + i).integers(0, rows, BAGS * POOLING, dtype=np.int32)
        for i in range(count)
    ]


def bare(table: kernels.Table, reqs: list[np.ndarray], threads: int) -> float:
    offsets = np.arange(0, BAGS * POOLING, POOLING)
    kernels.pool(table, reqs[0], offsets, threads=threads)
    start = time.perf_counter()
    for ids in reqs:
        kernels.pool(table, ids, offsets, threads=threads)
    return len(reqs) * BAGS * POOLING / (time.perf_counter() - start)


async def over_wire(
    endpoint: str, reqs: list[np.ndarray], inflight: int, keys: CurveKeys | None = None
) -> tuple[list[float], float]:
    """Round-trip ms of each request sent alone, then ids/s with ``inflight`` in flight."""
    ctx = zmq.Context()
    client = ShardClient(endpoint, ctx, keys=keys)
    parts = [PartRequest("t", 0, BAGS, "sum")]
    lengths = np.full(BAGS, POOLING, np.int32)

    async def one(ids: np.ndarray) -> float:
        start = time.perf_counter()
        groups = await client.lookup(parts, ids, lengths, deadline=Deadline.after(30_000))
        assert groups[0].pooled.shape == (BAGS, 1, DIM)
        return time.perf_counter() - start

    try:
        await one(reqs[0])
        latencies = [await one(ids) for ids in reqs]
        queue = list(reqs)
        start = time.perf_counter()

        async def worker() -> None:
            while queue:
                await one(queue.pop())

        await asyncio.gather(*(worker() for _ in range(inflight)))
        rate = len(reqs) * BAGS * POOLING / (time.perf_counter() - start)
    finally:
        await client.close()
        ctx.term()
    return [t * 1e3 for t in latencies], rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 100k-row table: smoke run")
    parser.add_argument("--requests", type=int, default=60, help="per round")
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--workers", type=int, default=1, help="shardd --workers")
    parser.add_argument("--kernel-threads", type=int, help="shardd --kernel-threads")
    parser.add_argument(
        "--hugepages", action="store_true", help="shardd --hugepages; the bare kernel too"
    )
    args = parser.parse_args(argv)
    rows = 100_000 if args.small else 2_000_000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = write_model(root / "m", rows)
        plan = build(manifest, 1, "capacity", local_endpoints(1, 1))
        (root / "plan.json").write_bytes(plan.to_json())
        table = open_table(root / "m", manifest.tables[0])
        if args.hugepages:
            table = hugepage_copies([table])[0]
        reqs = requests(rows, args.requests)
        allowed = frozenset(os.sched_getaffinity(0))
        # (endpoint, CPUs of the client or None) per path; pinned paths when there are 2+.
        kernel_cpu = max(allowed) if len(allowed) > 1 else None
        client_cpus = allowed - {kernel_cpu} if kernel_cpu is not None else None
        paths = {
            "tcp": (f"tcp://127.0.0.1:{free_port()}", client_cpus),
            "ipc": (f"ipc://{root}/s.sock", client_cpus),
            CURVE: (f"tcp://127.0.0.1:{free_port()}", client_cpus),
        }
        keygen(root / "keys")
        keys = CurveKeys.for_client(root / "keys")
        if client_cpus is not None:
            paths["tcp, shared cores"] = (f"tcp://127.0.0.1:{free_port()}", None)
        extra = ["--hugepages" if args.hugepages else "--preload", "--workers", str(args.workers)]
        if args.kernel_threads:
            extra += ["--kernel-threads", str(args.kernel_threads)]
        procs = [
            start_shard(
                root / "plan.json",
                root / "m",
                0,
                ep,
                *extra,
                *(["--kernel-cpus", str(kernel_cpu)] if cpus is not None else []),
                *(["--curve-keys", str(root / "keys")] if path == CURVE else []),
            )
            for path, (ep, cpus) in paths.items()
        ]
        latency: dict[str, list[float]] = {t: [] for t in paths}
        rates: dict[str, list[float]] = {t: [] for t in paths}
        same = args.kernel_threads or default_kernel_threads()
        bare_rates: dict[int, list[float]] = {same: [], kernels.default_threads(): []}
        try:
            for (path, (ep, _)), proc in zip(paths.items(), procs, strict=True):
                while not ready(ep, keys=keys if path == CURVE else None):
                    assert proc.poll() is None, f"the {path} daemon exited"
            # Rounds alternate the paths so drift on a shared machine hits all of them.
            for _ in range(args.rounds):
                for threads, done in bare_rates.items():
                    done.append(bare(table, reqs, threads))
                for path, (ep, cpus) in paths.items():
                    pin_process(cpus or allowed)
                    try:
                        ms, rate = asyncio.run(
                            over_wire(ep, reqs, args.inflight, keys if path == CURVE else None)
                        )
                    finally:
                        pin_process(allowed)
                    latency[path] += ms
                    rates[path].append(rate)
        finally:
            for proc in procs:
                stop(proc)
    all_cores = kernels.default_threads()
    kernel = {n: float(np.median(r)) for n, r in bare_rates.items()}
    # Memory speed on a shared host drifts by several times within seconds: each round's
    # wire rate is divided by the bare kernel's rate of the same round, then the median.
    vs = {
        (t, n): float(np.median(np.array(rates[t]) / np.array(bare_rates[n])))
        for t in paths
        for n in kernel
    }
    rows_out = [
        [
            t,
            f"{np.percentile(latency[t], 50):.2f}",
            f"{np.percentile(latency[t], 99):.2f}",
            f"{np.median(rates[t]) / 1e6:.1f}",
            f"{vs[(t, same)]:.2f}x",
            f"{vs[(t, all_cores)]:.2f}x",
        ]
        for t in paths
    ]
    for n in sorted(kernel):
        rows_out.append(
            [
                f"kernel, {n} thr",
                "-",
                "-",
                f"{kernel[n] / 1e6:.1f}",
                fmt_ratio(kernel[n], kernel[same]),
                fmt_ratio(kernel[n], kernel[all_cores]),
            ]
        )
    print(
        f"\none shard, {rows} x {DIM} fp32, lookups of {BAGS} bags x {POOLING} ids, "
        f"{args.requests} requests x {args.rounds} rounds, {args.inflight} in flight"
        f" for ids/s; shardd --workers {args.workers} --kernel-threads {same}"
        f"{' --hugepages' if args.hugepages else ' --preload'}"
        f"{f' (--kernel-cpus {kernel_cpu} on tcp and ipc)' if kernel_cpu is not None else ''}"
    )
    print_table(
        ["path", "p50 ms", "p99 ms", "M ids/s", f"vs kernel {same} thr", f"vs {all_cores} thr"],
        rows_out,
    )
    headline = [t for t in ("tcp", "ipc") if t in paths]
    worst = min(vs[(t, same)] for t in headline)
    pinned = f", kernel on CPU {kernel_cpu}, client on the others" if kernel_cpu is not None else ""
    print(
        f"\ntarget: over the wire >= 0.7x the bare kernel on the daemon's {same} kernel "
        f"thread(s), median of per-round ratios, worse transport{pinned}: {worst:.2f}x "
        f"{'met' if worst >= 0.7 else 'MISSED'}; against the kernel on all {all_cores} "
        f"cores: {min(vs[(t, all_cores)] for t in headline):.2f}x"
    )
    curve = float(np.median(np.array(rates[CURVE]) / np.array(rates["tcp"])))
    print(
        f"CURVE (encrypted, authenticated) against plaintext tcp, median of per-round ratios: "
        f"{curve:.2f}x, target >= 0.85x {'met' if curve >= 0.85 else 'MISSED'}"
    )
    if "tcp, shared cores" in paths:
        print(
            "tcp with the kernel thread, the loop, ZeroMQ and the client mixed on all cores: "
            f"{vs[('tcp, shared cores', same)]:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
