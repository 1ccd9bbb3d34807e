"""Synthetic request traffic drawn from a model's access statistics.

Per table, ids follow a bounded Zipf law with the manifest's exponent (rank ``r`` has weight
``(r + 1) ** -s``), and ranks are scattered over the table by a fixed bijection so the hot
rows are not simply the first ones (which would flatter the cache). Bag lengths are Poisson
around the table's mean pooling factor, or a fixed multi-hot ``bag_size`` where the manifest
records one (DLRM-v2). Used by quantization reports, benchmarks and loadgen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from recserve.contracts.batch import Bags, Batch
from recserve.contracts.manifest import Manifest, TableSpec

DEFAULT_ZIPF = 1.05
DEFAULT_POOLING = 1.0
_SCATTER = 2_654_435_761  # a prime; rank * P mod rows is a bijection when rows % P != 0


def zipf_ranks(rng: np.random.Generator, n: int, rows: int, s: float) -> np.ndarray:
    """``n`` ranks in ``[0, rows)`` from the continuous approximation of a bounded Zipf law.

    Inverts the CDF of ``x ** -s`` on ``[1, rows + 1)``; exact enough for traffic shaping and
    O(1) per draw, unlike building a table of ``rows`` probabilities.
    """
    u = rng.random(n)
    top = float(rows + 1)
    if abs(s - 1.0) < 1e-9:
        x = np.power(top, u)
    elif s == 0:
        x = 1.0 + u * (top - 1.0)
    else:
        a = 1.0 - s
        x = np.power(1.0 + u * (top**a - 1.0), 1.0 / a)
    return np.minimum(np.floor(x).astype(np.int64) - 1, rows - 1)


def scatter(ranks: np.ndarray, rows: int) -> np.ndarray:
    """Map ranks to row ids with a fixed bijection of ``[0, rows)``."""
    mult = _SCATTER % rows
    if rows >= 2**31 or mult == 0 or np.gcd(mult, rows) != 1:
        return ranks
    return ((ranks.astype(np.uint64) * np.uint64(mult)) % np.uint64(rows)).astype(np.int64)


@dataclass(frozen=True)
class TableTraffic:
    rows: int
    zipf: float
    pooling: float
    bag_size: int | None = None  # fixed multi-hot size instead of Poisson lengths

    @classmethod
    def of(cls, spec: TableSpec) -> TableTraffic:
        return cls.from_stats(spec.rows, spec.stats.to_dict())

    @classmethod
    def from_stats(cls, rows: int, stats: Mapping[str, float]) -> TableTraffic:
        """From the ``stats`` of a manifest table or of a ``GET /v1/model`` feature."""
        fixed = stats.get("bag_size")
        return cls(
            rows,
            float(stats.get("zipf", DEFAULT_ZIPF)),
            float(stats.get("pooling_factor", DEFAULT_POOLING)),
            None if fixed is None else int(fixed),
        )

    def bags(self, rng: np.random.Generator, n_bags: int) -> tuple[np.ndarray, np.ndarray]:
        if self.bag_size is None:
            lengths = rng.poisson(self.pooling, n_bags)
        else:
            lengths = np.full(n_bags, self.bag_size, np.int64)
        bounds = np.zeros(n_bags + 1, np.int64)
        np.cumsum(lengths, out=bounds[1:])
        ids = scatter(zipf_ranks(rng, int(bounds[-1]), self.rows, self.zipf), self.rows)
        return ids, bounds


class Workload:
    def __init__(self, manifest: Manifest, seed: int = 0) -> None:
        self.manifest = manifest
        self.rng = np.random.default_rng(seed)
        self.traffic = {f: TableTraffic.of(t) for f, t in manifest.features()}

    def batch(self, n: int) -> Batch:
        """``n`` samples as arrays, for in-process scoring and benchmarks."""
        dense = self.rng.standard_normal((n, self.manifest.dense_width)).astype(np.float32)
        bags = {}
        for feature, traffic in self.traffic.items():
            ids, bounds = traffic.bags(self.rng, n)
            bags[feature] = Bags(ids, bounds)
        return Batch(dense, bags)

    def samples(self, n: int) -> list[dict[str, Any]]:
        """``n`` samples in the JSON request form."""
        return to_samples(self.batch(n))


def to_samples(batch: Batch) -> list[dict[str, Any]]:
    dense = batch.dense.astype(float).tolist()
    out: list[dict[str, Any]] = [{"dense": d, "sparse": {}} for d in dense]
    for feature, bags in batch.bags.items():
        ids = bags.ids.tolist()
        b = bags.bounds.tolist()
        for i, sample in enumerate(out):
            sample["sparse"][feature] = ids[b[i] : b[i + 1]]
    return out
