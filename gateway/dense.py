"""The dense weights a gateway scores with, by model version.

An online update may carry new dense weights (``POST /v1/updates``); they take effect at the
update's version, like its rows. A batch reads one version on every shard and scores with
the dense weights of that version: the newest set that came at or before it. Sets are kept
while a batch may still read a version they serve (``VERSIONS_KEPT``, as the shards keep).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np

from kernels.dense import DenseNet
from recserve.rpc.wire import VERSIONS_KEPT


class DenseVersions:
    def __init__(self, net: DenseNet, weights: dict[str, np.ndarray], version: int = 0) -> None:
        self.versions = [version]
        self.nets = [net]
        self.weights = weights  # the newest set's arrays, which an update changes

    @property
    def newest(self) -> int:
        return self.versions[-1]

    def at(self, version: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """The forward of the dense weights of ``version``."""
        i = bisect.bisect_right(self.versions, version) - 1
        return self.nets[max(i, 0)].forward

    def add(self, version: int, net: DenseNet, weights: dict[str, np.ndarray]) -> None:
        """Dense weights from ``version`` on (before any batch reads it)."""
        self.versions.append(version)
        self.nets.append(net)
        self.weights = weights
        while len(self.versions) > 1 and self.versions[1] <= version - VERSIONS_KEPT:
            del self.versions[0], self.nets[0]
