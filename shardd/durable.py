"""Files replaced whole and durably: written under a temporary name, fsync'ed, renamed into
place, and the directory synced so the new name survives a crash (the update log and
compaction's files)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

IOV_MAX = 1024  # Linux's limit on one writev's buffers


def byte_view(buffer: Any) -> memoryview:
    """``buffer``'s bytes, not copied (a numpy array must be C-contiguous; it may be empty,
    which ``memoryview.cast`` refuses for more than one dimension)."""
    if isinstance(buffer, np.ndarray):
        if not buffer.flags.c_contiguous:
            raise ValueError("only a C-contiguous array is written from its own memory")
        buffer = buffer.reshape(-1).view(np.uint8)
    return memoryview(buffer).cast("B")


def write_all(fd: int, buffers: Sequence[Any]) -> int:
    """Write ``buffers`` in order to ``fd`` (``writev``: no copy to join them, and the GIL
    released while the kernel copies); returns the bytes written."""
    views = [byte_view(b) for b in buffers]
    views = [v for v in views if v.nbytes]
    total = 0
    while views:
        done = os.writev(fd, views[:IOV_MAX])
        total += done
        while views and done >= views[0].nbytes:  # a short write: go on where it stopped
            done -= views[0].nbytes
            views.pop(0)
        if done:
            views[0] = views[0][done:]
    return total


def replace_file(path: Path, data: bytes | Sequence[Any], *, sync_parent: bool = True) -> None:
    """``path`` holding ``data`` (bytes, or buffers written in order): a crash leaves the
    old file or the new one, whole. Without ``sync_parent`` the caller syncs the directory
    (``sync_dir``, once for many files)."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb", buffering=0) as f:
        write_all(f.fileno(), [data] if isinstance(data, bytes | bytearray) else data)
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_parent:
        sync_dir(path.parent)


def sync_dir(path: Path) -> None:
    """Make the names created in ``path`` durable (the files' own data is fsync'ed by
    whoever wrote them)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
