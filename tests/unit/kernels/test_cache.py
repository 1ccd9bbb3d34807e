"""The compiled kernels are cached on disk: a second process loads them instead of compiling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import kernels
from kernels.fused import one_table, pool_tables_kernel, pool_tables_serial
kernels.warm_up()
fns = (one_table, pool_tables_kernel, pool_tables_serial)
print(sum(sum(f.stats.cache_hits.values()) for f in fns),
      sum(sum(f.stats.cache_misses.values()) for f in fns))
"""


def run_probe(cache_dir: Path) -> tuple[int, int]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    hits, misses = done.stdout.split()
    return int(hits), int(misses)


def test_second_process_loads_from_cache(tmp_path: Path) -> None:
    hits, compiled = run_probe(tmp_path)
    assert hits == 0 and compiled >= 2  # serial (and parallel) kernels, int64 and int32 ids
    hits, compiled = run_probe(tmp_path)
    assert hits >= 2 and compiled == 0  # loaded, not compiled
