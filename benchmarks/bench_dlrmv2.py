"""DLRM-v2 (DCNv2) served by recserve against the same model run in-process by PyTorch.

A synthetic ``dlrmv2`` model (MLPerf DLRM-v2's shapes, ``--size`` of fp32 tables). The
baseline is a ``DLRM_DCN``-shaped ``torch.nn`` model built here on the artifact's weights
(torchrec itself needs a pinned FBGEMM build): ``EmbeddingBag`` sums, the bottom MLP, the
low-rank cross layers and the top MLP, in eval mode under ``no_grad`` on all cores, scoring
batches of ``--batch`` samples back to back. recserve serves the same batches as KServe v2
binary-tensor requests of ``--batch`` samples, ``--inflight`` in flight from a client on the
same machine, singular and on ``--shards`` shard daemons. Each round runs the three one
after the other; ratios are per round, then the median. Scores are checked against torch's.

First, the interaction alone on DLRM-v2's shapes (26 features of dim 128, batches of 1024):
``kernels.CrossNet`` against torch's formula on the same weights, and against the dot
interaction, on one thread each (the gateway runs one BLAS thread per batch).

    python -m benchmarks.bench_dlrmv2 [--size 4GiB] [--batch 256] [--inflight 4]
                                      [--duration 15] [--rounds 2] [--shards 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import print_table, run_cli
from benchmarks.served import (
    Body,
    closed_loop,
    kserve_body,
    run_torch,
    torch_inputs,
    torch_mlp,
)
from recserve.contracts.manifest import read_manifest
from recserve.local.cluster import LocalCluster, free_port
from recserve.model.scorer import Model
from recserve.model.workload import Workload


def torch_model(model: Model) -> Any:
    """The artifact's weights in a DLRM_DCN-shaped torch module (tables copied into RAM)."""
    import torch
    from torch import nn

    dense = model.dense

    class DLRMv2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tables = nn.ModuleList(
                nn.EmbeddingBag.from_pretrained(
                    torch.from_numpy(np.array(model.tables[t.name])), mode="sum"
                )
                for t in model.manifest.tables
            )
            self.bottom = torch_mlp(dense.bottom)
            cross = dense.interaction.layers  # type: ignore[union-attr]
            self.v = [torch.from_numpy(np.ascontiguousarray(c.v)) for c in cross]
            self.w = [torch.from_numpy(np.ascontiguousarray(c.w)) for c in cross]
            self.b = [torch.from_numpy(np.ascontiguousarray(c.bias)) for c in cross]
            self.top = torch_mlp(dense.top, "sigmoid")

        def forward(self, x: Any, bags: list[tuple[Any, Any]]) -> Any:
            pooled = [t(ids, offsets) for t, (ids, offsets) in zip(self.tables, bags, strict=True)]
            x0 = torch.cat([self.bottom(x), *pooled], dim=1)
            xl = x0
            for v, w, b in zip(self.v, self.w, self.b, strict=True):
                xl = x0 * ((xl @ v.T) @ w.T + b) + xl
            return self.top(xl)[:, 0]

    return DLRMv2().eval()


def serve(
    model: Path, plan: Path | None, args: argparse.Namespace, bodies: list[Body]
) -> tuple[float, np.ndarray]:
    name = read_manifest(model).name
    with LocalCluster(
        model,
        plan=plan,
        singular=plan is None,
        port=free_port(),
        gateway_args=("--timeout-ms", "30000", *args.gateway_args.split()),
    ) as cluster:
        url = f"{cluster.url}/v2/models/{name}/infer"
        return asyncio.run(closed_loop(url, bodies, args.batch, args.inflight, args.duration))


