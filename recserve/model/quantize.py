"""Table quantization (``recserve quantize``): fp32 to fp16 or int8 row-wise.

Tables are converted chunk by chunk (bounded memory); the dense weights are copied. The
report compares the quantized model with the original on sampled traffic: error of the
pooled vectors (relative to their norm) and of the final scores.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kernels import Int8RowwiseTable, quantize_rows
from recserve.contracts.errors import ConfigError
from recserve.contracts.manifest import DENSE_FILE, Manifest, TableSpec
from recserve.model.artifact import ArtifactWriter, chunk_rows, open_table
from recserve.model.scorer import Model
from recserve.model.workload import Workload


@dataclass(frozen=True)
class QuantReport:
    samples: int
    pooled_rel_err_mean: float
    pooled_rel_err_max: float
    score_abs_err_mean: float
    score_abs_err_max: float
    bytes_before: int
    bytes_after: int

    def lines(self) -> list[str]:
        return [
            f"tables: {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
            f"({self.bytes_before / max(1, self.bytes_after):.2f}x smaller)",
            f"pooled vectors over {self.samples} samples: relative error mean "
            f"{self.pooled_rel_err_mean:.2e}, max {self.pooled_rel_err_max:.2e}",
            f"scores: absolute error mean {self.score_abs_err_mean:.2e}, "
            f"max {self.score_abs_err_max:.2e}",
        ]


def _chunks(
    table: np.ndarray | Int8RowwiseTable, spec: TableSpec, dtype: str
) -> Iterator[np.ndarray]:
    step = chunk_rows(spec)
    for start in range(0, spec.rows, step):
        if isinstance(table, Int8RowwiseTable):
            block = table.dequantize(slice(start, start + step))
        else:
            block = np.asarray(table[start : start + step], dtype=np.float32)
        yield quantize_rows(block) if dtype == "int8" else block.astype(np.float16)


def quantize_model(
    src: Path | str,
    dtype: str,
    out: Path | str,
    *,
    overwrite: bool = False,
    samples: int = 1024,
    seed: int = 0,
) -> tuple[Manifest, QuantReport]:
    if dtype not in ("fp16", "int8"):
        raise ConfigError(f"--dtype must be fp16 or int8, got {dtype!r}")
    if Path(src).resolve() == Path(out).resolve():
        raise ConfigError("--out must differ from --model")
    original = Model.open(src)
    writer = ArtifactWriter(out, overwrite=overwrite)
    specs = []
    for spec in original.manifest.tables:
        if spec.dtype == "int8" or (spec.dtype == "fp16" and dtype == "fp16"):
            raise ConfigError(f"table {spec.name} is already {spec.dtype}; quantize from fp32")
        new = replace(spec, dtype=dtype)
        writer.write_table(new, _chunks(original.tables[spec.name], spec, dtype))
        specs.append(new)
    with np.load(Path(src) / DENSE_FILE) as npz:
        writer.write_dense({k: npz[k] for k in npz.files})
    manifest = writer.finish(replace(original.manifest, tables=tuple(specs), files={}))
    quantized = Model(
        Path(out), manifest, {t.name: open_table(out, t) for t in specs}, original.dense
    )
    return manifest, compare(original, quantized, samples, seed)


def compare(original: Model, other: Model, samples: int, seed: int) -> QuantReport:
    batch = Workload(original.manifest, seed).batch(samples)
    ref_pooled, got_pooled = original.pool(batch), other.pool(batch)
    norm = np.linalg.norm(ref_pooled, axis=2)
    err = np.linalg.norm(got_pooled - ref_pooled, axis=2)
    nonzero = norm > 0
    rel = err[nonzero] / norm[nonzero] if nonzero.any() else np.zeros(1)
    ref = original.dense.forward(batch.dense, ref_pooled)
    got = other.dense.forward(batch.dense, got_pooled)
    diff = np.abs(got.astype(np.float64) - ref)
    return QuantReport(
        samples,
        float(rel.mean()),
        float(rel.max()),
        float(diff.mean()),
        float(diff.max()),
        original.manifest.table_bytes,
        other.manifest.table_bytes,
    )
