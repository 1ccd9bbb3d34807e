"""What the served-against-PyTorch benchmarks share: torch modules on an artifact's weights,
timed torch loops, request bodies in each form, and a closed-loop HTTP client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import msgpack
import numpy as np
import orjson

from recserve.contracts.batch import Batch
from recserve.contracts.columns import narrow_ids
from recserve.contracts.manifest import Manifest

HEADER = "Inference-Header-Content-Length"
Body = tuple[bytes, dict[str, str]]


def torch_mlp(layers: Sequence[Any], last: str = "") -> Any:
    """``kernels.Linear`` layers as a ``torch.nn.Sequential`` on the same weights; ``last``
    ``"sigmoid"`` appends one (the artifact's final sigmoid lives in its last layer)."""
    import torch
    from torch import nn

    mods: list[Any] = []
    for layer in layers:
        lin = nn.Linear(layer.in_features, layer.out_features)
        lin.weight.data = torch.from_numpy(np.ascontiguousarray(layer.weight))
        lin.bias.data = torch.from_numpy(np.ascontiguousarray(layer.bias))
        mods.append(lin)
        if layer.activation == "relu":
            mods.append(nn.ReLU())
        elif layer.activation == "sigmoid":
            mods.append(nn.Sigmoid())
    if last == "sigmoid" and layers[-1].activation != "sigmoid":
        mods.append(nn.Sigmoid())
    return nn.Sequential(*mods)


def torch_inputs(manifest: Manifest, batch: Batch) -> tuple[Any, list[tuple[Any, Any]]]:
    """A batch as torch tensors: dense, and per feature (ids, offsets) for EmbeddingBag."""
    import torch

    bags = []
    for feature, _ in manifest.features():
        b = batch.bags[feature]
        bags.append((torch.from_numpy(b.ids), torch.from_numpy(b.bounds[:-1].copy())))
    return torch.from_numpy(batch.dense), bags


def run_torch(module: Any, inputs: list[Any], duration: float) -> tuple[float, np.ndarray]:
    """Samples/s of ``module`` scoring ``inputs`` back to back for ``duration`` s under
    ``no_grad``, and its scores of the first input (to check the served ones against)."""
    import torch

    with torch.no_grad():
        first = module(*inputs[0]).numpy()
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration:
            for x, bags in inputs:
                module(x, bags)
                done += x.shape[0]
        return done / (time.perf_counter() - start), first


def kserve_body(manifest: Manifest, batch: Batch, wide: bool = False) -> Body:
    """A KServe v2 infer request in binary tensors, with its headers; ids as INT32 where
    they fit, as ``recserve.client`` sends them (``wide``: INT64 always)."""
    tensors = [("dense", "FP32", batch.dense.astype("<f4"))]
    for feature, _ in manifest.features():
        b = batch.bags[feature]
        ids = b.ids if wide else narrow_ids(b.ids)
        kind = "INT32" if ids.dtype == np.int32 else "INT64"
        tensors.append((f"{feature}.values", kind, ids.astype(ids.dtype.newbyteorder("<"))))
        tensors.append((f"{feature}.lengths", "INT32", b.lengths().astype("<i4")))
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": dtype,
                    "shape": list(arr.shape),
                    "parameters": {"binary_data_size": arr.nbytes},
                }
                for name, dtype, arr in tensors
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    body = head + b"".join(arr.tobytes() for *_, arr in tensors)
    return body, {HEADER: str(len(head)), "Content-Type": "application/octet-stream"}


def kserve_scores(raw: bytes, headers: Any) -> np.ndarray:
    return np.frombuffer(raw[int(headers[HEADER]) :], "<f4")


def v1_scores(raw: bytes, headers: Any) -> np.ndarray:
    return np.asarray(msgpack.unpackb(raw)["scores"], np.float32)


async def closed_loop(
    url: str,
    bodies: Sequence[Body],
    samples: int,
    inflight: int,
    duration: float,
    decode: Callable[[bytes, Any], np.ndarray] = kserve_scores,
) -> tuple[float, np.ndarray]:
    """Samples/s with ``inflight`` requests outstanding for ``duration`` s, and the scores
    of the first body."""
    done = 0

    async def one(session: aiohttp.ClientSession, body: bytes, headers: dict[str, str]) -> Any:
        async with session.post(url, data=body, headers=headers) as r:
            raw = await r.read()
            if r.status != 200:
                raise SystemExit(f"{url}: HTTP {r.status}: {raw[:300]!r}")
            return decode(raw, r.headers)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        first = await one(session, *bodies[0])
        end = time.perf_counter() + duration
        start = time.perf_counter()

        async def worker(k: int) -> None:
            nonlocal done
            while time.perf_counter() < end:
                await one(session, *bodies[k % len(bodies)])
                done += samples
                k += inflight

        await asyncio.gather(*(worker(k) for k in range(inflight)))
    return done / (time.perf_counter() - start), first


async def client_loop(
    url: str,
    columns: Sequence[tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]],
    samples: int,
    inflight: int,
    duration: float,
) -> tuple[float, np.ndarray]:
    """``closed_loop`` through ``recserve.client.AsyncClient``: each call encodes its
    ``(dense, sparse)`` arrays as a user's would, the client's CPU included."""
    from recserve.client import AsyncClient

    done = 0
    async with AsyncClient(url, timeout=60) as client:
        first = await client.predict(*columns[0])
        end = time.perf_counter() + duration
        start = time.perf_counter()

        async def worker(k: int) -> None:
            nonlocal done
            while time.perf_counter() < end:
                await client.predict(*columns[k % len(columns)])
                done += samples
                k += inflight

        await asyncio.gather(*(worker(k) for k in range(inflight)))
    return done / (time.perf_counter() - start), first
