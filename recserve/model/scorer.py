"""An opened model artifact that scores batches in-process.

This is the single-server path: offline ``recserve predict``, quantization checks, and later
the gateway's ``--singular`` baseline. Tables stay memory-mapped; nothing is read whole.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import kernels
from kernels import DenseNet, Table
from recserve.contracts.batch import Batch, concat_weights
from recserve.contracts.errors import IdOutOfRange
from recserve.contracts.manifest import Manifest, read_manifest
from recserve.model.artifact import (
    file_size,
    hugepage_copies,
    load_dense,
    open_table,
    touch,
    verify,
)


class Model:
    def __init__(
        self, root: Path, manifest: Manifest, tables: dict[str, Table], dense: DenseNet
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.tables = tables
        self.dense = dense
        self.slot = {name: i for i, name in enumerate(tables)}
        self.tableset = kernels.TableSet(list(tables.values()))

    @classmethod
    def open(cls, root: Path | str, *, check: bool = False) -> Model:
        """Open an artifact; ``check`` verifies every file's sha256 first."""
        root = Path(root)
        manifest = read_manifest(root)
        if check:
            verify(root, manifest)
        tables = {t.name: open_table(root, t, file_size(manifest, t)) for t in manifest.tables}
        return cls(root, manifest, tables, load_dense(root, manifest))

    def preload(self, *, hugepages: bool = False) -> float:
        """Touch every page of every table (see ``artifact.touch``), or with ``hugepages``
        score from copies in huge-page memory (``artifact.hugepage_copies``); returns
        seconds."""
        start = time.perf_counter()
        if hugepages:
            names = list(self.tables)
            copies = hugepage_copies([self.tables[n] for n in names])
            self.tables = dict(zip(names, copies, strict=True))
            self.tableset = kernels.TableSet(copies)
        else:
            for table in self.tables.values():
                touch(table)
        return time.perf_counter() - start

    def pool(self, batch: Batch, threads: int | None = None) -> np.ndarray:
        """Pooled vectors ``[B, features, dim]`` in interaction order: one kernel call per
        distinct bag count (shared context bags are pooled once, then expanded), on
        ``threads`` threads (default: the process's cores)."""
        features = list(self.manifest.features())
        out = np.empty((batch.size, len(features), self.manifest.embedding_dim), np.float32)
        groups: dict[int, list[int]] = {}
        for k, (feature, _) in enumerate(features):
            groups.setdefault(batch.bags[feature].n_bags, []).append(k)
        for members in groups.values():
            bags = [batch.bags[features[k][0]] for k in members]
            # Every feature, in order, one bag a sample (the usual request): pool into out.
            whole = len(members) == len(features) and all(b.index is None for b in bags)
            starts = np.cumsum([0] + [b.ids.size for b in bags])
            weights = concat_weights([b.weights for b in bags], [b.ids.size for b in bags])
            try:
                pooled = self.tableset.pool(
                    [self.slot[features[k][1].name] for k in members],
                    np.concatenate([b.ids for b in bags]),
                    np.stack([b.bounds for b in bags]) + starts[:-1, None],
                    weights=weights,
                    modes=[features[k][1].pooling for k in members],
                    out=out if whole else None,
                    threads=threads,
                )
            except kernels.IdOutOfRangeError as exc:
                j = int(np.searchsorted(starts, exc.position, side="right")) - 1
                raise IdOutOfRange(str(exc), field=features[members[j]][0]) from exc
            for j, (k, b) in enumerate(zip(members, bags, strict=True)):
                if not whole:
                    out[:, k, :] = pooled[:, j, :] if b.index is None else pooled[b.index, j, :]
        return out

    def score(self, batch: Batch) -> np.ndarray:
        """Model output ``[B]`` (probabilities for models ending in a sigmoid)."""
        return self.dense.forward(batch.dense, self.pool(batch))
