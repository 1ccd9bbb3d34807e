"""Plain numpy weights: an ``.npz`` of arrays plus a small JSON architecture file.

Weights (torch layout, ``y = x @ W.T + b``): ``emb_<k>`` ``[rows, dim]``, ``bot_<i>_weight`` /
``bot_<i>_bias``, ``top_<i>_weight`` / ``top_<i>_bias``, ``i`` counting Linear layers.

Architecture file (every key optional except ``top_activations`` when it is not the dlrm
default, unknown keys rejected)::

    {"name": "m", "version": "1", "interaction": "dot" | "cat",
     "interaction_order": "dlrm_tril" | "torchrec_triu", "interaction_itself": false,
     "bottom_activations": ["relu", ...], "top_activations": ["relu", ..., "sigmoid"],
     "final_sigmoid": false, "pooling": "sum" | "mean", "feature_names": ["0", ...]}

``final_sigmoid: true`` appends a sigmoid to a model whose last layer outputs logits.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson

from recserve.contracts.errors import ConfigError, ImportFailed
from recserve.contracts.manifest import ACTIVATIONS, ORDERS, POOLINGS, Manifest
from recserve.contracts.schema import Doc
from recserve.model.importers.common import (
    DenseLayers,
    build_artifact,
    infer_interaction,
    numbered,
    pop_linear_stack,
    single_dim,
)


def import_npz(
    weights: Path | str, arch: Path | str, out: Path | str, *, overwrite: bool = False
) -> Manifest:
    try:
        doc = Doc(orjson.loads(Path(arch).read_bytes()), "", _arch_error(arch))
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ImportFailed(f"{arch}: cannot read the architecture file ({exc})") from exc
    doc.only(
        "name",
        "version",
        "interaction",
        "interaction_order",
        "interaction_itself",
        "bottom_activations",
        "top_activations",
        "final_sigmoid",
        "pooling",
        "feature_names",
    )
    try:
        with np.load(weights) as npz:
            state = {k: npz[k].astype(np.float32) for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ImportFailed(f"{weights}: not a readable .npz ({exc})") from exc
    embs = [(f"emb_{k}", state.pop(key)) for k, key in numbered(state, r"emb_(\d+)")]
    if not embs:
        raise ImportFailed(f"{weights}: no emb_<k> arrays")
    bottom = pop_linear_stack(state, r"bot_(\d+)_weight", "bottom MLP")
    top = pop_linear_stack(state, r"top_(\d+)_weight", "top MLP")
    if state:
        raise ImportFailed(f"{weights}: unrecognised arrays {sorted(state)[:5]}")
    kind = doc.choice("interaction", ("dot", "cat"), None)
    order = doc.choice("interaction_order", ORDERS, "dlrm_tril")
    itself = doc.get("interaction_itself", bool, None)
    spec = infer_interaction(
        int(top[0][0].shape[1]),
        single_dim(embs, weights),
        len(embs),
        kind=kind,
        self_interaction=itself,
        order=order,
    )
    bottom_acts = _activations(doc, "bottom_activations", ["relu"] * len(bottom))
    top_acts = _activations(doc, "top_activations", ["relu"] * (len(top) - 1) + ["sigmoid"])
    if doc.get("final_sigmoid", bool, False):
        if top_acts[-1] != "none":
            raise doc.fail("final_sigmoid", "needs the last top activation to be 'none'")
        top_acts[-1] = "sigmoid"
    names = doc.get("feature_names", list, None)
    if names is not None and not all(isinstance(n, str) for n in names):
        raise doc.fail("feature_names", "must be a list of strings")
    dense = DenseLayers(bottom, top, bottom_acts, top_acts)
    return build_artifact(
        out,
        name=doc.get("name", str, Path(weights).stem),
        version=str(doc.get("version", str, "1")),
        tables=embs,
        dense=dense,
        interaction=spec,
        feature_names=names,
        pooling=doc.choice("pooling", POOLINGS, "sum"),
        overwrite=overwrite,
    )


def _activations(doc: Doc, key: str, default: list[str]) -> list[str]:
    acts = doc.get(key, list, default)
    if len(acts) != len(default) or not all(a in ACTIVATIONS for a in acts):
        raise doc.fail(key, f"must list {len(default)} of {', '.join(ACTIVATIONS)}")
    return list(acts)


def _arch_error(arch: Path | str) -> Callable[[str, str], ConfigError]:
    return lambda msg, field: ConfigError(f"{arch}: {msg}", field=field)
