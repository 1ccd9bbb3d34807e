"""Processes under a cgroup v1 memory limit, for larger-than-memory runs on one machine.

The v1 memory controller charges a cgroup for the anonymous memory of its processes *and*
the page cache they cause, so a shard started in a group limited below its tables' size
is a real larger-than-memory setup. Needs root and ``/sys/fs/cgroup/memory``; the group is
removed on exit (its processes killed first), also when the body fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path("/sys/fs/cgroup/memory")


def available() -> str | None:
    """None when memory groups can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if not (ROOT / "memory.limit_in_bytes").exists():
        return "no cgroup v1 memory controller at /sys/fs/cgroup/memory"
    return None


def drop_caches() -> None:
    """Write dirty pages and drop the page cache, so pages cached before are not free."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class MemoryGroup:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, name: str) -> int:
        return int((self.path / name).read_text().split()[0])

    def stat(self) -> dict[str, int]:
        """``memory.stat`` of the group (``rss``, ``cache``, ``mapped_file``, ...)."""
        lines = (self.path / "memory.stat").read_text().splitlines()
        return {k: int(v) for k, v in (line.split() for line in lines)}

    @property
    def max_usage(self) -> int:
        return self.read("memory.max_usage_in_bytes")

    @property
    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the group (it joins before it execs)."""
        join = f'echo $$ > {self.path}/cgroup.procs && exec "$@"'
        return subprocess.Popen(["sh", "-c", join, "sh", *argv], **kwargs)

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]


@contextlib.contextmanager
def memory_group(limit: int | None, name: str = "recserve") -> Iterator[MemoryGroup]:
    """A new memory group limited to ``limit`` bytes (None: no limit, only accounting)."""
    why = available()
    if why is not None:
        raise RuntimeError(f"cannot make a memory cgroup: {why}")
    path = ROOT / f"{name}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    group = MemoryGroup(path)
    try:
        if limit is not None:
            (path / "memory.limit_in_bytes").write_text(f"{limit}\n")
        yield group
    finally:
        for _ in range(50):
            pids = group.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        # Charged page cache (or a process still exiting) can keep a group busy for a
        # while after its last process: retry for up to 30 s, then say it was left.
        deadline = time.monotonic() + 30.0
        while True:
            try:
                path.rmdir()
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    warnings.warn(f"memory cgroup {path} left behind: {exc}", stacklevel=2)
                    break
                with contextlib.suppress(OSError):
                    (path / "memory.force_empty").write_text("0\n")
                time.sleep(0.1)
