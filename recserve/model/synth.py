"""Synthetic DLRM-like models with production-like shape (``recserve synth``).

The three profiles follow the qualitative picture of production models drawn by Lui et al.
(ISPASS 2021): many embedding tables whose sizes span orders of magnitude, a ``user`` net
and an ``item`` net, heavy pooling on user-history features and light pooling on item
features, skewed (Zipf) access. The figures are our own parameterisation, not the paper's:

- ``drm1``: balanced - 48 tables (24 user, 24 item), dim 64, sizes log-uniform over 10^2-10^7
  relative, user pooling 10-100, item pooling 1-10.
- ``drm2``: many small features - 64 tables (40 user, 24 item), dim 32, sizes log-uniform over
  10^2-10^6, user pooling 5-80, item pooling 1-8. The demo's model.
- ``drm3``: one dominant table - 24 tables (12 user, 12 item), dim 128; one user table holds
  ~60 % of all bytes (it must be split by rows across shards), the rest log-uniform over
  10^2-10^6; user pooling 1-40, item pooling 1-5.
- ``dlrmv2``: MLPerf Inference's DLRM-v2 (torchrec ``DLRM_DCN``) shapes: 26 tables with the
  Criteo 1TB row counts, dim 128, fixed multi-hot bag sizes, bottom MLP 13-512-256-128, 3
  low-rank (512) cross layers over the 3456-wide concatenation, top 1024-1024-512-256-1.
  The full model is ~104 GB of fp32 tables; ``--size`` scales the large tables down in
  proportion and keeps the small ones as they are.

Tables are streamed to disk chunk by chunk, so a model of any size needs ~100 MiB of memory.
Output is deterministic for a seed. The last layer is calibrated on sampled traffic so
scores spread around a 10 % click rate instead of saturating at 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import kernels
from kernels import DenseNet, Linear
from recserve.contracts.batch import Batch
from recserve.contracts.errors import ConfigError
from recserve.contracts.manifest import (
    AccessStats,
    DenseSpec,
    InteractionSpec,
    Manifest,
    MLPSpec,
    TableSpec,
)
from recserve.model.artifact import (
    ArtifactWriter,
    chunk_rows,
    dense_weights,
    interaction_kernel,
)
from recserve.model.workload import Workload

MIN_ROWS = 16
CALIB_SAMPLES = 256
TARGET_LOGIT_MEAN = math.log(0.1 / 0.9)  # a 10 % click rate
TARGET_LOGIT_STD = 1.0


@dataclass(frozen=True)
class Profile:
    name: str
    user_tables: int
    item_tables: int
    dim: int
    log10_rows: tuple[float, float]
    user_pooling: tuple[float, float]
    item_pooling: tuple[float, float]
    zipf: tuple[float, float]
    dense_width: int
    bottom_hidden: tuple[int, ...]
    top_hidden: tuple[int, ...]
    dominant_share: float = 0.0  # share of bytes in one user table (drm3)
    rows: tuple[int, ...] = ()  # exact row counts (dlrmv2) instead of random sizes
    bag_sizes: tuple[int, ...] = ()  # fixed multi-hot sizes, one per table
    cross: tuple[int, int] = (0, 0)  # (layers, rank): a dcn interaction instead of dot


DLRMV2_ROWS = (
    *(40_000_000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40_000_000, 3067956),
    *(405282, 10, 2209, 11938, 155, 4, 976, 14, 40_000_000, 40_000_000, 40_000_000),
    *(590152, 12973, 108, 36),
)
DLRMV2_BAGS = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
LARGE_ROWS = 100_000  # dlrmv2 tables at least this large are scaled by --size


PROFILES = {
    "drm1": Profile(
        "drm1", 24, 24, 64, (2.0, 7.0), (10, 100), (1, 10), (0.9, 1.2), 64, (256,), (512, 256)
    ),
    "drm2": Profile(
        "drm2", 40, 24, 32, (2.0, 6.0), (5, 80), (1, 8), (0.9, 1.2), 32, (128,), (256, 128)
    ),
    "drm3": Profile(
        "drm3",
        12,
        12,
        128,
        (2.0, 6.0),
        (1, 40),
        (1, 5),
        (0.8, 1.1),
        32,
        (256,),
        (512, 256),
        dominant_share=0.6,
    ),
    "dlrmv2": Profile(
        "dlrmv2",
        0,
        26,
        128,
        (0.0, 0.0),
        (1, 1),
        (1, 1),
        (1.05, 1.05),
        13,
        (512, 256),
        (1024, 1024, 512, 256),
        rows=DLRMV2_ROWS,
        bag_sizes=DLRMV2_BAGS,
        cross=(3, 512),
    ),
}


def plan_tables(profile: Profile, size_bytes: int, rng: np.random.Generator) -> list[TableSpec]:
    """Table specs whose bytes add up to ``size_bytes`` (within rounding)."""
    if profile.rows:
        return _explicit_tables(profile, size_bytes)
    n = profile.user_tables + profile.item_tables
    row_bytes = 4 * profile.dim
    if size_bytes < n * MIN_ROWS * row_bytes:
        raise ConfigError(
            f"--size {size_bytes} B is too small for {n} tables of dim "
            f"{profile.dim}; use at least {n * MIN_ROWS * row_bytes} B"
        )
    weights = 10.0 ** rng.uniform(*profile.log10_rows, n)
    if profile.dominant_share:
        rest = weights[1:].sum()
        weights[0] = rest * profile.dominant_share / (1 - profile.dominant_share)
    rows = np.maximum(MIN_ROWS, np.floor(weights / weights.sum() * size_bytes / row_bytes))
    rows = rows.astype(np.int64)
    # Give the rounding remainder to the largest table so the total is as asked.
    rows[int(np.argmax(rows))] += max(0, size_bytes // row_bytes - int(rows.sum()))
    specs = []
    for i in range(n):
        user = i < profile.user_tables
        pool = profile.user_pooling if user else profile.item_pooling
        pf = float(np.exp(rng.uniform(math.log(pool[0]), math.log(pool[1]))))
        zipf = float(rng.uniform(*profile.zipf))
        net = "user" if user else "item"
        idx = i if user else i - profile.user_tables
        name = f"{net}_{idx:03d}"
        specs.append(
            TableSpec(
                name,
                int(rows[i]),
                profile.dim,
                features=(name,),
                net=net,
                stats=AccessStats(zipf=round(zipf, 3), pooling_factor=round(pf, 2)),
            )
        )
    return specs


def _explicit_tables(profile: Profile, size_bytes: int) -> list[TableSpec]:
    """The profile's tables with the large ones scaled so the total is ``size_bytes`` (at
    most the full size); multi-hot features keep their fixed bag sizes."""
    row_bytes = 4 * profile.dim
    large = [r >= LARGE_ROWS for r in profile.rows]
    small_bytes = sum(r for r, big in zip(profile.rows, large, strict=True) if not big) * row_bytes
    large_bytes = sum(r for r, big in zip(profile.rows, large, strict=True) if big) * row_bytes
    least = small_bytes + sum(large) * MIN_ROWS * row_bytes
    if size_bytes < least:
        raise ConfigError(f"--size {size_bytes} B is too small for {profile.name}; use >= {least}")
    scale = min(1.0, (size_bytes - small_bytes) / large_bytes)
    specs = []
    for i, (rows, big, bag) in enumerate(zip(profile.rows, large, profile.bag_sizes, strict=True)):
        name = f"cat_{i}"
        specs.append(
            TableSpec(
                name,
                max(MIN_ROWS, int(rows * scale)) if big else rows,
                profile.dim,
                features=(name,),
                stats=AccessStats(zipf=profile.zipf[0], pooling_factor=float(bag), bag_size=bag),
            )
        )
    return specs


def init_cross(
    rng: np.random.Generator, width: int, layers: int, rank: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Cross layers with Xavier-normal V and W (torchrec's initialisation) and zero bias."""
    std = math.sqrt(2.0 / (width + rank))
    return [
        (
            rng.normal(0, std, (rank, width)).astype(np.float32),
            rng.normal(0, std, (width, rank)).astype(np.float32),
            np.zeros(width, np.float32),
        )
        for _ in range(layers)
    ]


