"""Files replaced whole and durably: written under a temporary name, fsync'ed, renamed into
place, and the directory synced so the new name survives a crash (the update log and
compaction's files)."""

from __future__ import annotations

import os
from pathlib import Path


def replace_file(path: Path, data: bytes, *, sync_parent: bool = True) -> None:
    """``path`` holding ``data``: a crash leaves the old file or the new one, whole. Without
    ``sync_parent`` the caller syncs the directory (``sync_dir``, once for many files)."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
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
