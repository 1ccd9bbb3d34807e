"""CURVE between the gateway and the shards: encrypted, and only known clients served.

``recserve keygen --out DIR`` writes two key pairs in pyzmq's certificate format
(``zmq.auth``): ``server.key`` / ``server.key_secret`` for the shards and ``client.key`` /
``client.key_secret`` for the gateway. A shard started with ``--curve-keys DIR`` loads
``server.key_secret`` and accepts only clients whose public key is among the ``*.key``
files of DIR (checked by ZAP, ``zmq.auth``'s authenticator); a gateway with ``--curve-keys
DIR`` loads ``client.key_secret`` and ``server.key``. Each service needs only its own files:
a shard ``server.key_secret`` and the clients' ``*.key``, a gateway ``client.key_secret``
and ``server.key`` (systemd ``LoadCredential=`` in the units). Replicas of a shard fetch
missed updates from each other as clients holding the server pair: a shard that also has
``server.key`` among its allowed keys admits its peers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from recserve.contracts.errors import ConfigError

SERVER, CLIENT = "server", "client"
ZAP_DOMAIN = "recserve"


def keygen(out: Path | str) -> list[Path]:
    """Write the server and client key pairs into ``out``; secret files are 0600."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (SERVER, CLIENT):
        if (out / f"{name}.key_secret").exists():
            raise ConfigError(f"{out / name}.key_secret exists; remove it to make new keys")
        public, secret = zmq.auth.create_certificates(out, name)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    return written


@dataclass(frozen=True)
class CurveKeys:
    """This side's key pair, and for a client the server's public key."""

    directory: Path
    public: bytes
    secret: bytes
    server_public: bytes | None = None

    @classmethod
    def for_server(cls, directory: Path | str) -> CurveKeys:
        public, secret = _load(Path(directory) / f"{SERVER}.key_secret", secret=True)
        return cls(Path(directory), public, secret)

    @classmethod
    def for_client(cls, directory: Path | str) -> CurveKeys:
        public, secret = _load(Path(directory) / f"{CLIENT}.key_secret", secret=True)
        server, _ = _load(Path(directory) / f"{SERVER}.key", secret=False)
        return cls(Path(directory), public, secret, server)

    @classmethod
    def for_peer(cls, directory: Path | str) -> CurveKeys:
        """A shard's keys as a client of its peer replicas (catching up on missed updates):
        the server pair every shard holds, so a peer admits it when ``server.key`` is among
        its allowed ``*.key`` files, and talks to the peer's (the same) server key."""
        public, secret = _load(Path(directory) / f"{SERVER}.key_secret", secret=True)
        return cls(Path(directory), public, secret, public)

    def secure_server(self, sock: zmq.Socket[Any]) -> None:
        """Before bind: CURVE server with this key pair, clients checked by ZAP."""
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SERVER, 1)

    def secure_client(self, sock: zmq.Socket[Any]) -> None:
        """Before connect: CURVE client of the server whose public key we hold."""
        assert self.server_public is not None, "client keys carry the server's public key"
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)

    def authenticator(self, ctx: zmq.Context[Any]) -> ThreadAuthenticator:
        """A started ZAP handler (its own thread, off the event loop; it runs once per
        connection, never per message) allowing the public keys in ``*.key`` files."""
        clients = zmq.auth.load_certificates(str(self.directory))
        if not clients:
            raise ConfigError(f"{self.directory} holds no client public key (*.key)")
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain=ZAP_DOMAIN, location=str(self.directory))
        return auth


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes]:
    try:
        public, key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read a CURVE key ({exc})") from None
    if secret and key is None:
        raise ConfigError(f"{path}: holds no secret key (expected a .key_secret file)")
    return public, key or b""
