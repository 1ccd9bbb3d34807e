"""Binding an endpoint exclusively.

ZeroMQ lets a second process bind the same ``ipc://`` path and silently take over the socket
file, so two daemons could share one endpoint with half the clients each. An ``ipc://`` bind
therefore holds an exclusive lock on ``<path>.lock`` first; a tcp bind already fails when the
port is taken, and that error is made clear.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

import zmq

from recserve.contracts.errors import ConfigError


@contextlib.contextmanager
def bound(sock: zmq.Socket, endpoint: str) -> Iterator[str]:
    """Bind ``sock`` to ``endpoint`` for the duration; yields the endpoint as bound."""
    lock_fd = None
    path = endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None
    if path is not None:
        lock_path = path + ".lock"
        lock_fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise ConfigError(
                f"{endpoint} is served by another shard daemon (it holds "
                f"{lock_path}); stop it or bind elsewhere"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket file of a daemon that died
    try:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            hint = " (another process listens there)" if exc.errno == errno.EADDRINUSE else ""
            raise ConfigError(f"cannot bind {endpoint}: {exc.strerror}{hint}") from None
        yield sock.getsockopt_string(zmq.LAST_ENDPOINT)
    finally:
        with contextlib.suppress(zmq.ZMQError):
            sock.unbind(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        if path is not None and lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + ".lock")
            os.close(lock_fd)
