"""A part's changed-rows set: a bitmap merged by OR, read back as the global ids it holds;
the id lists earlier compactions wrote still read; a file of another shape is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recserve.contracts.errors import ArtifactError
from shardd.compaction import changed_bits, changed_ids, write_changed
from shardd.updates import set_bits


def test_changed_rows_round_trip_and_merge(tmp_path: Path) -> None:
    row_start, rows = 1_000, 1_203  # not a whole number of bytes
    rng = np.random.default_rng(0)
    first = np.unique(rng.integers(0, rows, 300))
    second = np.unique(np.r_[rng.integers(0, rows, 200), rows - 1, 0])
    bits = changed_bits(None, row_start, rows)
    assert not bits.any() and bits.size == (rows + 7) // 8
    set_bits(bits, first)
    write_changed(tmp_path / "p.v1.bits.npy", bits)
    again = changed_bits(tmp_path / "p.v1.bits.npy", row_start, rows)
    set_bits(again, second)
    write_changed(tmp_path / "p.v2.bits.npy", again)
    got = changed_ids(tmp_path / "p.v2.bits.npy", row_start, rows)
    np.testing.assert_array_equal(got, np.union1d(first, second) + row_start)


def test_an_id_list_of_earlier_compactions_still_reads(tmp_path: Path) -> None:
    ids = np.array([5, 6, 70, 199], np.int64) + 300  # global ids
    np.save(tmp_path / "p.v1.ids.npy", ids)
    np.testing.assert_array_equal(changed_ids(tmp_path / "p.v1.ids.npy", 300, 200), ids)


def test_a_bitmap_of_another_part_is_refused(tmp_path: Path) -> None:
    write_changed(tmp_path / "p.bits.npy", np.zeros(3, np.uint8))
    with pytest.raises(ArtifactError, match="not a bitmap of 100 rows"):
        changed_bits(tmp_path / "p.bits.npy", 0, 100)
