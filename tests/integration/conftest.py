"""Fixtures shared by the integration tests of updates and deploys."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from recserve.cli import main as cli
from recserve.contracts.manifest import DENSE_FILE, read_manifest
from recserve.model.artifact import ArtifactWriter, open_table, read_dense


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A drm3 artifact, a retrained one of the same shape (other rows and dense weights),
    and one of another shape."""
    root = tmp_path_factory.mktemp("deploy")
    for name, seed, size in (("a", 3, "4MiB"), ("other", 5, "8MiB")):
        argv = ["synth", "--profile", "drm3", "--size", size, "--seed", str(seed)]
        assert cli([*argv, "--out", str(root / name)]) == 0
    manifest = read_manifest(root / "a")
    rng = np.random.default_rng(4)
    writer = ArtifactWriter(root / "b")
    for spec in manifest.tables:
        values = np.asarray(open_table(root / "a", spec), np.float32)
        writer.write_table_array(
            spec, values + rng.normal(0, 0.05, values.shape).astype(np.float32)
        )
    dense = read_dense(root / "a" / DENSE_FILE)
    writer.write_dense({k: v * np.float32(0.9) for k, v in dense.items()})
    writer.finish(replace(manifest, version="retrained"))
    return root / "a", root / "b", root / "other"
