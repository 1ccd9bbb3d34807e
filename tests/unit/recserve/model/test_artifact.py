"""A damaged artifact fails with a typed error naming the file, never a numpy traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kernels import Int8RowwiseTable, quantize_rows
from recserve.contracts.errors import ArtifactError, ChecksumMismatch, UnsupportedFormat
from recserve.contracts.manifest import read_manifest
from recserve.model.artifact import (
    ArtifactWriter,
    huge_page_bytes,
    hugepage_copies,
    verify,
)
from recserve.model.scorer import Model
from tests.models import tiny_manifest, write_tiny


def test_round_trip_and_verify(tmp_path: Path) -> None:
    written = write_tiny(tmp_path)
    assert read_manifest(tmp_path) == written
    verify(tmp_path, written)
    model = Model.open(tmp_path, check=True)
    assert [f for f, _ in model.manifest.features()] == ["fa", "fb", "fc"]
    assert isinstance(model.tables["a"], np.memmap)


def test_missing_table_names_file(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    (tmp_path / "tables" / "b.npy").unlink()
    with pytest.raises(ArtifactError, match=r"tables/b\.npy: missing table file"):
        Model.open(tmp_path)


def test_wrong_shape_names_file(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    np.save(tmp_path / "tables" / "a.npy", np.zeros((11, 2), np.float32))
    with pytest.raises(ArtifactError, match=r"tables/a\.npy: holds float32 \(11, 2\)"):
        Model.open(tmp_path)


def test_truncated_table_names_file(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    path = tmp_path / "tables" / "a.npy"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"tables/a\.npy"):
        Model.open(tmp_path)


def test_bad_checksum_on_request(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    path = tmp_path / "tables" / "b.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    Model.open(tmp_path)  # not checked unless asked: hashing terabytes takes minutes
    with pytest.raises(ChecksumMismatch, match=r"tables/b\.npy: checksum mismatch"):
        Model.open(tmp_path, check=True)


def test_unknown_format_version(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    doc["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UnsupportedFormat, match="format_version 99 is not supported"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["tables"][0].update(dim=3), "tables[0].dim"),
        (lambda d: d["tables"][1].update(features=["fa"]), "tables[1].features"),
        (lambda d: d["tables"][0].update(colour="red"), "tables[0].colour"),
        (lambda d: d["dense"]["top"].update(sizes=[9, 1]), "dense.top.sizes"),
        (lambda d: d["tables"][0].update(rows="10"), "tables[0].rows"),
        (lambda d: d["dense"]["bottom"].update(activations=["gelu"]), "dense.bottom.activations"),
    ],
)
def test_invalid_manifest_names_field(tmp_path: Path, mutate, field: str) -> None:
    write_tiny(tmp_path)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    mutate(doc)
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError) as info:
        read_manifest(tmp_path)
    assert info.value.field == field
    assert "manifest.json" in str(info.value)


def test_not_json_and_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a model artifact directory"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_writer_refuses_to_overwrite(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    with pytest.raises(ArtifactError, match="already exists"):
        ArtifactWriter(tmp_path)


def test_writer_checks_row_count(tmp_path: Path) -> None:
    writer = ArtifactWriter(tmp_path)
    spec = tiny_manifest().tables[0]
    with pytest.raises(ArtifactError, match="9 rows written, 10 declared"):
        writer.write_table(spec, [np.zeros((9, 2), np.float32)])


def test_hugepage_copies_are_equal_read_only_and_aligned() -> None:
    rng = np.random.default_rng(0)
    tables = [
        rng.random((1000, 13), np.float32),
        rng.random((7, 4)).astype(np.float16),
        np.zeros((0, 8), np.float32),
        Int8RowwiseTable(quantize_rows(rng.random((50, 16), np.float32))),
    ]
    copies = hugepage_copies(tables)
    for table, copy in zip(tables, copies, strict=True):
        assert type(copy) is type(table)
        a = table.data if isinstance(table, Int8RowwiseTable) else table
        b = copy.data if isinstance(copy, Int8RowwiseTable) else copy
        assert b.dtype == a.dtype and np.array_equal(a, b)
        assert not b.flags.writeable and b.ctypes.data % 64 == 0
    assert 0 <= huge_page_bytes(copies) <= 4 << 20  # 2 MiB pages, where THP is on
