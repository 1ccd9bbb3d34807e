"""Rows read around the page cache equal the file's rows, direct or buffered, serial or in
parallel; a read past the end of the file is a typed error naming the row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recserve.contracts.errors import DiskReadError
from shardd.disk import ReadJob, RowReader, TableFile


def write(path: Path, rows: int, row_bytes: int) -> tuple[np.ndarray, int]:
    data = np.random.default_rng(0).integers(0, 256, (rows, row_bytes), dtype=np.uint8)
    np.save(path, data)
    return data, int(np.load(path, mmap_mode="r").offset)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("threads", [1, 4])
def test_rows_read_equal_the_file(tmp_path: Path, direct: bool, threads: int) -> None:
    path = tmp_path / "rows.npy"
    try:
        data, base = write(path, 5_000, 72)
        file = TableFile(path, base, 72, direct=direct)
        assert file.direct == direct
        reader = RowReader(threads)
        rows = np.random.default_rng(1).choice(5_000, 700, replace=False).astype(np.int64)
        rows[:3] = [0, 4_999, 1]  # the first and last rows (the last block is short)
        arena = np.zeros((700, 72), np.uint8)
        reader.read_all([ReadJob(file, rows, np.arange(700, dtype=np.int32)[::-1].copy(), arena)])
        np.testing.assert_array_equal(arena[::-1], data[rows])
        with pytest.raises(DiskReadError, match=r"row 5000 .* ends before it"):
            reader.read_all([ReadJob(file, np.array([5_000]), np.zeros(1, np.int32), arena)])
        reader.close()
        file.close()
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("direct", [True, False])
def test_a_range_read_whole_equals_the_file(tmp_path: Path, direct: bool) -> None:
    """Unaligned first rows and ends, ranges across chunk edges and up to the file's end."""
    path = tmp_path / "rows.npy"
    try:
        data, base = write(path, 5_000, 72)
        file = TableFile(path, base, 72, direct=direct)
        for first, rows, chunk in [(0, 5_000, 8 << 20), (3, 4_997, 4096), (1_234, 10, 4096),
                                   (4_999, 1, 8 << 20), (17, 3_000, 12288)]:  # fmt: skip
            got = file.read_range(first, rows, chunk)
            assert got.shape == (rows, 72)
            np.testing.assert_array_equal(got, data[first : first + rows])
        with pytest.raises(DiskReadError, match="ends early"):
            file.read_range(4_990, 11)
        file.close()
    finally:
        path.unlink(missing_ok=True)
