"""The load generator against a real gateway process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram

from loadgen.main import main as loadgen
from recserve.cli import main as cli
from recserve.local.cluster import LocalCluster
from tests.integration.shards import free_port


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lg")
    assert cli(["synth", "--profile", "drm2", "--size", "4MiB", "--out", str(root / "m")]) == 0
    return root / "m"


@pytest.fixture(scope="module")
def gateway_url(model: Path):
    with LocalCluster(model, singular=True, port=free_port()) as cluster:
        yield cluster.url


def test_columns_format(gateway_url: str, tmp_path: Path) -> None:
    report = tmp_path / "cols.json"
    args = ["--url", gateway_url, "--qps", "30", "--duration", "1", "--format", "columns"]
    assert loadgen([*args, "--candidates", "4", "--report", str(report), "--quiet"]) == 0
    run = json.loads(report.read_text())["runs"][0]
    assert run["ok"] > 10 and not run["errors"]


def test_open_loop_report_and_plot(
    gateway_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, plot = tmp_path / "r.json", tmp_path / "p.png"
    assert (
        loadgen(
            [
                "--url",
                gateway_url,
                "--qps",
                "40",
                "--duration",
                "2",
                "--candidates",
                "8",
                "--format",
                "msgpack",
                "--report",
                str(report),
                "--plot",
                str(plot),
                "--quiet",
            ]
        )
        == 0
    )
    run = json.loads(report.read_text())["runs"][0]
    assert run["ok"] > 40 and not run["errors"]
    assert 0 < run["latency_ms"]["p50"] <= run["latency_ms"]["p99"] <= run["latency_ms"]["max"]
    every = HdrHistogram.decode(run["histogram_us"])  # every request's latency, to pool runs
    assert every.get_total_count() == run["ok"]
    assert every.get_value_at_percentile(99) / 1e3 == pytest.approx(run["latency_ms"]["p99"])
    assert run["samples_per_s"] == pytest.approx(run["achieved_qps"] * 8)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "p99.9 ms" in capsys.readouterr().out


def test_closed_loop_and_sweep(gateway_url: str, tmp_path: Path) -> None:
    report = tmp_path / "c.json"
    assert (
        loadgen(
            [
                "--url",
                gateway_url,
                "--concurrency",
                "4",
                "--duration",
                "1.5",
                "--samples",
                "4",
                "--report",
                str(report),
                "--quiet",
            ]
        )
        == 0
    )
    run = json.loads(report.read_text())["runs"][0]
    assert run["label"] == "closed x4" and run["ok"] > 0 and run["offered_qps"] is None
    assert (
        loadgen(
            [
                "--url",
                gateway_url,
                "--sweep",
                "--slo-ms",
                "0.001",
                "--duration",
                "1",
                "--report",
                str(report),
                "--quiet",
            ]
        )
        == 0
    )
    runs = json.loads(report.read_text())["runs"]
    assert runs[-1]["label"] == "no rate held the SLO" and runs[0]["offered_qps"] == 5.0


def test_unreachable_gateway_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert loadgen(["--url", f"http://127.0.0.1:{free_port()}", "--duration", "1"]) == 2
    assert "cannot reach" in capsys.readouterr().err
