"""CPU lists for ``shardd --kernel-cpus`` and the split of the process's CPUs."""

from __future__ import annotations

import pytest

from recserve.contracts.errors import ConfigError
from shardd.cpus import confine, parse_cpus, split


def test_cpu_lists_parse_like_linux() -> None:
    assert parse_cpus("3") == {3}
    assert parse_cpus("0,2-4") == {0, 2, 3, 4}
    assert parse_cpus(" 1 , 1-2 ") == {1, 2}
    for bad in ("", "a", "3-1", "-1", "1-", "1,,2"):
        with pytest.raises(ConfigError, match="--kernel-cpus"):
            parse_cpus(bad)
    with pytest.raises(ConfigError, match="--cpus 'x'"):
        parse_cpus("x", flag="--cpus")


def test_a_shard_is_confined_only_to_cpus_it_may_use() -> None:
    with pytest.raises(ConfigError, match="--cpus 2,5: this process may only run on 0,1"):
        confine(frozenset({2, 5}), frozenset({0, 1}))


def test_the_kernel_cpus_must_leave_some_for_the_loop() -> None:
    assert split(frozenset({1}), frozenset({0, 1})) == {0}
    assert split(frozenset({2, 3}), frozenset({0, 1, 2, 3})) == {0, 1}
    with pytest.raises(ConfigError, match="leaves no CPU of 0,1"):
        split(frozenset({0, 1}), frozenset({0, 1}))
    with pytest.raises(ConfigError, match="may only run on 0,1"):
        split(frozenset({5}), frozenset({0, 1}))
