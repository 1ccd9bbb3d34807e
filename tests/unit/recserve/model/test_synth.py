"""Synthetic models: deterministic, sized as asked, shaped like their profile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recserve.cli import main
from recserve.contracts.errors import ConfigError
from recserve.model.scorer import Model
from recserve.model.synth import PROFILES, synthesize
from recserve.model.workload import Workload

SIZE = 4 << 20


@pytest.mark.parametrize("profile", sorted(set(PROFILES) - {"dlrmv2"}))  # its own test
def test_profile_shape(profile: str, tmp_path: Path) -> None:
    m = synthesize(profile, SIZE, tmp_path, seed=3, progress=False)
    p = PROFILES[profile]
    assert len(m.tables) == p.user_tables + p.item_tables
    assert {t.net for t in m.tables} == {"user", "item"}
    assert abs(m.table_bytes - SIZE) <= 0.02 * SIZE
    rows = sorted(t.rows for t in m.tables)
    assert rows[-1] >= 20 * rows[len(rows) // 2]  # sizes span orders of magnitude
    for t in m.tables:
        lo, hi = p.user_pooling if t.net == "user" else p.item_pooling
        assert t.stats.pooling_factor is not None and lo <= t.stats.pooling_factor <= hi
        assert t.stats.zipf is not None
    if p.dominant_share:
        assert m.tables[0].nbytes / m.table_bytes == pytest.approx(p.dominant_share, abs=0.02)
    # Scores are calibrated: spread, not saturated.
    scores = Model.open(tmp_path, check=True).score(Workload(m, 11).batch(400))
    assert 0.05 < scores.mean() < 0.25 and scores.std() > 0.03


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = synthesize("drm2", SIZE, tmp_path / "a", seed=5, progress=False)
    b = synthesize("drm2", SIZE, tmp_path / "b", seed=5, progress=False)
    c = synthesize("drm2", SIZE, tmp_path / "c", seed=6, progress=False)
    assert a.files == b.files and a.digest() == b.digest()
    assert a.files != c.files


def test_too_small_and_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="too small"):
        synthesize("drm1", 1000, tmp_path)
    with pytest.raises(ConfigError, match="unknown profile"):
        synthesize("drm9", SIZE, tmp_path)


def test_cli_synth_then_quantize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--profile", "drm3", "--size", "2MiB", "--out", str(tmp_path / "m")]) == 0
    assert (
        main(
            [
                "quantize",
                "--model",
                str(tmp_path / "m"),
                "--dtype",
                "int8",
                "--out",
                str(tmp_path / "q"),
                "--samples",
                "128",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "scores: absolute error mean" in out
    original, quantized = Model.open(tmp_path / "m"), Model.open(tmp_path / "q", check=True)
    assert {t.dtype for t in quantized.manifest.tables} == {"int8"}
    batch = Workload(original.manifest, 2).batch(64)
    np.testing.assert_allclose(quantized.score(batch), original.score(batch), atol=0.02)
    assert (
        main(
            [
                "quantize",
                "--model",
                str(tmp_path / "q"),
                "--dtype",
                "fp16",
                "--out",
                str(tmp_path / "q2"),
            ]
        )
        == 2
    )
    assert "already int8" in capsys.readouterr().err


def test_dlrmv2_profile_has_mlperf_shapes(tmp_path: Path) -> None:
    """Criteo 1TB row counts with the large tables scaled to --size, fixed multi-hot bags,
    a 3-layer rank-512 cross network, and scores that spread around the click rate."""
    size = 96 << 20
    m = synthesize("dlrmv2", size, tmp_path / "m", seed=1)
    assert len(m.tables) == 26 and m.embedding_dim == 128 and m.dense_width == 13
    inter = m.dense.interaction
    assert (inter.kind, inter.layers, inter.rank) == ("dcn", 3, 512)
    assert m.dense.bottom.sizes == (13, 512, 256, 128)
    assert m.dense.top.sizes == (128 * 27, 1024, 1024, 512, 256, 1)
    rows = [t.rows for t in m.tables]
    assert rows[1:9] == [39060, 17295, 7424, 20265, 3, 7122, 1543, 63]  # small: as in Criteo
    assert len({rows[i] for i in (0, 9, 19, 20, 21)}) == 1 and rows[0] < 40_000_000
    assert abs(m.table_bytes - size) < 0.01 * size
    assert [t.stats.bag_size for t in m.tables][:5] == [3, 2, 1, 2, 6]
    batch = Workload(m, seed=2).batch(64)
    assert (batch.bags["cat_20"].lengths() == 100).all()
    scores = Model.open(tmp_path / "m").score(batch)
    assert 0.01 < float(scores.mean()) < 0.5 and float(scores.std()) > 0.01


def test_cli_profiles_are_the_synth_profiles() -> None:
    from recserve import cli

    assert set(cli.PROFILES) == set(PROFILES)
