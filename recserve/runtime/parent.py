"""A child process that ends with its parent: Linux's parent-death signal."""

from __future__ import annotations

import contextlib
import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies, even by SIGKILL
    (no orphans holding ports or sockets); a no-op where ``prctl`` is missing. Call it in
    the child, after the fork."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
