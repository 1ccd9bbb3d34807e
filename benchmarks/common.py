"""Shared benchmark plumbing: robust timing on a shared, noisy 2-core machine.

Contenders run in blocks rather than interleaved call by call: torch's and numba's OpenMP
pools each spin for a while after a parallel region, and alternating them call by call
measures their fight, not the kernels. Each block starts with a timed warm-up (the contender
runs for at least ``WARM_S``), which lets the other pool's threads go idle and keeps the
vCPUs awake: after a sleep, a VM's first calls pay milliseconds of wake-up. The warm-up
cycles through inputs of its own, as many as the timed ones and like them: after calls that
find their rows cached (one warm-up input repeated), the memory system is idle, and the
first calls that miss pay for waking it (on this machine kind, 256 bags of 20 random rows of
a 10M-row table took 160-230 us a call for the first ~20 such calls, ~100 us a call back to
back on fresh ids), which would time the transition rather than the kernels. Block order
rotates between rounds; results are medians over all repetitions.
"""

from __future__ import annotations

import statistics
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgpack
import zmq
from prometheus_client.parser import text_string_to_metric_families

from recserve.rpc.deadline import Deadline
from recserve.rpc.wire import pack_header, request

WARM_S = 0.05
T = TypeVar("T")


def round_times(
    contenders: dict[str, Callable[[Any], object]],
    inputs: Sequence[Any],
    warmup: Sequence[Any],
    *,
    rounds: int = 3,
    slow: dict[str, int] | None = None,
) -> dict[str, list[float]]:
    """Median seconds per call of each contender in each round, contenders in rotating
    blocks, each block's warm-up cycling through ``warmup`` (inputs the timed calls do not
    use). Memory speed on a shared host drifts by several times within seconds, so
    compare contenders round by round (``median_ratio``), not across the whole run.

    Contenders named in ``slow`` run on that many inputs a round.
    """
    if not warmup:
        raise ValueError("round_times needs at least one warm-up input")
    slow = slow or {}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in rotated(names, r):
            fn = contenders[name]
            deadline = time.perf_counter() + WARM_S
            fn(warmup[0])
            k = 1
            while time.perf_counter() < deadline:
                fn(warmup[k % len(warmup)])
                k += 1
            calls = []
            for item in inputs[: slow.get(name, len(inputs))]:
                start = time.perf_counter()
                fn(item)
                calls.append(time.perf_counter() - start)
            times[name].append(statistics.median(calls))
    return times


def rotated(items: Sequence[T], r: int) -> list[T]:
    """``items`` in round ``r``'s order: each round starts one later, so no contender always
    runs first (or right after the same one)."""
    k = r % len(items)
    return [*items[k:], *items[:k]]


def median_ratio(slower: Sequence[float], faster: Sequence[float]) -> float:
    """Median over rounds of ``slower[r] / faster[r]`` (how many times faster)."""
    return statistics.median(a / b for a, b in zip(slower, faster, strict=True))


def run_cli(args: Sequence[str]) -> None:
    """Run one ``recserve`` subcommand in-process; a failure stops the benchmark (not an
    ``assert``, which ``python -O`` would skip together with the command)."""
    from recserve.cli import main as cli

    rc = cli(list(args))
    if rc != 0:
        raise SystemExit(f"recserve {' '.join(args)} failed with exit code {rc}")


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def histograms(url: str, prefix: str) -> dict[str, dict[float, float]]:
    """The cumulative bucket counts (upper bound -> count) of every histogram series at
    ``url``'s ``/metrics`` whose name starts with ``prefix``, by ``name{labels}``."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram" or not family.name.startswith(prefix):
            continue
        for s in family.samples:
            if s.name.endswith("_bucket"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
                key = f"{family.name}{{{labels}}}" if labels else family.name
                out.setdefault(key, {})[float(s.labels["le"])] = s.value
    return out


def tail(
    spans: Sequence[tuple[dict[float, float], dict[float, float]]], above: float
) -> tuple[int, float, float]:
    """Of the observations of one histogram between each pair of snapshots ``(before,
    after)``, all together: their count, the share above ``above`` (a bucket bound) and the
    P99 as the upper bound of its bucket."""
    bounds = sorted(spans[-1][1]) if spans else []
    counts = [sum(a.get(b, 0.0) - s.get(b, 0.0) for s, a in spans) for b in bounds]
    n = counts[-1] if counts else 0.0
    if not n:
        return 0, 0.0, 0.0
    share = 1 - counts[bounds.index(above)] / n
    p99 = next(b for b, c in zip(bounds, counts, strict=True) if c >= 0.99 * n)
    return int(n), share, p99


def shard_stats(endpoint: str) -> dict[str, Any]:
    """A shard daemon's ``stats`` reply (its counts since it started)."""
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(pack_header(request("stats", 1, Deadline.after(5000).at_ms)))
        if not sock.poll(5000):
            raise SystemExit(f"no stats from {endpoint}")
        reply: dict[str, Any] = msgpack.unpackb(sock.recv_multipart()[0])
        return reply
