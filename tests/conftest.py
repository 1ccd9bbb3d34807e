"""Shared fixtures: the reference models under tests/fixtures (a copy of shared/'s), so a
fresh clone tests on its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("RECSERVE_FIXTURES", ROOT / "tests" / "fixtures" / "dlrm_dev"))
DEV_MODELS = ("D1", "D2", "D3", "D4_torchrec", "D5_dcn")
TORCHREC_MODELS = ("D4_torchrec", "D5_dcn")  # the rest are facebookresearch/dlrm's


def importer_of(name: str) -> str:
    """The ``recserve import`` source that reads fixture ``name``'s checkpoint."""
    return "torchrec" if name in TORCHREC_MODELS else "dlrm"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES} (set RECSERVE_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> None:
    """Fill numba's on-disk cache once, before any test starts daemons: on a fresh clone
    each daemon would otherwise compile the kernels itself (~10 s of CPU each), and a
    fixture that starts fifteen of them on two cores outwaits its readiness deadline."""
    import kernels

    kernels.warm_up()  # what the daemons call before reporting ready
