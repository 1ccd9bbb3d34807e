"""A light client of the gateway, as HPS offers light APIs: numpy in, numpy out.

``Client`` (blocking, the standard library's HTTP) and ``AsyncClient`` (aiohttp, the
gateway's own HTTP stack) send the columnar form of ``/v1/predict`` and ``/v1/embeddings``
as msgpack typed arrays (``recserve.contracts.columns``): no per-value encoding on either
side. Inputs are a dense ``[B, d]`` array and per feature ``(ids, lengths)``, or sample
dicts as the sample form takes them. Errors come back as recserve's typed errors (the
gateway's ``kind``), ``Overloaded`` with the ``Retry-After`` it sent.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from recserve.contracts.columns import columns_body
from recserve.contracts.errors import Overloaded, RecserveError, remote_error
from recserve.contracts.http import MSGPACK

Sparse = Mapping[str, tuple[np.ndarray, np.ndarray]]
HEADERS = {"Content-Type": MSGPACK, "Accept": MSGPACK}

__all__ = ["AsyncClient", "Client", "columns_of"]


def columns_of(samples: Sequence[Mapping[str, Any]], features: Sequence[str]) -> tuple[Any, Any]:
    """Sample dicts (``{"dense": [...], "sparse": {f: [ids]}}``) as ``(dense, sparse)``."""
    dense = np.array([s["dense"] for s in samples], np.float32)
    sparse = {}
    for f in features:
        bags = [s.get("sparse", {}).get(f, ()) for s in samples]
        lengths = np.fromiter((len(b) for b in bags), np.int32, len(bags))
        values = np.fromiter((i for b in bags for i in b), np.int64, int(lengths.sum()))
        sparse[f] = (values, lengths)
    return dense, sparse


def _body(dense: np.ndarray, sparse: Sparse, timeout_ms: float | None) -> bytes:
    extra = {} if timeout_ms is None else {"timeout_ms": timeout_ms}
    return msgpack.packb(columns_body(dense, sparse, **extra), use_bin_type=True)


def _error(status: int, raw: bytes, retry_after: str | None) -> RecserveError:
    try:
        err = msgpack.unpackb(raw)["error"]
        exc = remote_error(str(err["kind"]), str(err["message"]), err.get("field"))
    except Exception:  # not our error document (a proxy's page, a cut-off body)
        exc = RecserveError(f"HTTP {status}: {raw[:200]!r}")
    if isinstance(exc, Overloaded) and retry_after and retry_after.isdigit():
        exc.retry_after = float(retry_after)
    return exc


def _scores(raw: bytes) -> np.ndarray:
    return np.asarray(msgpack.unpackb(raw)["scores"], np.float32)


def _embeddings(raw: bytes) -> dict[str, np.ndarray]:
    doc = msgpack.unpackb(raw)["embeddings"]
    return {f: np.asarray(v, np.float32) for f, v in doc.items()}


class Client:
    """Blocking client; one HTTP request per call."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _post(self, path: str, body: bytes) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, headers=HEADERS)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return bytes(r.read())
        except urllib.error.HTTPError as exc:
            with exc:
                raise _error(exc.code, exc.read(), exc.headers.get("Retry-After")) from None

    def predict(
        self, dense: np.ndarray, sparse: Sparse, *, timeout_ms: float | None = None
    ) -> np.ndarray:
        """Scores ``[B]`` for ``dense`` ``[B, d]`` and per feature ``(ids, lengths)``."""
        return _scores(self._post("/v1/predict", _body(dense, sparse, timeout_ms)))

    def embeddings(
        self, dense: np.ndarray, sparse: Sparse, *, timeout_ms: float | None = None
    ) -> dict[str, np.ndarray]:
        """Pooled vectors ``[B, dim]`` per feature (the gateway must enable them)."""
        return _embeddings(self._post("/v1/embeddings", _body(dense, sparse, timeout_ms)))


class AsyncClient:
    """asyncio client over one aiohttp session; ``async with`` it, or ``close()`` it."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        import aiohttp

        self.url = url.rstrip("/")
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.session.close()

    async def _post(self, path: str, body: bytes) -> bytes:
        async with self.session.post(self.url + path, data=body, headers=HEADERS) as r:
            raw = await r.read()
            if r.status != 200:
                raise _error(r.status, raw, r.headers.get("Retry-After"))
            return raw

    async def predict(
        self, dense: np.ndarray, sparse: Sparse, *, timeout_ms: float | None = None
    ) -> np.ndarray:
        return _scores(await self._post("/v1/predict", _body(dense, sparse, timeout_ms)))

    async def embeddings(
        self, dense: np.ndarray, sparse: Sparse, *, timeout_ms: float | None = None
    ) -> dict[str, np.ndarray]:
        return _embeddings(await self._post("/v1/embeddings", _body(dense, sparse, timeout_ms)))
