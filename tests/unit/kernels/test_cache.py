"""The compiled kernel is cached on disk: a second process loads it instead of compiling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import numpy as np, kernels
from kernels.fused import pool_tables_kernel
kernels.pool(np.ones((3, 8), np.float32), np.array([2, 0]), np.array([0]))
print(sum(pool_tables_kernel.stats.cache_hits.values()),
      sum(pool_tables_kernel.stats.cache_misses.values()))
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
    assert run_probe(tmp_path) == (0, 1)  # compiled and stored
    assert run_probe(tmp_path) == (1, 0)  # loaded, not compiled
