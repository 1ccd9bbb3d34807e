"""Property tests of kernels.pool against a slow, obviously-correct loop."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import Int8RowwiseTable, quantize_rows
from kernels.pooling import SERIAL_BELOW
from kernels.reference import pool_numpy

ENGINES = pytest.mark.parametrize("engine", [kernels.pool, pool_numpy], ids=["numba", "numpy"])


@pytest.fixture(params=["near", "far"])
def prefetch(request, monkeypatch) -> str:
    """Both prefetch modes of the kernel: every table counted as cache-resident, or every
    table as larger than the cache (``layout.far_bytes``)."""
    far = request.param == "far"
    monkeypatch.setattr(kernels.layout, "_FAR_BYTES", 0 if far else 1 << 62)
    return request.param


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
    # Every column-pass shape of the compiled kernel: 1-3 scalars, 4, 8, 16 x 1..8, mixes.
    dim = draw(st.one_of(st.integers(1, 20), st.sampled_from([32, 48, 64, 100, 128, 144, 300])))
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


@ENGINES
@settings(max_examples=150, deadline=None)
@given(
    case=cases(),
    mode=st.sampled_from(["sum", "mean"]),
    weighted=st.booleans(),
    last=st.booleans(),
)
def test_pool_fp32_matches_reference(engine, case, mode, weighted, last) -> None:
    rows, dim, lengths, ids, seed = case
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((rows, dim)).astype(np.float32)
    weights = rng.random(ids.size).astype(np.float32) if weighted else None
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    offsets = starts if last else starts[:-1]
    got = engine(table, ids, offsets, weights=weights, mode=mode, include_last_offset=last)
    want = slow_pool(table, ids, lengths, weights, mode)
    assert got.dtype == np.float32 and got.shape == (len(lengths), dim)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@ENGINES
@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_pool_fp16_within_rounding(engine, case) -> None:
    rows, dim, lengths, ids, seed = case
    table = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float16)
    got = engine(table, ids, np.cumsum([0, *lengths])[:-1])
    want = slow_pool(table.astype(np.float32), ids, lengths)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


@ENGINES
@settings(max_examples=60, deadline=None)
@given(case=cases(), weighted=st.booleans())
def test_pool_int8_within_quantization_bound(engine, case, weighted) -> None:
    rows, dim, lengths, ids, seed = case
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, dim)).astype(np.float32)
    table = Int8RowwiseTable(quantize_rows(values))
    weights = rng.random(ids.size).astype(np.float32) if weighted else None
    got = engine(table, ids, np.cumsum([0, *lengths])[:-1], weights=weights)
    # Compare with the exactly dequantized rows, then bound the quantization error itself.
    exact = slow_pool(table.dequantize(), ids, lengths, weights)
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-4)
    if weighted:
        return
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


@ENGINES
def test_pool_memmap_table(engine, tmp_path: Path) -> None:
    values = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path / "t.npy", values)
    table = np.load(tmp_path / "t.npy", mmap_mode="r")
    got = engine(table, np.array([9, 0, 9]), np.array([0, 1]))
    np.testing.assert_array_equal(got, [values[9], values[0] + values[9]])


@ENGINES
@pytest.mark.parametrize("bad, pos", [([0, 5, -1], 2), ([10, 0], 0), ([3, 3, 3, 11], 3)])
def test_pool_rejects_out_of_range_ids(engine, bad, pos) -> None:
    table = np.zeros((10, 2), np.float32)
    with pytest.raises(kernels.IdOutOfRangeError) as info:
        engine(table, np.array(bad), np.array([0]))
    assert info.value.position == pos and info.value.value == bad[pos]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bad", [-1, 10, 2**62, -(2**62)])
def test_bad_id_in_a_later_bag_is_reported_not_touched(threads, bad, prefetch) -> None:
    """Bags are checked as they are pooled: earlier bags' prefetches run over the bad id
    (prefetches never fault) and the first bad position is still named."""
    table = np.ones((10, 64), np.float32)
    ids = np.random.default_rng(0).integers(0, 10, 4000)
    ids[3001] = ids[3500] = bad
    with pytest.raises(kernels.IdOutOfRangeError) as info:
        kernels.pool(table, ids, np.arange(0, 4000, 4), threads=threads)
    assert info.value.position == 3001 and info.value.value == bad


@ENGINES
@pytest.mark.parametrize(
    "offsets, last",
    [([1], False), ([0, 2, 1], False), ([0, 4], False), ([0, 2], True), ([], True)],
)
def test_pool_rejects_bad_offsets(engine, offsets, last) -> None:
    with pytest.raises(kernels.KernelError):
        engine(
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
    with pytest.raises(kernels.KernelError):  # byte-swapped rows would pool as garbage
        kernels.pool(np.zeros((5, 2), ">f4"), np.array([1]), np.array([0]))
    with pytest.raises(kernels.KernelError):
        kernels.pool(np.zeros((5, 2), np.float32), np.array([1]), np.array([0]), threads=0)


def test_pool_many_mixed_dtypes_and_modes(prefetch) -> None:
    rng = np.random.default_rng(7)
    dim, n_bags = 24, 9
    values = [rng.standard_normal((rows, dim)).astype(np.float32) for rows in (50, 7, 300)]
    tables = [values[0], values[1].astype(np.float16), Int8RowwiseTable(quantize_rows(values[2]))]
    exact = [values[0], values[1].astype(np.float16).astype(np.float32), tables[2].dequantize()]
    lengths = [rng.integers(0, 6, n_bags) for _ in tables]
    ids = [rng.integers(0, v.shape[0], int(n.sum())) for v, n in zip(values, lengths, strict=True)]
    offsets = [np.cumsum([0, *n])[:-1] for n in lengths]
    weights = [None, rng.random(ids[1].size).astype(np.float32), None]
    modes = ["sum", "mean", "mean"]
    got = kernels.pool_many(tables, ids, offsets, weights=weights, modes=modes)
    assert got.shape == (n_bags, 3, dim)
    for t in range(3):
        want = slow_pool(exact[t], ids[t], lengths[t], weights[t], modes[t])
        np.testing.assert_allclose(got[:, t], want, rtol=1e-4, atol=1e-4)


def test_pool_packed_error_names_global_position() -> None:
    tables = [np.zeros((5, 4), np.float32), np.zeros((3, 4), np.float32)]
    ids = np.array([0, 4, 1, 2, 3, 0])  # table 1 (3 rows) holds id 3 at position 4
    bounds = np.array([[0, 1, 2], [2, 4, 6]])
    with pytest.raises(kernels.IdOutOfRangeError) as info:
        kernels.pool_packed(tables, ids, bounds)
    assert (info.value.position, info.value.value, info.value.rows) == (4, 3, 3)
    with pytest.raises(kernels.KernelError, match="non-decreasing"):
        kernels.pool_packed(tables, ids, np.array([[0, 1, 2], [2, 7, 6]]))
    with pytest.raises(kernels.KernelError, match="differ in dim"):
        kernels.pool_packed([tables[0], np.zeros((3, 5), np.float32)], ids, bounds)


@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_path_matches_numpy(threads: int, prefetch) -> None:
    rng = np.random.default_rng(3)
    table = rng.standard_normal((5000, 64)).astype(np.float32)
    n_bags = 300
    lengths = rng.integers(0, 40, n_bags)
    ids = rng.integers(0, 5000, int(lengths.sum()))
    assert ids.size > SERIAL_BELOW
    offsets = np.cumsum([0, *lengths])[:-1]
    got = kernels.pool(table, ids, offsets, threads=threads)
    np.testing.assert_allclose(got, pool_numpy(table, ids, offsets), rtol=1e-5, atol=1e-5)
    bad = ids.copy()
    bad[-1] = 5000
    with pytest.raises(kernels.IdOutOfRangeError) as info:
        kernels.pool(table, bad, offsets, threads=threads)
    assert info.value.position == ids.size - 1


def test_pool_writes_into_out() -> None:
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    out = np.full((2, 2), 99.0, np.float32)
    result = kernels.pool(table, np.array([1, 2, 5]), np.array([0, 2]), out=out)
    assert result.base is out or result is out
    np.testing.assert_array_equal(out, [[2 + 4, 3 + 5], [10, 11]])


def test_pool_packed_first_ids_address_a_row_range_in_place() -> None:
    rng = np.random.default_rng(11)
    table = rng.standard_normal((100, 16)).astype(np.float32)
    part = table[40:70]  # a shard's view of rows [40, 70)
    ids = np.array([40, 69, 55, 41, 41], np.int32)  # global ids, read in place
    got = kernels.pool_packed([part], ids, np.array([[0, 2, 5]]), first_ids=[40])
    np.testing.assert_allclose(got[:, 0], pool_numpy(table, ids, np.array([0, 2])), atol=1e-6)
    for bad in (39, 70):
        with pytest.raises(kernels.IdOutOfRangeError, match=r"outside \[40, 70\)") as info:
            kernels.pool_packed([part], np.array([45, bad]), np.array([[0, 2]]), first_ids=[40])
        assert info.value.position == 1 and info.value.first == 40


def test_tableset_pools_subsets_like_pool_packed() -> None:
    rng = np.random.default_rng(3)
    tables = [
        rng.random((30, 8), np.float32),
        rng.random((20, 8)).astype(np.float16),
        Int8RowwiseTable(quantize_rows(rng.random((40, 8), np.float32))),
        rng.random((10, 4), np.float32),  # another dim: only pooled on its own
    ]
    firsts = [100, 0, 7, 0]
    tset = kernels.TableSet(tables, first_ids=firsts)
    which = [2, 0]
    lens = np.array([3, 0, 2])
    ids = np.concatenate([rng.integers(7, 47, 5), rng.integers(100, 130, 5)])
    bounds = np.stack([np.concatenate([[0], np.cumsum(lens)]) + s for s in (0, 5)])
    got = tset.pool(which, ids, bounds, modes=["mean", "sum"])
    want = kernels.pool_packed(
        [tables[i] for i in which],
        ids,
        bounds,
        modes=["mean", "sum"],
        first_ids=[firsts[i] for i in which],
    )
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(
        got[:, 1], pool_numpy(tables[0], ids[5:] - 100, bounds[1, :-1] - 5), rtol=1e-6
    )
    # The set's own flags are untouched by a call's modes.
    np.testing.assert_array_equal(
        tset.pool([0], ids[5:], bounds[1:] - 5, modes="sum")[:, 0], want[:, 1]
    )
    with pytest.raises(kernels.KernelError, match="differ in dim"):
        tset.pool([0, 3], ids, bounds)
    with pytest.raises(kernels.KernelError, match="outside a set"):
        tset.pool([4], ids, bounds[:1])
    with pytest.raises(kernels.IdOutOfRangeError):
        tset.pool([0], ids, bounds[:1])  # table 0 takes ids 100-129


def test_a_prepared_call_checks_at_once_and_runs_on_another_thread() -> None:
    rng = np.random.default_rng(4)
    table = rng.random((50, 16), np.float32)
    tset = kernels.TableSet([table], first_ids=[10])
    lens = np.full(600, 5)  # 3000 ids: the parallel kernel when asked for 2 threads
    ids = rng.integers(10, 60, int(lens.sum()))
    bounds = np.concatenate([[0], np.cumsum(lens)]).reshape(1, -1)
    call = tset.prepare([0], ids, bounds, modes="mean", threads=2)
    with ThreadPoolExecutor(1) as worker:
        got = worker.submit(call.run).result()
    np.testing.assert_allclose(
        got[:, 0], slow_pool(table, ids - 10, lens, mode="mean"), rtol=1e-5, atol=1e-6
    )
    # Shape and mode errors surface when preparing; ids are checked as the kernel reads them.
    with pytest.raises(kernels.KernelError, match="bounds must be"):
        tset.prepare([0], ids, bounds[:, :-1].ravel())
    with pytest.raises(kernels.KernelError, match="modes must be"):
        tset.prepare([0], ids, bounds, modes="max")
    bad = tset.prepare([0], ids - 10, bounds)
    with pytest.raises(kernels.IdOutOfRangeError):
        bad.run()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_call_pools_into_the_columns_it_is_given(threads: int) -> None:
    """With ``cols`` each table's bags land in its column of a wider output (a batch's
    ``[B, features, dim]``), every other column untouched; means included."""
    rng = np.random.default_rng(5)
    tables = [
        rng.random((40, 8), np.float32),
        Int8RowwiseTable(quantize_rows(rng.random((30, 8), np.float32))),
        rng.random((20, 8)).astype(np.float16),
    ]
    tset = kernels.TableSet(tables)
    lens = rng.integers(0, 6, 700)  # ~1750 ids a table: both kernels with 2 threads
    n = int(lens.sum())
    ids = np.concatenate([rng.integers(0, t.shape[0], n) for t in tables])
    bounds = np.stack([np.concatenate([[0], np.cumsum(lens)]) + k * n for k in range(3)])
    out = np.full((700, 5, 8), -7.0, np.float32)
    tset.prepare([0, 1, 2], ids, bounds, modes=["sum", "mean", "sum"], out=out, cols=[3, 0, 4],
                 threads=threads).run()  # fmt: skip
    want = tset.pool([0, 1, 2], ids, bounds, modes=["sum", "mean", "sum"])
    np.testing.assert_array_equal(out[:, [3, 0, 4]], want)
    assert (out[:, [1, 2]] == -7.0).all()
    np.testing.assert_allclose(
        out[:, 3], slow_pool(tables[0], ids[:n], lens, mode="sum"), rtol=1e-5, atol=1e-5
    )
    for bad, match in (
        ({"cols": [3, 0, 5]}, "cols must be columns"),
        ({"cols": [3, 0]}, "cols must be 3 integers"),
        ({"cols": [-1, 0, 1]}, "cols must be columns"),
        ({"cols": [0, 1, 2], "out": out[:, :, :4]}, "out must be writable"),
        ({"cols": [0, 1, 2], "out": out[:10]}, "out must be writable"),
        ({"cols": [0, 1, 2], "out": None}, "out must be writable"),
    ):
        args = {"out": out, **bad}
        with pytest.raises(kernels.KernelError, match=match):
            tset.prepare([0, 1, 2], ids, bounds, **args)


def test_a_plan_binds_many_calls_like_prepare() -> None:
    """A plan checks tables, modes and columns once; each call binds its own arrays and
    pools what ``prepare`` would, and retargeting one call leaves the plan alone."""
    rng = np.random.default_rng(6)
    tables = [rng.random((40, 8), np.float32), rng.random((30, 8), np.float32)]
    tset = kernels.TableSet(tables, first_ids=[0, 100])
    plan = tset.plan([1, 0], ["mean", "sum"])
    for seed in range(3):
        lens = np.random.default_rng(seed).integers(0, 5, 50)
        n = int(lens.sum())
        ids = np.concatenate([rng.integers(100, 130, n), rng.integers(0, 40, n)])
        bounds = np.stack([np.concatenate([[0], np.cumsum(lens)]) + k * n for k in range(2)])
        got = plan.call(ids, bounds).run()
        np.testing.assert_array_equal(
            got, tset.prepare([1, 0], ids, bounds, modes=["mean", "sum"]).run()
        )
        np.testing.assert_allclose(
            got[:, 0], slow_pool(tables[1], ids[:n] - 100, lens, mode="mean"), rtol=1e-5
        )
    call = plan.call(ids, bounds)
    call.retarget(1, rng.random((40, 8), np.float32))
    np.testing.assert_array_equal(plan.call(ids, bounds).run(), got)
    placed = tset.plan([0], "sum", cols=[2])
    out = np.zeros((50, 3, 8), np.float32)
    placed.call(ids[n:], bounds[1:] - n, out=out).run()
    np.testing.assert_array_equal(out[:, 2], got[:, 1])
    with pytest.raises(kernels.KernelError, match="cols must be columns"):
        placed.call(ids[n:], bounds[1:] - n, out=out[:, :2].copy())
    with pytest.raises(kernels.KernelError, match="cols must be columns"):
        tset.plan([0], "sum", cols=[-1])


@pytest.mark.parametrize(
    ("lengths", "n_ids", "want"),
    [
        ([3, 0, 2], 5, [0, 3, 3, 5]),
        ([], 0, [0]),
        ([2**31 - 1, 2**31 - 1], 2**32 - 2, [0, 2**31 - 1, 2**32 - 2]),  # no int32 overflow
        ([3, -1, 3], 5, None),
        ([3, 0, 2], 6, None),
    ],
)
def test_bag_positions_checks_lengths_in_one_pass(lengths, n_ids, want) -> None:
    got = kernels.bag_positions(np.array(lengths, np.int32), n_ids)
    if want is None:
        assert got is None
    else:
        assert got is not None and got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_the_compiled_entry_pools_as_the_checked_path(threads: int, mode: str, prefetch) -> None:
    """A float32 table with int64 offsets takes ``pool``'s one compiled call; int32 offsets
    the checked path (``pool_packed``'s). Both against a float64 reference, memmap too."""
    rng = np.random.default_rng(7)
    table = rng.standard_normal((3000, 64)).astype(np.float32)
    lengths = rng.integers(0, 30, 200)
    ids = rng.integers(0, 3000, int(lengths.sum()))
    assert ids.size > SERIAL_BELOW
    starts = np.cumsum([0, *lengths]).astype(np.int64)
    want = slow_pool(table, ids, lengths, mode=mode)
    for offsets, last in ((starts[:-1], False), (starts, True)):
        kw = dict(mode=mode, include_last_offset=last, threads=threads)
        fast = kernels.pool(table, ids, offsets, **kw)
        checked = kernels.pool(table, ids, offsets.astype(np.int32), **kw)
        np.testing.assert_allclose(fast, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(fast, checked)
    out = np.full((200, 64), np.nan, np.float32)
    assert kernels.pool(table, ids.astype(np.int32), starts[:-1], out=out, mode=mode) is out
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_pool_refuses_a_read_only_out() -> None:
    table = np.ones((4, 8), np.float32)
    out = np.zeros((1, 8), np.float32)
    out.flags.writeable = False
    with pytest.raises(kernels.KernelError, match="writable"):
        kernels.pool(table, np.array([1, 2]), np.array([0]), out=out)
    with pytest.raises(kernels.KernelError, match="writable"):
        kernels.pool_packed([table], np.array([1, 2]), np.array([[0, 2]]), out=out[:, None])
    assert not out.any()


def test_tables_larger_than_half_the_cache_are_prefetched_far(monkeypatch) -> None:
    from kernels.layout import FAR, far_bytes, table_layout

    assert far_bytes() >= 32 << 20
    monkeypatch.setattr(kernels.layout, "_FAR_BYTES", 64 * 16 * 4)
    address = kernels.pooling._compiled().address
    small, big = np.zeros((63, 16), np.float32), np.zeros((64, 16), np.float32)
    assert [table_layout(t, address)[FAR] for t in (small, big)] == [0, 1]
    int8 = Int8RowwiseTable(quantize_rows(np.zeros((64 * 64 // 24 + 1, 16), np.float32)))
    assert table_layout(int8, address)[FAR] == 1  # by its bytes: 16 codes + 8 a row
    assert kernels.TableSet([small, big]).layout[:, FAR].tolist() == [0, 1]
    # Together at least far_bytes: each table of at least FAR_TABLE_MIN is far too.
    monkeypatch.setattr(kernels.layout, "_FAR_BYTES", 64 * 16 * 4 * 2)
    monkeypatch.setattr(kernels.layout, "FAR_TABLE_MIN", 32 * 16 * 4)
    tiny, half = np.zeros((31, 16), np.float32), np.zeros((32, 16), np.float32)
    assert kernels.TableSet([tiny, half]).layout[:, FAR].tolist() == [0, 0]
    more = np.zeros((100, 16), np.float32)  # below far_bytes alone; the three above it
    assert kernels.TableSet([tiny, half, more]).layout[:, FAR].tolist() == [0, 1, 1]
