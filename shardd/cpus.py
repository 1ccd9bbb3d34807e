"""Where a shard's threads run (``shardd --cpus`` and ``--kernel-cpus``).

``--cpus`` confines the whole daemon to some CPUs: its loop, ZeroMQ's I/O thread (which
every message wakes) and its workers. Four shards sharing two cores with their gateway, two
on each CPU, served 5 % more samples/s than unconfined ones in an interleaved A/B (single
benchmark runs: -3 to +19 %; 1-3 % in two runs of alternating rounds): a loop and the I/O
thread it wakes share one core's caches, and no lookup is moved to another CPU halfway
(``benchmarks/RESULTS.md``).

``--kernel-cpus`` keeps the kernel threads on cores of their own. A lookup's gather is
bound by memory, and on a shared core the scheduler slices it with the event loop, ZeroMQ's
I/O thread and anything else on the host. Measured on 2 cores with the same client and
code, wire throughput over the bare kernel's: 0.78x unpinned against 0.85x pinned, and
0.75x against 0.92x once the loop prepared each lookup for the worker. With
``--kernel-cpus`` the workers (and their OpenMP teams, which inherit the mask) run only on
those CPUs, and every other thread of the process only on the rest (of ``--cpus``, when
given).
"""

from __future__ import annotations

import os

from recserve.contracts.errors import ConfigError
from recserve.runtime.cpus import pin_process


def parse_cpus(text: str, flag: str = "--kernel-cpus") -> frozenset[int]:
    """A Linux CPU list: ``"3"``, ``"2-3"``, ``"0,2-3"`` (``flag`` names it in errors)."""
    cpus: set[int] = set()
    for item in text.split(","):
        lo, sep, hi = item.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ConfigError(
                f"{flag} {text!r}: expected CPU numbers and ranges like 0,2-3"
            ) from None
        if first < 0 or last < first:
            raise ConfigError(f"{flag} {text!r}: bad range {item.strip()!r}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def confine(cpus: frozenset[int], allowed: frozenset[int] | None = None) -> None:
    """Run the whole process (every thread it has, and every thread it starts) only on
    ``cpus``, which must be CPUs it may use now."""
    allowed = allowed if allowed is not None else frozenset(os.sched_getaffinity(0))
    if not cpus <= allowed:
        raise ConfigError(f"--cpus {_fmt(cpus)}: this process may only run on {_fmt(allowed)}")
    pin_process(cpus)


def split(kernel: frozenset[int], allowed: frozenset[int] | None = None) -> frozenset[int]:
    """The CPUs left for everything but the kernel threads; ``kernel`` must be a strict
    subset of the CPUs this process may use."""
    allowed = allowed if allowed is not None else frozenset(os.sched_getaffinity(0))
    if not kernel <= allowed:
        raise ConfigError(
            f"--kernel-cpus {_fmt(kernel)}: this process may only run on {_fmt(allowed)}"
        )
    rest = allowed - kernel
    if not rest:
        raise ConfigError(
            f"--kernel-cpus {_fmt(kernel)} leaves no CPU of {_fmt(allowed)} for the event "
            "loop and ZeroMQ"
        )
    return rest


def pin(cpus: frozenset[int]) -> None:
    """Run the calling thread (and the threads it starts later) only on ``cpus``."""
    os.sched_setaffinity(0, cpus)


def _fmt(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))
