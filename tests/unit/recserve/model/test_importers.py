"""Every dev fixture through ``recserve import`` + ``recserve predict`` reproduces its
reference outputs (produced by facebookresearch/dlrm and torchrec) to 1e-5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recserve.cli import main
from tests.conftest import DEV_MODELS, importer_of


def import_fixture(fixture: Path, out: Path) -> None:
    source = importer_of(fixture.name)
    assert (
        main(["import", source, "--checkpoint", str(fixture / "model.pt"), "--out", str(out)]) == 0
    )


def predict_scores(model: Path, request: Path, tmp_path: Path) -> np.ndarray:
    out = tmp_path / "scores.json"
    assert (
        main(["predict", "--model", str(model), "--input", str(request), "--output", str(out)]) == 0
    )
    return np.array(json.loads(out.read_text())["scores"])


@pytest.mark.parametrize("name", DEV_MODELS)
def test_fixture_reproduces_expected(name: str, fixtures_dir: Path, tmp_path: Path) -> None:
    fixture = fixtures_dir / name
    import_fixture(fixture, tmp_path / "model")
    for batch in (1, 17, 256):
        got = predict_scores(
            tmp_path / "model", fixture / f"batch_{batch}" / "request.json", tmp_path
        )
        want = np.load(fixture / f"expected_{batch}.npy")[:, 0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_dlrm_wrapped_state_dict(fixtures_dir: Path, tmp_path: Path) -> None:
    state = torch.load(fixtures_dir / "D1" / "model.pt", weights_only=True)
    torch.save({"state_dict": state, "iter": 10}, tmp_path / "wrapped.pt")
    assert (
        main(
            [
                "import",
                "dlrm",
                "--checkpoint",
                str(tmp_path / "wrapped.pt"),
                "--out",
                str(tmp_path / "m"),
                "--feature-names",
                "a,b,c,d,e",
            ]
        )
        == 0
    )
    request = json.loads((fixtures_dir / "D1" / "batch_17" / "request.json").read_text())
    renamed = [
        {"dense": s["dense"], "sparse": {"abcde"[int(k)]: v for k, v in s["sparse"].items()}}
        for s in request
    ]
    (tmp_path / "req.json").write_text(json.dumps(renamed))
    got = predict_scores(tmp_path / "m", tmp_path / "req.json", tmp_path)
    np.testing.assert_allclose(
        got, np.load(fixtures_dir / "D1" / "expected_17.npy")[:, 0], atol=1e-5
    )


class Evil:
    def __reduce__(self):  # pragma: no cover - never run: the loader must refuse it
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"emb_l.0.weight": torch.zeros(2, 2), "x": Evil()}, tmp_path / "evil.pt")
    assert (
        main(
            [
                "import",
                "dlrm",
                "--checkpoint",
                str(tmp_path / "evil.pt"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "refused" in err and "pwned" not in err
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_contradicting_interaction_flag_fails(
    fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "import",
                "dlrm",
                "--checkpoint",
                str(fixtures_dir / "D1" / "model.pt"),
                "--interaction",
                "cat",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    assert "no interaction gives the top MLP's input width 23" in capsys.readouterr().err


def test_not_a_dlrm_checkpoint(
    fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "import",
                "dlrm",
                "--checkpoint",
                str(fixtures_dir / "D4_torchrec" / "model.pt"),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "no emb_l.<k>.weight keys" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["D1", "D3", "D4_torchrec"])
def test_npz_import(name: str, fixtures_dir: Path, tmp_path: Path) -> None:
    fixture = fixtures_dir / name
    meta = json.loads((fixture / "model.json").read_text())
    arrays = {
        p.stem: np.load(p)
        for p in fixture.glob("*.npy")
        if p.stem.startswith(("emb_", "bot_", "top_"))
    }
    np.savez(tmp_path / "w.npz", **arrays)
    arch = {
        "name": name,
        "interaction": meta["interaction"],
        "interaction_itself": meta["interaction_itself"],
        "bottom_activations": meta["bottom_activations"],
        "top_activations": meta["top_activations"],
        "final_sigmoid": bool(meta.get("final_sigmoid_applied_outside_model")),
    }
    if meta["interaction"] == "dot":
        arch["interaction_order"] = meta["interaction_order"]
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    assert (
        main(
            [
                "import",
                "npz",
                "--weights",
                str(tmp_path / "w.npz"),
                "--arch",
                str(tmp_path / "arch.json"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    got = predict_scores(tmp_path / "m", fixture / "batch_256" / "request.json", tmp_path)
    np.testing.assert_allclose(got, np.load(fixture / "expected_256.npy")[:, 0], atol=1e-5)


def test_npz_arch_rejects_unknown_keys(
    fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "w.npz", emb_0=np.zeros((2, 2), np.float32))
    (tmp_path / "arch.json").write_text('{"interaction": "dot", "colour": "red"}')
    assert (
        main(
            [
                "import",
                "npz",
                "--weights",
                str(tmp_path / "w.npz"),
                "--arch",
                str(tmp_path / "arch.json"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    assert "colour: unknown key" in capsys.readouterr().err


def test_dcn_checkpoint_with_disagreeing_cross_shapes_is_refused(
    fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = torch.load(fixtures_dir / "D5_dcn" / "model.pt", weights_only=True)
    state["inter_arch.crossnet.W_kernels.1"] = torch.zeros(48, 5)  # rank 5, not 4
    torch.save(state, tmp_path / "bad.pt")
    args = ["import", "torchrec", "--checkpoint", str(tmp_path / "bad.pt")]
    assert main([*args, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "inter_arch.crossnet.W_kernels.1 has shape (48, 5), expected (48, 4)" in err


def test_dcn_model_quantized_to_int8_stays_close(
    fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """int8 row-wise tables under DLRM-v2's cross network: scores within 0.01 of fp32 on
    the fixture's batches (the quantize report states the error on sampled traffic)."""
    fixture = fixtures_dir / "D5_dcn"
    import_fixture(fixture, tmp_path / "fp32")
    args = ["quantize", "--model", str(tmp_path / "fp32"), "--dtype", "int8"]
    assert main([*args, "--out", str(tmp_path / "int8")]) == 0
    assert "scores: absolute error" in capsys.readouterr().out
    request = fixture / "batch_256" / "request.json"
    exact = predict_scores(tmp_path / "fp32", request, tmp_path)
    quantized = predict_scores(tmp_path / "int8", request, tmp_path)
    assert np.abs(quantized - exact).max() < 0.01
