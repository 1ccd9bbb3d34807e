"""Small models for tests: manifests from table specs, and artifacts with random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kernels import quantize_rows
from recserve.contracts.manifest import DenseSpec, InteractionSpec, Manifest, MLPSpec, TableSpec
from recserve.model.artifact import ArtifactWriter, dense_weights


def manifest_of(
    tables: tuple[TableSpec, ...],
    dense_width: int,
    *,
    name: str = "m",
    version: str = "1",
    hidden: tuple[tuple[int, ...], tuple[int, ...]] = ((), ()),
) -> Manifest:
    """A dot-interaction model over ``tables``; ``hidden`` widths of the bottom and top MLPs
    (none: one layer each). ReLU throughout, a sigmoid at the end."""
    dim = tables[0].dim
    n = sum(len(t.features) for t in tables)
    inter = InteractionSpec("dot")
    bottom = (dense_width, *hidden[0], dim)
    top = (inter.output_width(dim, n), *hidden[1], 1)
    return Manifest(
        name,
        version,
        dense_width,
        tables,
        DenseSpec(
            MLPSpec(bottom, ("relu",) * (len(bottom) - 1)),
            inter,
            MLPSpec(top, ("relu",) * (len(top) - 2) + ("sigmoid",)),
        ),
    )


def write_random(root: Path, manifest: Manifest, seed: int = 0) -> Manifest:
    """Write ``manifest``'s artifact with normal random tables and uniform dense weights."""
    rng = np.random.default_rng(seed)
    writer = ArtifactWriter(root)
    for t in manifest.tables:
        values = rng.standard_normal((t.rows, t.dim)).astype(np.float32)
        if t.dtype == "int8":
            writer.write_table_array(t, quantize_rows(values))
        else:
            writer.write_table_array(t, values.astype(np.float16 if t.dtype == "fp16" else "f4"))

    def layers(sizes: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
        scale = [1.0] * (len(sizes) - 2) + [1.0 / sizes[-2]]  # keep the last layer's logits O(1)
        return [
            (rng.random((b, a)) * s if len(sizes) > 2 else rng.random((b, a)), np.zeros(b))
            for a, b, s in zip(sizes, sizes[1:], scale, strict=False)
        ]

    writer.write_dense(
        dense_weights(layers(manifest.dense.bottom.sizes), layers(manifest.dense.top.sizes))
    )
    return writer.finish(manifest)


def tiny_manifest(dtype: str = "fp32") -> Manifest:
    return manifest_of(
        (
            TableSpec("a", 10, 2, dtype=dtype, features=("fa",)),
            TableSpec("b", 7, 2, dtype=dtype, features=("fb", "fc")),
        ),
        3,
        name="tiny",
        version="3",
    )


def write_tiny(out: Path) -> Manifest:
    manifest = tiny_manifest()
    rng = np.random.default_rng(1)
    writer = ArtifactWriter(out)
    for t in manifest.tables:
        writer.write_table_array(t, rng.standard_normal((t.rows, t.dim)).astype(np.float32))
    writer.write_dense(
        {
            "bottom.0.weight": np.ones((2, 3)),
            "bottom.0.bias": np.zeros(2),
            "top.0.weight": np.ones((1, 8)),
            "top.0.bias": np.zeros(1),
        }
    )
    return writer.finish(manifest)
