"""An opened model artifact that scores batches in-process.

This is the single-server path: offline ``recserve predict``, quantization checks, and later
the gateway's ``--singular`` baseline. Tables stay memory-mapped; nothing is read whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import kernels
from kernels import DenseNet, Table
from recserve.artifact import load_dense, open_table, read_manifest, verify
from recserve.batch import Batch
from recserve.errors import IdOutOfRange
from recserve.manifest import Manifest


class Model:
    def __init__(
        self, root: Path, manifest: Manifest, tables: dict[str, Table], dense: DenseNet
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.tables = tables
        self.dense = dense

    @classmethod
    def open(cls, root: Path | str, *, check: bool = False) -> Model:
        """Open an artifact; ``check`` verifies every file's sha256 first."""
        root = Path(root)
        manifest = read_manifest(root)
        if check:
            verify(root, manifest)
        tables = {t.name: open_table(root, t) for t in manifest.tables}
        return cls(root, manifest, tables, load_dense(root, manifest))

    def pool(self, batch: Batch) -> np.ndarray:
        """Pooled vectors ``[B, features, dim]`` in interaction order."""
        features = list(self.manifest.features())
        out = np.empty((batch.size, len(features), self.manifest.embedding_dim), np.float32)
        for k, (feature, spec) in enumerate(features):
            bags = batch.bags[feature]
            try:
                out[:, k, :] = kernels.pool(
                    self.tables[spec.name],
                    bags.ids,
                    bags.bounds,
                    weights=bags.weights,
                    mode=spec.pooling,  # type: ignore[arg-type]
                    include_last_offset=True,
                )
            except kernels.IdOutOfRangeError as exc:
                raise IdOutOfRange(str(exc), field=feature) from exc
        return out

    def score(self, batch: Batch) -> np.ndarray:
        """Model output ``[B]`` (probabilities for models ending in a sigmoid)."""
        return self.dense.forward(batch.dense, self.pool(batch))
