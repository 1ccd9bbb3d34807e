"""Property tests of kernels.pool against a slow, obviously-correct loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import Int8RowwiseTable, quantize_rows


def slow_pool(values: np.ndarray, ids, lengths, weights=None, mode="sum") -> np.ndarray:
    out = np.zeros((len(lengths), values.shape[1]), dtype=np.float64)
    pos = 0
    for bag, n in enumerate(lengths):
        for k in range(pos, pos + n):
            w = 1.0 if weights is None else float(weights[k])
            out[bag] += w * values[ids[k]].astype(np.float64)
        if mode == "mean" and n:
            out[bag] /= n
        pos += n
    return out


@st.composite
def cases(draw):
    rows = draw(st.integers(1, 60))
    dim = draw(st.integers(1, 17))
    lengths = draw(st.lists(st.integers(0, 9), min_size=0, max_size=12))
    n = sum(lengths)
    ids = draw(st.lists(st.integers(0, rows - 1), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**32 - 1))
    return (
        rows,
        dim,
        lengths,
        np.array(ids, dtype=draw(st.sampled_from([np.int64, np.int32]))),
        seed,
    )


@settings(max_examples=150, deadline=None)
@given(
    case=cases(),
    mode=st.sampled_from(["sum", "mean"]),
    weighted=st.booleans(),
    last=st.booleans(),
)
def test_pool_fp32_matches_reference(case, mode, weighted, last) -> None:
    rows, dim, lengths, ids, seed = case
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((rows, dim)).astype(np.float32)
    weights = rng.random(ids.size).astype(np.float32) if weighted else None
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    offsets = starts if last else starts[:-1]
    got = kernels.pool(table, ids, offsets, weights=weights, mode=mode, include_last_offset=last)
    want = slow_pool(table, ids, lengths, weights, mode)
    assert got.dtype == np.float32 and got.shape == (len(lengths), dim)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_pool_fp16_within_rounding(case) -> None:
    rows, dim, lengths, ids, seed = case
    table = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float16)
    got = kernels.pool(table, ids, np.cumsum([0, *lengths])[:-1])
    want = slow_pool(table.astype(np.float32), ids, lengths)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_pool_int8_within_quantization_bound(case) -> None:
    rows, dim, lengths, ids, seed = case
    values = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    table = Int8RowwiseTable(quantize_rows(values))
    got = kernels.pool(table, ids, np.cumsum([0, *lengths])[:-1])
    want = slow_pool(values, ids, lengths)
    # Each value is off by at most half a quantization step of its row.
    half_step = table.scale.astype(np.float64) / 2
    bound = np.array(
        [
            half_step[ids[s : s + n]].sum()
            for s, n in zip(np.cumsum([0, *lengths])[:-1], lengths, strict=True)
        ]
    )
    assert np.all(np.abs(got - want) <= bound[:, None] + 1e-4)


def test_pool_memmap_table(tmp_path: Path) -> None:
    values = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path / "t.npy", values)
    table = np.load(tmp_path / "t.npy", mmap_mode="r")
    got = kernels.pool(table, np.array([9, 0, 9]), np.array([0, 1]))
    np.testing.assert_array_equal(got, [values[9], values[0] + values[9]])


@pytest.mark.parametrize("bad, pos", [([0, 5, -1], 2), ([10, 0], 0), ([3, 3, 3, 11], 3)])
def test_pool_rejects_out_of_range_ids(bad, pos) -> None:
    table = np.zeros((10, 2), np.float32)
    with pytest.raises(kernels.IdOutOfRangeError) as info:
        kernels.pool(table, np.array(bad), np.array([0]))
    assert info.value.position == pos and info.value.value == bad[pos]


@pytest.mark.parametrize(
    "offsets, last",
    [([1], False), ([0, 2, 1], False), ([0, 4], False), ([0, 2], True), ([], True)],
)
def test_pool_rejects_bad_offsets(offsets, last) -> None:
    with pytest.raises(kernels.KernelError):
        kernels.pool(
            np.zeros((5, 2), np.float32),
            np.array([1, 2, 3]),
            np.array(offsets, dtype=np.int64),
            include_last_offset=last,
        )


def test_pool_rejects_bad_dtypes() -> None:
    with pytest.raises(kernels.KernelError):
        kernels.pool(np.zeros((5, 2), np.float64), np.array([1]), np.array([0]))
    with pytest.raises(kernels.KernelError):
        kernels.pool(np.zeros((5, 2), np.float32), np.array([1.0]), np.array([0]))
    with pytest.raises(kernels.KernelError):
        kernels.pool(np.zeros((5, 2), np.float32), np.array([1]), np.array([0]), mode="max")
