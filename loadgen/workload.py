"""Request bodies drawn from a served model's description (``GET /v1/model``).

Flat requests carry ``samples`` samples; ranking requests carry one context (the ``user``
net's features, looked up once) and ``candidates`` candidates (every other feature). Ids and
bag lengths are drawn as ``recserve.model.workload`` draws them for in-process batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import orjson

from recserve.client import columns_of
from recserve.contracts.columns import columns_body
from recserve.model.workload import TableTraffic

CONTEXT_NET = "user"


@dataclass(frozen=True)
class Feature:
    name: str
    net: str
    traffic: TableTraffic


def features_of(model: dict[str, Any]) -> list[Feature]:
    return [
        Feature(
            f["name"],
            f.get("net", "default"),
            TableTraffic.from_stats(int(f["rows"]), f.get("stats") or {}),
        )
        for f in model["features"]
    ]


class Bodies:
    def __init__(
        self, model: dict[str, Any], *, samples: int, candidates: int, fmt: str, seed: int
    ) -> None:
        self.features = features_of(model)
        self.dense_width = int(model["dense_width"])
        self.samples = samples
        self.candidates = candidates
        self.fmt = fmt
        self.rng = np.random.default_rng(seed)

    @property
    def samples_per_request(self) -> int:
        return self.candidates or self.samples

    @property
    def content_type(self) -> str:
        return "application/json" if self.fmt == "json" else "application/msgpack"

    def _bag(self, f: Feature) -> list[int]:
        ids, _ = f.traffic.bags(self.rng, 1)
        return ids.tolist()

    def _dense(self) -> list[float]:
        return self.rng.standard_normal(self.dense_width).astype(float).tolist()

    def document(self) -> dict[str, Any]:
        if self.candidates:
            context = [f for f in self.features if f.net == CONTEXT_NET]
            rest = [f for f in self.features if f.net != CONTEXT_NET]
            return {
                "context": {
                    "dense": self._dense(),
                    "sparse": {f.name: self._bag(f) for f in context},
                },
                "candidates": [
                    {"sparse": {f.name: self._bag(f) for f in rest}} for _ in range(self.candidates)
                ],
            }
        return {
            "samples": [
                {"dense": self._dense(), "sparse": {f.name: self._bag(f) for f in self.features}}
                for _ in range(self.samples)
            ]
        }

    def encode(self, doc: dict[str, Any]) -> bytes:
        if self.fmt == "columns":  # recserve.client's form: msgpack typed arrays
            return msgpack.packb(self.columns(doc), use_bin_type=True)
        return msgpack.packb(doc) if self.fmt == "msgpack" else orjson.dumps(doc)

    def columns(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The document in the columnar form (a ranking request's context repeated for
        every candidate: the form has no shared bags)."""
        samples = doc.get("samples") or [
            {
                "dense": doc["context"]["dense"],
                "sparse": {**doc["context"]["sparse"], **c["sparse"]},
            }
            for c in doc["candidates"]
        ]
        dense, sparse = columns_of(samples, [f.name for f in self.features])
        return columns_body(dense, sparse)

    def pool(self, count: int) -> list[bytes]:
        """``count`` distinct pre-encoded bodies, reused round robin during a run."""
        return [self.encode(self.document()) for _ in range(count)]
