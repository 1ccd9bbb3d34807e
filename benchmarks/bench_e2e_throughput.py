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
``recserve up --pin-shards``); the ratio to the first sharded run is printed. With
``--pin-workers`` every setup also runs with its gateway workers pinned (``gateway
--pin-workers``), and the ratios of the pinned setups are printed too.
Scores are checked against torch's. Every setup's cluster runs from the start; each of
``--rounds`` rounds runs torch, then every setup (in rotating order) in every form, and the
tables print medians over the rounds, ratios being medians of each round's: the host's
speed drifts within minutes, and one pass per setup compared setups of different minutes.

    python -m benchmarks.bench_e2e_throughput [--batch 256] [--inflight 4] [--duration 10]
                                              [--rounds 3] [--workers 1,2] [--socket]
                                              [--pin-shards] [--pin-workers]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import re
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from benchmarks.common import median_ratio, print_table, rotated, run_cli, shard_stats
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
from shardd.metrics import LOOKUP_STAGES
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


def shard_stage_seconds(cluster: LocalCluster) -> dict[str, float]:
    """CPU seconds the cluster's shards took so far per lookup stage (``shardd.metrics``)."""
    out = dict.fromkeys(LOOKUP_STAGES, 0.0)
    if cluster.singular:
        return out
    for shard in cluster.plan.shards:
        for endpoint in shard.endpoints:
            got = shard_stats(endpoint).get("stage_cpu_seconds") or {}
            for stage in LOOKUP_STAGES:
                out[stage] += float(got.get(stage, 0.0))
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
    parser.add_argument("--rounds", type=int, default=3)
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
    parser.add_argument(
        "--pin-workers", action="store_true",
        help="also run every setup with its gateway workers pinned (gateway --pin-workers)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        manifest = write_model(root / "m", args.rows)
        plan = root / "plan.json"
        run_cli(["plan", "--model", str(root / "m"), "--shards", str(args.shards),
                 "--strategy", "load", "--out", str(plan)])  # fmt: skip
        model = Model.open(root / "m")
        batches = [Workload(manifest, seed=s).batch(args.batch) for s in range(8)]
        inputs = [torch_inputs(manifest, b) for b in batches]
        module = torch_dlrm(model)
        kinds: list[tuple[str, Path | None, tuple[str, ...], bool]] = [
            ("singular", None, (), False),
            (f"{args.shards} shards", plan, (), False),
        ]
        if args.socket:
            kinds.append((f"{args.shards} shards, socket", plan, ("--shm-bytes", "0"), False))
        if args.pin_shards:
            kinds.append((f"{args.shards} shards, pinned", plan, (), True))
        if args.pin_workers:
            kinds += [(f"{where}, pinned workers", plan_path, (*extra, "--pin-workers"), pin)
                      for where, plan_path, extra, pin in kinds]  # fmt: skip
        setups = [
            (f"{where}, {n} worker{'s' if n > 1 else ''}", plan_path, n, extra, pin)
            for n in (int(w) for w in args.workers.split(","))
            for where, plan_path, extra, pin in kinds
        ]
        # Every setup's cluster up at once (idle, each costs ~1 % of a core), so the rounds
        # can alternate them with torch: the host's speed drifts within minutes.
        clusters = {}
        for where, plan_path, workers, extra, pin in setups:
            clusters[where] = stack.enter_context(
                LocalCluster(
                    root / "m",
                    plan=plan_path,
                    singular=plan_path is None,
                    port=free_port(),
                    gateway_args=("--workers", str(workers), *extra),
                    pin_shards=pin,
                )
            )
        runs = forms(manifest, batches, args)
        base: list[float] = []
        got: dict[tuple[str, str], list[Measure]] = {}
        for r in range(args.rounds):
            rate, want = run_torch(module, inputs, args.duration)
            base.append(rate)
            for where in rotated([*clusters], r):
                for form, run in runs.items():
                    m = measure(clusters[where], run, args.duration)
                    np.testing.assert_allclose(m.scores, want, rtol=1e-4, atol=1e-5)
                    got.setdefault((where, form), []).append(m)
    report(args, setups, base, got)
    return 0


@dataclass(frozen=True)
class Measure:
    """One closed loop against one gateway: samples/s, its scores of the first batch, and
    per 1k samples the CPU ms of the gateway, the shards and the client, and the gateway's
    stage seconds (``stage_seconds``'s keys)."""

    rate: float
    scores: np.ndarray
    cpu: np.ndarray  # gateway, shards, client
    stages: dict[str, float]
    shard_stages: dict[str, float]  # the shards' CPU per lookup stage (LOOKUP_STAGES)


def measure(cluster: LocalCluster, run: Run, duration: float) -> Measure:
    cpu, before = cpu_now(cluster), stage_seconds(cluster.url)
    shards_before = shard_stage_seconds(cluster)
    rate, scores = asyncio.run(run(cluster.url))
    ms = 1e6 / (rate * duration)  # ms per 1k samples, per second
    after = stage_seconds(cluster.url)
    took = {k: (after[k] - before[k]) * ms for k in after}
    shards_took = {k: (v - shards_before[k]) * ms for k, v in shard_stage_seconds(cluster).items()}
    return Measure(rate, scores, (cpu_now(cluster) - cpu) * ms, took, shards_took)


def report(
    args: argparse.Namespace,
    setups: list[tuple[str, Path | None, int, tuple[str, ...], bool]],
    base: list[float],
    got: dict[tuple[str, str], list[Measure]],
) -> None:
    """Medians over the rounds; ratios are medians of each round's ratio (to that round's
    torch, or between two setups of that round)."""
    med = statistics.median

    def ratio(key: tuple[str, str], to: tuple[str, str] | None = None) -> float:
        against = base if to is None else [m.rate for m in got[to]]
        return median_ratio([m.rate for m in got[key]], against)

    rows = [["torch in-process", "-", f"{med(base):,.0f}", "1.00x"]]
    stages: list[list[str]] = []
    cpus: list[list[str]] = []
    on_shards: list[list[str]] = []
    for (where, form), ms in got.items():
        rows.append([where, form, f"{med(m.rate for m in ms):,.0f}",
                     f"{ratio((where, form)):.2f}x"])  # fmt: skip
        gateway, shards, client = (med(m.cpu[i] for m in ms) for i in range(3))
        took = {k: med(m.stages[k] for m in ms) for k in ms[0].stages}
        staged = sum(took[f"cpu:{s}"] for s in CPU_STAGES)
        stages.append([where, form, f"{gateway + shards:.0f}"] + [f"{took[s]:.0f}" for s in STAGES])
        cpus.append(
            [where, form, f"{gateway:.1f}"]
            + [f"{took[f'cpu:{s}']:.1f}" for s in CPU_STAGES]
            + [f"{gateway - staged:.1f}", f"{shards:.1f}", f"{client:.1f}"]
        )
        if shards:
            split = {k: med(m.shard_stages[k] for m in ms) for k in LOOKUP_STAGES}
            on_shards.append(
                [where, form, f"{shards:.1f}"]
                + [f"{split[k]:.1f}" for k in LOOKUP_STAGES]
                + [f"{shards - sum(split.values()):.1f}"]
            )
    print(
        f"\nDLRM_Net shape ({TABLES} tables, {args.rows:,} rows x {DIM}, {BAG} ids a bag), "
        f"requests of {args.batch}, {args.inflight} in flight, client on the same cores; "
        f"medians of {args.rounds} rounds, ratios per round"
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
    if on_shards:
        print(
            "\nthe shards, CPU ms per 1k samples: all of it; of it their lookups' stages "
            "(decode: header and arrays read and checked; prepare: kernel calls planned; pool: "
            "the kernel, its calling thread; reply: answered, counted, sent) and the rest "
            "(event loops and ZeroMQ: receiving, waking up; a kernel's other threads)"
        )
        print_table(["setup", "form", "shards", *LOOKUP_STAGES, "rest"], on_shards)
    binary = "KServe binary"
    cols = med(ratio((w, "recserve.client"), (w, binary)) for w, *_ in setups)
    print(f"\nrecserve.client (msgpack columns) against KServe binary: {cols:.2f}x "
          f"(target >= 0.8x)")  # fmt: skip

    def cpu(key: tuple[str, str], to: tuple[str, str]) -> float:
        """Server CPU per sample (gateway and shards) against ``to``'s, round by round."""
        return median_ratio(*([float(m.cpu[0] + m.cpu[1]) for m in got[k]] for k in (key, to)))

    for n, tag in itertools.product(
        (int(w) for w in args.workers.split(",")), ["", *([", pinned workers"] * args.pin_workers)]
    ):
        workers = f"{n} worker{'s' if n > 1 else ''}"
        one, sharded = (
            (f"singular{tag}, {workers}", binary),
            (f"{args.shards} shards{tag}, {workers}", binary),
        )
        print(f"{workers}{tag}, KServe binary: singular {ratio(one):.2f}x torch (target >= "
              f"1.0x), {args.shards} shards {ratio(sharded):.2f}x torch (target >= 0.8x), CPU "
              f"per sample {cpu(sharded, one):.2f}x singular's (target <= 1.15x)")  # fmt: skip
        if tag:
            for where in ("singular", f"{args.shards} shards"):
                key, unpinned = (
                    (f"{where}{tag}, {workers}", binary),
                    (f"{where}, {workers}", binary),
                )
                print(f"  {key[0]}: {ratio(key, unpinned):.2f}x the samples/s unpinned")
        if args.socket:
            sock = (f"{args.shards} shards, socket{tag}, {workers}", binary)
            print(f"{args.shards} shards{tag}, {workers}, KServe binary: shared memory "
                  f"{ratio(sharded, sock):.2f}x the socket")  # fmt: skip
        if args.pin_shards:
            pinned = (f"{args.shards} shards, pinned{tag}, {workers}", binary)
            print(f"{args.shards} shards{tag}, {workers}, KServe binary: pinned shards "
                  f"{ratio(pinned, sharded):.2f}x unpinned, {ratio(pinned):.2f}x torch, CPU "
                  f"per sample {cpu(pinned, one):.2f}x singular's")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