def init_layers(rng: np.random.Generator, sizes: list[int], acts: list[str]) -> list[Linear]:
    layers = []
    for fan_in, fan_out, act in zip(sizes, sizes[1:], acts, strict=False):
        std = math.sqrt(2.0 / (fan_in + fan_out))
        w = rng.normal(0, std, (fan_out, fan_in)).astype(np.float32)
        b = rng.normal(0, 0.01, fan_out).astype(np.float32)
        layers.append(Linear(w, b, act))  # type: ignore[arg-type]
    return layers


def table_chunks(spec: TableSpec, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Rows uniform in +-1/sqrt(dim), in chunks, so pooled dot products stay O(1)."""
    step = chunk_rows(spec)
    bound = np.float32(1.0 / math.sqrt(spec.dim))
    for start in range(0, spec.rows, step):
        block = rng.random((min(step, spec.rows - start), spec.dim), dtype=np.float32)
        block *= 2 * bound
        block -= bound
        yield block


def synthesize(
    profile_name: str,
    size_bytes: int,
    out: Path | str,
    *,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Manifest:
    profile = PROFILES.get(profile_name)
    if profile is None:
        raise ConfigError(f"unknown profile {profile_name!r}; choose from {', '.join(PROFILES)}")
    seeds = np.random.SeedSequence(seed).spawn(3)
    layout_rng, dense_rng, calib_rng = (np.random.default_rng(s) for s in seeds)
    specs = plan_tables(profile, size_bytes, layout_rng)
    dim, n_feat = profile.dim, len(specs)
    bottom_sizes = [profile.dense_width, *profile.bottom_hidden, dim]
    layers, rank = profile.cross
    inter = (
        InteractionSpec("dcn", layers=layers, rank=rank)
        if layers
        else InteractionSpec("dot", "dlrm_tril", False)
    )
    top_in = inter.output_width(dim, n_feat)
    top_sizes = [top_in, *profile.top_hidden, 1]
    bottom_acts = ["relu"] * (len(bottom_sizes) - 1)
    top_acts = ["relu"] * (len(top_sizes) - 2) + ["sigmoid"]
    manifest = Manifest(
        profile.name,
        f"synth-{seed}",
        profile.dense_width,
        tuple(specs),
        DenseSpec(
            MLPSpec(tuple(bottom_sizes), tuple(bottom_acts)),
            inter,
            MLPSpec(tuple(top_sizes), tuple(top_acts)),
        ),
    )
    # Calibration traffic is drawn before writing, and the rows it needs are picked out of
    # each chunk as it streams past: no table is read back or mapped, so memory stays flat.
    calib = Workload(manifest, seed=int(calib_rng.integers(2**31))).batch(CALIB_SAMPLES)
    picker = RowPicker(manifest, calib)
    writer = ArtifactWriter(out, overwrite=overwrite)
    total = manifest.table_bytes
    table_seeds = np.random.SeedSequence([seed, 1]).spawn(n_feat)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"synth {profile.name}",
        disable=None if progress is None else not progress,
    )
    with bar:
        for spec, tseed in zip(specs, table_seeds, strict=True):

            def advance(rows: int, row_bytes: int = spec.row_bytes) -> None:
                bar.update(rows * row_bytes)

            chunks = picker.watch(spec, table_chunks(spec, np.random.default_rng(tseed)))
            writer.write_table(spec, chunks, advance)
    bottom = init_layers(dense_rng, bottom_sizes, bottom_acts)
    top = init_layers(dense_rng, top_sizes, [*top_acts[:-1], "none"])
    cross = init_cross(dense_rng, top_in, layers, rank) if layers else []
    weights = dense_weights(
        [(x.weight, x.bias) for x in bottom], [(x.weight, x.bias) for x in top], cross
    )
    net = DenseNet(tuple(bottom), interaction_kernel(inter, weights, top_in), tuple(top))
    top[-1] = calibrate(net, picker.pooled())
    mlps = [(x.weight, x.bias) for x in bottom], [(x.weight, x.bias) for x in top]
    writer.write_dense(dense_weights(*mlps, cross))
    return writer.finish(manifest)


class RowPicker:
    """Keeps the rows a sample batch needs while tables stream by, then pools them."""

    def __init__(self, manifest: Manifest, batch: Batch) -> None:
        self.manifest = manifest
        self.batch = batch
        self.needed: dict[str, np.ndarray] = {}
        for feature, spec in manifest.features():
            ids = batch.bags[feature].ids
            prev = self.needed.get(spec.name, np.zeros(0, np.int64))
            self.needed[spec.name] = np.union1d(prev, ids)
        self.rows = {
            name: np.zeros((len(ids), manifest.embedding_dim), np.float32)
            for name, ids in self.needed.items()
        }

    def watch(self, spec: TableSpec, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        needed, rows, start = self.needed[spec.name], self.rows[spec.name], 0
        for block in chunks:
            lo, hi = np.searchsorted(needed, [start, start + len(block)])
            rows[lo:hi] = block[needed[lo:hi] - start]
            start += len(block)
            yield block

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """(dense, pooled ``[B, F, dim]``) of the sample batch, from the kept rows."""
        out = []
        for feature, spec in self.manifest.features():
            bags = self.batch.bags[feature]
            local = np.searchsorted(self.needed[spec.name], bags.ids)
            out.append(
                kernels.pool(
                    self.rows[spec.name],
                    local,
                    bags.bounds,
                    mode=spec.pooling,  # type: ignore[arg-type]
                    include_last_offset=True,
                )
            )
        return self.batch.dense, np.stack(out, axis=1)


def calibrate(net: DenseNet, sample: tuple[np.ndarray, np.ndarray]) -> Linear:
    """Rescale the last layer so logits on sampled traffic have the target mean and std."""
    logits = net.forward(*sample).astype(np.float64)
    std = float(logits.std()) or 1.0
    last = net.top[-1]
    scale = TARGET_LOGIT_STD / std
    weight = (last.weight * scale).astype(np.float32)
    bias = ((last.bias - logits.mean()) * scale + TARGET_LOGIT_MEAN).astype(np.float32)
    return Linear(weight, bias, "sigmoid")
