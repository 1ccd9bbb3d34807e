"""Offline scoring of a JSON file of samples (``recserve predict``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson

from recserve.contracts.errors import BadRequest
from recserve.contracts.samples import parse_samples
from recserve.model.scorer import Model

CHUNK = 4096  # samples scored at a time, bounding memory for big input files


def read_samples(path: Path | str) -> list[Any]:
    """A JSON list of samples, or ``{"samples": [...]}`` as the HTTP API takes it."""
    try:
        value = orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        raise BadRequest(f"{path}: cannot read ({exc.strerror})", field="input") from exc
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{path}: not valid JSON ({exc})", field="input") from exc
    if isinstance(value, dict) and "samples" in value:
        value = value["samples"]
    if not isinstance(value, list):
        raise BadRequest(f"{path}: expected a list of samples", field="input")
    return value


def predict(model: Model, samples: list[Any]) -> np.ndarray:
    """Scores of ``samples``, parsed and validated in chunks; errors name the sample index."""
    scores = []
    for start in range(0, len(samples), CHUNK):
        chunk = samples[start : start + CHUNK]
        try:
            batch = parse_samples(chunk, model.manifest)
        except BadRequest as exc:
            raise _shift(exc, start) from None
        scores.append(model.score(batch))
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def _shift(exc: BadRequest, start: int) -> BadRequest:
    """Re-number ``samples[i]`` in a chunk's error to the sample's index in the file."""
    if not start or not exc.field or not exc.field.startswith("samples["):
        return exc
    idx, rest = exc.field[len("samples[") :].split("]", 1)
    field = f"samples[{int(idx) + start}]{rest}"
    message = exc.message.replace(exc.field, field)
    return type(exc)(message, field=field)


def scores_document(model: Model, scores: np.ndarray) -> dict[str, Any]:
    return {
        "model": model.manifest.name,
        "version": model.manifest.version,
        "scores": scores.astype(float).tolist(),
    }
