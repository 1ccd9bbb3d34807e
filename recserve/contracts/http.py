"""The HTTP API's shared vocabulary: body content types and the features of ``GET /v1/model``.

The gateway serves the document and the load generator builds its traffic from it (or from
an artifact, through the same function), so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from recserve.contracts.manifest import Manifest

JSON, MSGPACK = "application/json", "application/msgpack"
MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack"})


def feature_list(manifest: Manifest) -> list[dict[str, Any]]:
    """One entry per feature, in interaction order: its table, rows, net and access stats."""
    return [
        {
            "name": f,
            "table": t.name,
            "dim": t.dim,
            "rows": t.rows,
            "pooling": t.pooling,
            "net": t.net,
            "dtype": t.dtype,
            "stats": t.stats.to_dict(),
        }
        for f, t in manifest.features()
    ]
