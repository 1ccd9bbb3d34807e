"""The columnar form of a scoring request: what every layer passes around.

A :class:`Batch` holds the dense inputs and, per feature, a :class:`Bags` of ids. Parsers
(``recserve.contracts.samples`` for the JSON/msgpack samples, the gateway's KServe tensors)
produce it after checking every value; the poolers consume it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Bags:
    """All bags of one feature: ``ids[bounds[b]:bounds[b+1]]`` is bag ``b``.

    Without ``index`` bag ``b`` belongs to sample ``b``. With it, sample ``s`` uses bag
    ``index[s]``: a ranking request's context feature is one bag shared by every candidate,
    looked up and pooled once.
    """

    ids: np.ndarray  # int64 [n] (int32 as a request sent them, when every id fits)
    bounds: np.ndarray  # int64 [bags + 1]
    weights: np.ndarray | None = None  # float32 [n]
    index: np.ndarray | None = None  # intp [B]

    @property
    def n_bags(self) -> int:
        return int(self.bounds.size - 1)

    def lengths(self) -> np.ndarray:
        return self.bounds[1:] - self.bounds[:-1]  # np.diff costs ~4x as much a call


@dataclass(frozen=True)
class Batch:
    dense: np.ndarray  # float32 [B, dense_width]
    bags: dict[str, Bags]  # every feature of the model, in manifest order

    @property
    def size(self) -> int:
        return int(self.dense.shape[0])


def concat_weights(weights: Sequence[np.ndarray | None], sizes: Sequence[int]) -> np.ndarray | None:
    """The weights of several id arrays (``sizes`` ids each) as one float32 array, or None
    when none is weighted; ids without weights weigh 1."""
    if all(w is None for w in weights):
        return None
    return np.concatenate(
        [
            np.ones(n, np.float32) if w is None else np.asarray(w, np.float32)
            for w, n in zip(weights, sizes, strict=True)
        ]
    )
