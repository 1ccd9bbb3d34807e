"""The study's bookkeeping: metric sums over label sets, and ratios to the right baseline."""

from __future__ import annotations

from recserve.local.study import _metric, markdown

METRICS = """# HELP recserve_gateway_shard_bytes Bytes to and from shards
# TYPE recserve_gateway_shard_bytes counter
recserve_gateway_shard_bytes_total{direction="sent"} 1000.0
recserve_gateway_shard_bytes_total{direction="received"} 24.0
recserve_gateway_shards_contacted_sum 12.0
recserve_gateway_shards_contacted_count 4.0
"""


def row(strategy: str, delay: float, p99: float, cpu: float) -> dict:
    return {
        "profile": "drm1", "strategy": strategy, "hosts": "netns", "delay_us": delay,
        "p50_ms": p99 / 2, "p99_ms": p99, "cpu_s_per_1k_samples": cpu, "rss_mb": 100,
        "shards_contacted_mean": 2.0, "wire_bytes_per_request": 2048, "errors": 0,
    }  # fmt: skip


def test_metric_sums_every_label_set() -> None:
    assert _metric(METRICS, "recserve_gateway_shard_bytes_total") == 1024.0
    assert _metric(METRICS, "recserve_gateway_shards_contacted_sum") == 12.0
    assert _metric(METRICS, "absent") == 0.0


def test_ratios_are_against_the_singular_run_at_the_same_delay() -> None:
    rows = [
        row("singular", 0, 10.0, 0.5),
        row("net", 0, 12.0, 0.6),
        row("singular", 1000, 20.0, 0.5),
        row("net", 1000, 30.0, 0.75),
    ]
    lines = markdown(rows).splitlines()
    assert "| 1.20x |" in lines[3] and "| 1.20x |" in lines[3].split("0.600")[1]
    assert "| 1.50x |" in lines[5]
