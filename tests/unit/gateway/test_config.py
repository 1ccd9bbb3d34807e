"""The gateway's configuration: defaults that depend on the machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.config import GatewayConfig
from recserve.contracts.errors import ConfigError


@pytest.mark.parametrize(
    ("cores", "workers", "threads", "want"),
    [
        (2, 1, None, 2),  # one worker: parse one request while another's dense runs
        (2, 2, None, 1),  # two workers on two cores: one thread each
        (8, 2, None, 2),
        (1, 1, None, 1),
        (2, 2, 3, 3),  # --threads wins
    ],
)
def test_executor_threads_follow_the_cores_each_worker_has(
    monkeypatch: pytest.MonkeyPatch, cores: int, workers: int, threads: int | None, want: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    config = GatewayConfig(model=Path("m"), workers=workers, threads=threads)
    assert config.executor_threads == want


@pytest.mark.parametrize(
    ("given", "workers", "want"),
    [
        (1, 2, 1),  # a pinned worker of two on two cores: its one CPU
        (4, 2, 2),  # of two on eight: its four CPUs, still at most two threads
        (2, 2, 2),
    ],
)
def test_a_pinned_worker_counts_the_cpus_it_was_given(
    monkeypatch: pytest.MonkeyPatch, given: int, workers: int, want: int
) -> None:
    # Read in the worker, after it was pinned: the affinity is its share, not the host's.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(given)))
    config = GatewayConfig(model=Path("m"), workers=workers, pin_workers=True)
    assert config.executor_threads == want


def test_zero_threads_are_refused() -> None:
    with pytest.raises(ConfigError, match="--threads"):
        GatewayConfig(model=Path("m"), threads=0)