def bench_interaction(model: Model, batch: int, reps: int) -> list[list[str]]:
    """Milliseconds per batch of the cross network (ours, torch's) and the dot interaction."""
    import torch
    from threadpoolctl import threadpool_limits

    from kernels import Interaction

    cross = model.dense.interaction
    features = sum(1 for _ in model.manifest.features())
    dim = model.manifest.embedding_dim
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, dim)).astype(np.float32)
    pooled = rng.standard_normal((batch, features, dim)).astype(np.float32)
    layers = cross.layers  # type: ignore[union-attr]
    tv = [torch.from_numpy(np.ascontiguousarray(c.v)) for c in layers]
    tw = [torch.from_numpy(np.ascontiguousarray(c.w)) for c in layers]
    tb = [torch.from_numpy(np.ascontiguousarray(c.bias)) for c in layers]
    tx, tp = torch.from_numpy(x), torch.from_numpy(pooled)

    def torch_cross() -> Any:
        x0 = torch.cat([tx, tp.reshape(batch, -1)], dim=1)
        xl = x0
        for v, w, b in zip(tv, tw, tb, strict=True):
            xl = x0 * ((xl @ v.T) @ w.T + b) + xl
        return xl

    dot = Interaction("dot")
    contenders = {
        "CrossNet (ours)": lambda: cross(x, pooled),
        "cross net (torch)": torch_cross,
        "dot interaction (ours)": lambda: dot(x, pooled),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1, "blas"), torch.no_grad():
            for _ in range(reps):
                for name, fn in contenders.items():
                    fn()
                    start = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(threads)
    ours = statistics.median(times["CrossNet (ours)"])
    return [
        [name, f"{statistics.median(t):.1f}", f"{statistics.median(t) / ours:.2f}x"]
        for name, t in times.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4GiB")
    parser.add_argument("--batch", type=int, default=256, help="samples per request / batch")
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per contender")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--reps", type=int, default=7, help="of the interaction alone")
    parser.add_argument("--gateway-args", default="", help="extra gateway flags, one string")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = root / "m"
        run_cli(["synth", "--profile", "dlrmv2", "--size", args.size, "--out", str(model_dir)])
        plan = root / "plan.json"
        run_cli(
            ["plan", "--model", str(model_dir), "--shards", str(args.shards), "--out", str(plan)]
        )
        model = Model.open(model_dir)
        manifest = model.manifest
        print(f"\ninteraction alone, batches of 1024, one thread each ({args.reps} reps)")
        print_table(["interaction", "ms", "vs ours"], bench_interaction(model, 1024, args.reps))
        work = Workload(manifest, seed=9)
        batches = [work.batch(args.batch) for _ in range(16)]
        bodies = [kserve_body(manifest, b) for b in batches]
        module = torch_model(model)
        inputs = [torch_inputs(manifest, b) for b in batches]
        rates: dict[str, list[float]] = {"torch in-process": [], "singular": [], "sharded": []}
        for _ in range(args.rounds):
            rate, want = run_torch(module, inputs, args.duration)
            rates["torch in-process"].append(rate)
            for label, where in (("singular", None), ("sharded", plan)):
                rate, got = serve(model_dir, where, args, bodies)
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
                rates[label].append(rate)
    base = rates["torch in-process"]
    rows = [
        [
            label,
            f"{statistics.median(r):,.0f}",
            f"{statistics.median(a / b for a, b in zip(r, base, strict=True)):.2f}x",
        ]
        for label, r in rates.items()
    ]
    print(
        f"\ndlrmv2 {args.size}: {len(manifest.tables)} tables, dim {manifest.embedding_dim}, "
        f"3 cross layers rank 512; batches of {args.batch}; recserve over KServe v2 binary, "
        f"{args.inflight} in flight, client on the same cores; {args.rounds} rounds"
    )
    print_table(["contender", "samples/s", "vs torch"], rows)
    singular = statistics.median(a / b for a, b in zip(rates["singular"], base, strict=True))
    print(
        f"\ntarget: singular >= 1.0x torch in-process: {singular:.2f}x "
        f"{'met' if singular >= 1.0 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
