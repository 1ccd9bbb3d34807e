"""Artifacts as an attacker (or an accident) would change them: each is refused at start
with an error naming the file, never a crash later."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recserve.contracts.errors import ArtifactError
from recserve.contracts.manifest import MANIFEST, read_manifest
from recserve.model.artifact import verify
from recserve.model.scorer import Model
from tests.models import write_tiny


def edit_manifest(root: Path, change) -> None:
    doc = json.loads((root / MANIFEST).read_text())
    change(doc)
    (root / MANIFEST).write_text(json.dumps(doc))


def test_a_file_outside_the_artifact_is_refused(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    edit_manifest(
        tmp_path,
        lambda d: d["files"].update({"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}),
    )
    with pytest.raises(ArtifactError, match=r"\.\./\.\./etc/passwd"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("dropped", ["tables/a.npy", "dense.npz"])
def test_a_manifest_that_omits_a_file_is_refused(tmp_path: Path, dropped: str) -> None:
    write_tiny(tmp_path)
    edit_manifest(tmp_path, lambda d: d["files"].pop(dropped))
    with pytest.raises(ArtifactError, match=dropped.replace(".", r"\.")):
        verify(tmp_path, read_manifest(tmp_path))


def test_a_table_name_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    edit_manifest(tmp_path, lambda d: d["tables"][0].update(name="a\n"))
    with pytest.raises(ArtifactError, match="invalid or repeated"):
        read_manifest(tmp_path)


def test_a_table_changed_after_export_is_refused_at_open(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    with open(tmp_path / "tables" / "a.npy", "ab") as fh:
        fh.write(b"\0" * 4096)
    with pytest.raises(ArtifactError, match=r"tables/a\.npy: is \d+ bytes, the manifest says"):
        Model.open(tmp_path)
