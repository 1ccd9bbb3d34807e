"""The one place that builds the command line of a daemon (or of the load generator), for
everything that spawns them (``recserve up``, the demo, benchmarks, tests). recserve never
imports the daemons: they run as ``python -m shardd`` / ``python -m gateway`` children of
the same interpreter."""

from __future__ import annotations

import sys
from pathlib import Path


def shardd_argv(
    plan: Path | str,
    model: Path | str,
    shard: int,
    *extra: str,
    replica: int = 0,
    bind: str | None = None,
) -> list[str]:
    argv = [sys.executable, "-m", "shardd", "--plan", str(plan), "--model", str(model)]
    argv += ["--shard", str(shard), "--replica", str(replica)]
    if bind is not None:
        argv += ["--bind", bind]
    return [*argv, *extra]


def gateway_argv(
    model: Path | str,
    *extra: str,
    plan: Path | str | None = None,
    port: int = 8080,
    host: str = "127.0.0.1",
) -> list[str]:
    where = ["--singular"] if plan is None else ["--plan", str(plan)]
    argv = [sys.executable, "-m", "gateway", "--model", str(model), *where]
    return [*argv, "--host", host, "--port", str(port), *extra]


def loadgen_argv(url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loadgen", "--url", url, *extra]
