"""Served throughput against an in-process PyTorch DLRM, per request form.

The model has ``DLRM_Net``'s benchmark shape: 26 tables, 4M rows x 64 in all, 20 ids a bag,
bottom MLP 13-512-256-64, dot interaction, top 415-512-256-1. The baseline is that model in
``torch.nn`` (``EmbeddingBag`` sums, ``Linear`` layers, the strictly-lower-triangle dots, as
``DLRM_Net`` builds them) on the artifact's weights, torch's default threads, batches of
``--batch`` back to back. recserve serves the same batches as ``--batch``-sample requests,
``--inflight`` in flight from a client on the same cores, singular and on ``--shards``
shards, with each ``--workers`` setting of the gateway, in four request forms: KServe v2
binary tensors (ids as INT32 where they fit, as ``recserve.client`` sends them; and as
INT64), the columnar msgpack form through ``recserve.client`` (encoding included) and
msgpack samples. The sharded gateway asks its shards through shared memory (they run on
its host); with ``--socket`` the shards are also run with ``--shm-bytes 0``, every lookup
over the socket, and with ``--pin-shards`` also each on one CPU of its own (round robin,
``recserve up --pin-shards``); the ratio to the first sharded run is printed.
Scores are checked against torch's.

    python -m benchmarks.bench_e2e_throughput [--batch 256] [--inflight 4] [--duration 10]
                                              [--workers 1,2] [--socket] [--pin-shards]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from benchmarks.common import print_table, run_cli
from benchmarks.served import (
    client_loop,
    closed_loop,
    kserve_body,
    kserve_scores,
    run_torch,
    torch_inputs,
    torch_mlp,
    v1_scores,
)
from recserve.contracts.batch import Batch
from recserve.contracts.manifest import AccessStats, Manifest, TableSpec
from recserve.local.cluster import LocalCluster, cpu_seconds, free_port
from recserve.model.scorer import Model
from recserve.model.workload import Workload, to_samples
from tests.models import manifest_of, write_random

TABLES, ROWS, DIM, BAG = 26, 4_000_000, 64, 20


def write_model(root: Path, rows: int = ROWS) -> Manifest:
    specs = tuple(
        TableSpec(
            f"t{i}",
            rows // TABLES,
            DIM,
            features=(str(i),),
            stats=AccessStats(zipf=1.05, pooling_factor=BAG, bag_size=BAG),
        )
        for i in range(TABLES)
    )
    return write_random(root, manifest_of(specs, 13, name="dlrm", hidden=((512, 256), (512, 256))))


def torch_dlrm(model: Model) -> Any:
    import torch
    from torch import nn

    class DLRM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.ModuleList(
                nn.EmbeddingBag.from_pretrained(torch.from_numpy(np.array(t)), mode="sum")
                for t in model.tables.values()
            )
            self.bot, self.top = torch_mlp(model.dense.bottom), torch_mlp(model.dense.top)
            n = TABLES + 1
            self.li, self.lj = torch.tril_indices(n, n, offset=-1)

        def forward(self, x: Any, bags: list[tuple[Any, Any]]) -> Any:
            x = self.bot(x)
            ly = [e(i, o) for e, (i, o) in zip(self.emb, bags, strict=True)]
            t = torch.cat([x, *ly], dim=1).view(x.shape[0], -1, DIM)
            z = torch.bmm(t, t.transpose(1, 2))[:, self.li, self.lj]
            return self.top(torch.cat([x, z], dim=1))[:, 0]

    return DLRM().eval()


Run = Callable[[str], Coroutine[Any, Any, tuple[float, np.ndarray]]]


def forms(manifest: Manifest, batches: list[Batch], args: argparse.Namespace) -> dict[str, Run]:
    """Per request form, a closed loop against a gateway's URL: samples/s and the scores
    of the first batch."""
    mp = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
    names = [f for f, _ in manifest.features()]
    infer = f"/v2/models/{manifest.name}/infer"
    loop = (args.batch, args.inflight, args.duration)

    def posting(bodies: list[Any], decode: Any, path: str) -> Run:
        return lambda url: closed_loop(url + path, bodies, *loop, decode)

    columns = [
        (b.dense, {f: (b.bags[f].ids, b.bags[f].lengths().astype(np.int32)) for f in names})
        for b in batches
    ]
    samples = [(msgpack.packb({"samples": to_samples(b)}), mp) for b in batches]
    return {
        "KServe binary": posting([kserve_body(manifest, b) for b in batches], kserve_scores, infer),
        "KServe, INT64 ids": posting(
            [kserve_body(manifest, b, wide=True) for b in batches], kserve_scores, infer
        ),
        "recserve.client": lambda url: client_loop(url, columns, *loop),
        "msgpack samples": posting(samples, v1_scores, "/v1/predict"),
    }


STAGES = ("request", "queue_wait", "batch_assembly", "pooling", "dense")


CPU_STAGES = ("parse", "assembly", "pooling", "merge", "dense")


def stage_seconds(url: str) -> dict[str, float]:
    """Seconds summed per gateway stage so far: wall time (its histograms' ``_sum``) by
    stage name, and executor CPU time as ``cpu:<stage>``."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for stage in STAGES:
        found = re.search(rf"^recserve_gateway_{stage}_seconds_sum ([0-9.e+-]+)$", text, re.M)
        out[stage] = float(found.group(1)) if found else 0.0
    for stage in CPU_STAGES:
        found = re.search(
            rf'^recserve_gateway_stage_cpu_seconds_total{{stage="{stage}"}} ([0-9.e+-]+)$',
            text,
            re.M,
        )
        out[f"cpu:{stage}"] = float(found.group(1)) if found else 0.0
    return out


def cpu_now(cluster: LocalCluster) -> np.ndarray:
    """CPU seconds so far: the gateway (its workers too), the shards, this process (the
    client)."""
    shards = [p.pid for p in cluster.shards]
    assert cluster.gateway is not None
    return np.array(
        [cpu_seconds([cluster.gateway.pid]), cpu_seconds(shards) if shards else 0.0,
         time.process_time()]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows", type=int, default=ROWS, help="rows of all tables together")
    parser.add_argument(
        "--workers", default="1,2", help="gateway --workers settings to run, comma-separated"
    )
    parser.add_argument(
        "--socket", action="store_true",
        help="also run the shards with every lookup over the socket (--shm-bytes 0)",
    )  # fmt: skip
    parser.add_argument(
        "--pin-shards", action="store_true",
        help="also run the shards each on one CPU of its own, round robin",
    )  # fmt: skip
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = write_model(root / "m", args.rows)
        plan = root / "plan.json"
        run_cli(["plan", "--model", str(root / "m"), "--shards", str(args.shards),
                 "--strategy", "load", "--out", str(plan)])  # fmt: skip
        model = Model.open(root / "m")
        batches = [Workload(manifest, seed=s).batch(args.batch) for s in range(8)]
        inputs = [torch_inputs(manifest, b) for b in batches]
        base, want = run_torch(torch_dlrm(model), inputs, args.duration)
        rows = [["torch in-process", "-", f"{base:,.0f}", "1.00x"]]
        stages: list[list[str]] = []
        cpus: list[list[str]] = []
        kinds: list[tuple[str, Path | None, tuple[str, ...], bool]] = [
            ("singular", None, (), False),
            (f"{args.shards} shards", plan, (), False),
        ]
        if args.socket:
            kinds.append((f"{args.shards} shards, socket", plan, ("--shm-bytes", "0"), False))
        if args.pin_shards:
            kinds.append((f"{args.shards} shards, pinned", plan, (), True))
        setups = [
            (f"{where}, {n} worker{'s' if n > 1 else ''}", plan_path, n, extra, pin)
            for n in (int(w) for w in args.workers.split(","))
            for where, plan_path, extra, pin in kinds
        ]
        for where, plan_path, workers, extra, pin in setups:
            with LocalCluster(
                root / "m",
                plan=plan_path,
                singular=plan_path is None,
                port=free_port(),
                gateway_args=("--workers", str(workers), *extra),
                pin_shards=pin,
            ) as cluster:
                for form, run in forms(manifest, batches, args).items():
                    cpu, before = cpu_now(cluster), stage_seconds(cluster.url)
                    rate, got = asyncio.run(run(cluster.url))
                    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
                    rows.append([where, form, f"{rate:,.0f}", f"{rate / base:.2f}x"])
                    ms = 1e6 / (rate * args.duration)  # ms per 1k samples, per second
                    gateway, shards, client = (cpu_now(cluster) - cpu) * ms
                    after = stage_seconds(cluster.url)
                    took = {k: (after[k] - before[k]) * ms for k in after}
                    staged = sum(took[f"cpu:{s}"] for s in CPU_STAGES)
                    stages.append(
                        [where, form, f"{gateway + shards:.0f}"]
                        + [f"{took[s]:.0f}" for s in STAGES]
                    )
                    cpus.append(
                        [where, form, f"{gateway:.1f}"]
                        + [f"{took[f'cpu:{s}']:.1f}" for s in CPU_STAGES]
                        + [f"{gateway - staged:.1f}", f"{shards:.1f}", f"{client:.1f}"]
                    )
    print(
        f"\nDLRM_Net shape ({TABLES} tables, {args.rows:,} rows x {DIM}, {BAG} ids a bag), "
        f"requests of {args.batch}, {args.inflight} in flight, client on the same cores"
    )
    print_table(["setup", "form", "samples/s", "vs torch"], rows)
    print(
        "\nwhere the time goes, ms per 1k samples: CPU of all server processes, then wall time "
        "summed per gateway stage (stages of concurrent requests overlap)"
    )
    print_table(["setup", "form", "CPU", *STAGES], stages)
    print(
        "\nCPU, ms per 1k samples: the gateway's processes; of it the executor's stages "
        "(parse, assembly = merging and routing, pooling in-process, merge of shard "
        "replies, dense) and the rest (the event loop: HTTP, shard RPCs, batching; and the "
        "pooling kernel's own threads when it runs more than one: one worker on 2 cores); "
        "the shards; the client"
    )
    print_table(["setup", "form", "gateway", *CPU_STAGES, "loop+rest", "shards", "client"],
                cpus)  # fmt: skip
    ratios = {(r[0], r[1]): float(r[3][:-1]) for r in rows[1:]}
    cols = statistics.median(
        ratios[(w, "recserve.client")] / ratios[(w, "KServe binary")] for w, *_ in setups
    )
    print(f"\nrecserve.client (msgpack columns) against KServe binary: {cols:.2f}x "
          f"(target >= 0.8x)")  # fmt: skip
    for n in (int(w) for w in args.workers.split(",")):
        workers = f"{n} worker{'s' if n > 1 else ''}"
        shm = ratios[(f"{args.shards} shards, {workers}", "KServe binary")]
        if args.socket:
            sock = ratios[(f"{args.shards} shards, socket, {workers}", "KServe binary")]
            print(f"{args.shards} shards, {workers}, KServe binary: shared memory "
                  f"{shm / sock:.2f}x the socket")  # fmt: skip
        if args.pin_shards:
            pinned = ratios[(f"{args.shards} shards, pinned, {workers}", "KServe binary")]
            print(f"{args.shards} shards, {workers}, KServe binary: pinned shards "
                  f"{pinned / shm:.2f}x unpinned")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
