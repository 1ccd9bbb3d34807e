"""The systemd units: the settings a production unit needs, and systemd's own verdict."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "configs" / "systemd"
INSTALLED_BIN = "/opt/recserve/.venv/bin"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


@pytest.mark.parametrize(
    "name, env, script",
    [
        ("recserve-shardd@.service", "shardd.env", "recserve-shardd"),
        ("recserve-gateway.service", "gateway.env", "recserve-gateway"),
    ],
)
def test_unit_settings(name: str, env: str, script: str) -> None:
    service = unit(name)["Service"]
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    for key in ("NoNewPrivileges", "PrivateTmp"):
        assert service[key] == "yes"
    assert service["ProtectSystem"] == "strict" and service["ReadOnlyPaths"]
    assert service["EnvironmentFile"] == f"/etc/recserve/{env}"
    assert service["ExecStart"].startswith(f"{INSTALLED_BIN}/{script} ")
    assert script in (ROOT / "pyproject.toml").read_text()
    if "shardd" in name:
        assert int(service["WatchdogSec"]) > 0 and "--shard %i" in service["ExecStart"]
    defined = {
        line.split("=", 1)[0]
        for line in (UNITS / env).read_text().splitlines()
        if line and not line.startswith("#")
    }
    used = set(re.findall(r"\$\{?([A-Z_]+)\}?", service["ExecStart"]))
    assert used <= defined, used - defined


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    bin_dir = str(Path(sys.executable).parent)
    for source in UNITS.glob("*.service"):
        (tmp_path / source.name).write_text(source.read_text().replace(INSTALLED_BIN, bin_dir))
    (tmp_path / "recserve-shardd@0.service").symlink_to(tmp_path / "recserve-shardd@.service")
    done = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(tmp_path / "recserve-gateway.service"),
            str(tmp_path / "recserve-shardd@0.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr
    )
