"""The shard daemon's configuration: what it derives from the flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardd.main import INLINE_MANY, INLINE_ONE, ShardConfig


def config(**flags: object) -> ShardConfig:
    return ShardConfig(plan=Path("plan.json"), model=Path("m"), shard=0, **flags)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flags", "limit"),
    [
        ({}, 0),  # parts mapped lazily: a page fault must not stall the loop
        ({"inline_ids": 5000}, 0),
        ({"preload": True, "kernel_threads": 1}, INLINE_ONE),
        ({"hugepages": True, "kernel_threads": 1}, INLINE_ONE),
        ({"preload": True, "kernel_threads": 3}, INLINE_MANY),
        ({"preload": True, "kernel_cpus": frozenset({2, 3}), "workers": 2}, INLINE_ONE),
        ({"preload": True, "kernel_threads": 3, "inline_ids": 5000}, 5000),
        ({"preload": True, "kernel_threads": 1, "inline_ids": 0}, 0),
    ],
)
def test_lookups_pooled_on_the_loop(flags: dict[str, object], limit: int) -> None:
    assert config(**flags).inline_limit == limit
