"""Ids go out as int32 when every one fits, else as int64, values unchanged."""

from __future__ import annotations

import numpy as np

from recserve.contracts.columns import narrow_ids


def test_ids_narrow_to_int32_only_when_all_fit() -> None:
    small = np.array([0, 5, 2**31 - 1], np.int64)
    got = narrow_ids(small)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, small)
    large = np.array([0, 2**31], np.int64)
    assert narrow_ids(large).dtype == np.int64
    np.testing.assert_array_equal(narrow_ids(large), large)
    assert narrow_ids(np.array([-(2**31) - 1])).dtype == np.int64
    assert narrow_ids([3, 4]).dtype == np.int32  # lists too
    assert narrow_ids(np.zeros(0, np.int64)).dtype == np.int32
    same = np.array([1, 2], np.int32)
    assert narrow_ids(same) is same
