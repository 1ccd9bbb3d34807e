"""Request parsing: values land in the right bags, and every mistake names its field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recserve.cli import main
from recserve.contracts.errors import BadRequest, IdOutOfRange, UnknownFeature
from recserve.contracts.samples import parse_samples
from tests.models import tiny_manifest, write_tiny

M = tiny_manifest()


def test_bags_and_weights() -> None:
    batch = parse_samples(
        [
            {"dense": [1, 2.5, 3], "sparse": {"fa": [1, 2], "fc": [6]}},
            {"dense": [0, 0, 0], "sparse": {"fa": [9]}, "weights": {"fa": [0.5]}},
        ],
        M,
    )
    np.testing.assert_array_equal(batch.dense, [[1, 2.5, 3], [0, 0, 0]])
    fa = batch.bags["fa"]
    np.testing.assert_array_equal(fa.ids, [1, 2, 9])
    np.testing.assert_array_equal(fa.bounds, [0, 2, 3])
    np.testing.assert_array_equal(fa.weights, [1.0, 1.0, 0.5])
    np.testing.assert_array_equal(batch.bags["fb"].bounds, [0, 0, 0])
    assert batch.bags["fb"].weights is None


@pytest.mark.parametrize("size, share", [(40, 0.7), (3000, 0.002)])
def test_bags_equal_a_plain_reference(size: int, share: float) -> None:
    """Bags as one loop over the samples would build them, whether most samples name a
    feature (one table of counts) or almost none do (features no sample names share one
    read-only array of zeros)."""
    rng = np.random.default_rng(size)
    rows = {"fa": 10, "fb": 7, "fc": 7}
    samples = []
    for _ in range(size):
        named = [f for f in ("fa", "fb") if rng.random() < share]  # fc only in full bodies
        if share > 0.5 and rng.random() < share:
            named.append("fc")
        sparse = {f: rng.integers(0, rows[f], rng.integers(0, 4)).tolist() for f in named}
        samples.append({"dense": [0, 0, 0], "sparse": sparse})
    batch = parse_samples(samples, M)
    for f in rows:
        ids, bounds = [], [0]
        for sample in samples:
            ids += sample["sparse"].get(f, [])
            bounds.append(len(ids))
        assert batch.bags[f].ids.tolist() == ids
        assert batch.bags[f].bounds.tolist() == bounds
    if share < 0.01:  # no sample names fc
        assert not batch.bags["fc"].bounds.flags.writeable


@pytest.mark.parametrize(
    "sample, error, field",
    [
        ({"dense": [1, 2]}, BadRequest, "samples[0].dense"),
        ({"dense": [1, 2, "3"]}, BadRequest, "samples[0].dense"),
        ({"dense": [1, 2, float("nan")]}, BadRequest, "samples[0].dense"),
        ({"dense": [1, 2, 1e39]}, BadRequest, "samples[0].dense"),
        ({"dense": [1, 2, 3], "sparse": {"zz": [1]}}, UnknownFeature, "samples[0].sparse.zz"),
        ({"dense": [1, 2, 3], "sparse": {"fa": [1, 10]}}, IdOutOfRange, "samples[0].sparse.fa[1]"),
        ({"dense": [1, 2, 3], "sparse": {"fa": [-1]}}, IdOutOfRange, "samples[0].sparse.fa[0]"),
        ({"dense": [1, 2, 3], "sparse": {"fa": [2**70]}}, IdOutOfRange, "samples[0].sparse.fa[0]"),
        ({"dense": [1, 2, 3], "sparse": {"fa": [1.0]}}, BadRequest, "samples[0].sparse.fa"),
        ({"dense": [1, 2, 3], "sparse": {"fa": [True]}}, BadRequest, "samples[0].sparse.fa"),
        (
            {"dense": [1, 2, 3], "sparse": {"fa": [1]}, "weights": {"fa": [1, 2]}},
            BadRequest,
            "samples[0].weights.fa",
        ),
        ({"dense": [1, 2, 3], "extra": 1}, BadRequest, "samples[0].extra"),
        ("nope", BadRequest, "samples[0]"),
        ({"sparse": {"fa": [1]}}, BadRequest, "samples[0].dense"),
        ({"dense": None}, BadRequest, "samples[0].dense"),
        # Features after the first: ids of all features are checked as one array.
        ({"dense": [1, 2, 3], "sparse": {"fb": [1, 7]}}, IdOutOfRange, "samples[0].sparse.fb[1]"),
        (
            {"dense": [1, 2, 3], "sparse": {"fc": [6, 6, 0, -2], "fa": [9]}},
            IdOutOfRange,
            "samples[0].sparse.fc[3]",
        ),
        ({"dense": [1, 2, 3], "sparse": {"fc": [0, "1"]}}, BadRequest, "samples[0].sparse.fc"),
    ],
)
def test_errors_name_the_field(sample, error, field: str) -> None:
    good = {"dense": [0, 0, 0], "sparse": {"fa": [9, 0], "fb": [6], "fc": [1]}}
    with pytest.raises(error) as info:
        parse_samples([good, sample], M)
    assert info.value.field == field.replace("samples[0]", "samples[1]")
    with pytest.raises(error) as info:  # the same mistake in the first sample
        parse_samples([sample, good], M)
    assert info.value.field == field


def test_samples_may_share_one_dense_list() -> None:
    """A ranking request's candidates share the context's dense list: checked once, used
    by every sample; another list is checked again."""
    dense = [1, 2, 3]
    batch = parse_samples([{"dense": dense}, {"dense": dense}, {"dense": [4, 5, 6]}], M)
    np.testing.assert_array_equal(batch.dense, [[1, 2, 3], [1, 2, 3], [4, 5, 6]])
    with pytest.raises(BadRequest) as info:
        parse_samples([{"dense": dense}, {"dense": dense}, {"dense": [4, 5, None]}], M)
    assert info.value.field == "samples[2].dense"


GOOD = [
    {"dense": [0, 0, 0], "sparse": {"fa": [0, 1, 2]}},
    {"dense": [0, 0, 0], "sparse": {"fa": [1, 0]}},
]


@pytest.mark.parametrize(
    "bad, error, field",
    [
        ([3, True], BadRequest, "samples[2].sparse.fa"),
        ([False, 3], BadRequest, "samples[2].sparse.fa"),
        ([3, 1.5], BadRequest, "samples[2].sparse.fa"),
        ([3, "4"], BadRequest, "samples[2].sparse.fa"),
        ([3, None], BadRequest, "samples[2].sparse.fa"),
        ([3, [4]], BadRequest, "samples[2].sparse.fa"),
        ([3, 2**63], IdOutOfRange, "samples[2].sparse.fa[1]"),
        ([3, -(2**63) - 1], IdOutOfRange, "samples[2].sparse.fa[1]"),
    ],
)
def test_bad_ids_after_good_ones_name_their_sample(bad, error, field: str) -> None:
    with pytest.raises(error) as info:
        parse_samples([*GOOD, {"dense": [0, 0, 0], "sparse": {"fa": bad}}], M)
    assert info.value.field == field


def test_ids_zero_and_one_are_integers_not_booleans() -> None:
    batch = parse_samples(GOOD, M)
    assert batch.bags["fa"].ids.dtype == np.int64
    assert batch.bags["fa"].ids.tolist() == [0, 1, 2, 1, 0]


def test_predict_cli_names_sample_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_tiny(tmp_path / "m")
    (tmp_path / "req.json").write_text(
        '[{"dense": [0,0,0]}, {"dense": [0,0,0], "sparse": {"fb": [7]}}]'
    )
    assert (
        main(["predict", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "req.json")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["recserve predict: error: samples[1].sparse.fb[0]: id 7 is outside [0, 7)"]
