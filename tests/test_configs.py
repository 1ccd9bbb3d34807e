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
    assert f"/etc/recserve/{env}" in (UNITS / name).read_text()
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


HARDENING = {
    "CapabilityBoundingSet": "",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectProc": "invisible",
    "RestrictNamespaces": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
    "LimitNOFILE": "65536",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
}


def settings(name: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit, keys that repeat (LoadCredential=) with all values."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize(
    "name, credentials",
    [
        ("recserve-shardd@.service", {"server.key_secret", "client.key", "server.key"}),
        ("recserve-gateway.service", {"client.key_secret", "server.key"}),
    ],
)
def test_unit_hardening(name: str, credentials: set[str]) -> None:
    found = settings(name)
    for key, value in HARDENING.items():
        assert found.get(key) == [value], (key, found.get(key))
    assert "@system-service" in found["SystemCallFilter"]
    assert "MemoryMax" in found and "MemoryHigh" in found
    assert "LimitMEMLOCK" not in found
    # Each service its own numba cache, inside its own cache directory.
    cache = found["CacheDirectory"][0]
    assert found["Environment"] == [f"NUMBA_CACHE_DIR=/var/cache/{cache}/numba"]
    # Only the keys this side needs, as credentials, handed over as --curve-keys %d.
    assert {c.split(":", 1)[0] for c in found["LoadCredential"]} == credentials
    assert "--curve-keys %d" in found["ExecStart"][0]


def test_units_do_not_share_a_numba_cache() -> None:
    caches = [
        settings(n)["Environment"][0]
        for n in ("recserve-shardd@.service", "recserve-gateway.service")
    ]
    assert len(set(caches)) == 2


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


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    """The exposure README quotes: at most 2.0 ("OK") for both units."""
    for source in UNITS.glob("*.service"):
        (tmp_path / source.name).write_text(source.read_text())
    (tmp_path / "recserve-shardd@0.service").symlink_to(tmp_path / "recserve-shardd@.service")
    for name in ("recserve-gateway.service", "recserve-shardd@0.service"):
        done = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
        assert level and float(level.group(1)) <= 2.0, done.stdout[-500:]
