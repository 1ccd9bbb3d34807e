"""``torchrec.models.dlrm.DLRM`` and ``DLRM_DCN`` (MLPerf's DLRM-v2) state_dicts.

Keys: ``sparse_arch.embedding_bag_collection.embedding_bags.<table>.weight`` (tables in the
collection's order), ``dense_arch.model._mlp.<i>._linear.*`` (ReLU after every layer),
``over_arch.model.0._mlp.<i>._linear.*`` (ReLU) and ``over_arch.model.1.*`` (the final
Linear, no activation). ``DLRM``'s interaction keeps the strict upper triangle;
``DLRM_DCN``'s, recognised by its ``inter_arch.crossnet.{V_kernels,W_kernels,bias}.<l>``
keys, is a low-rank cross network over the concatenation (``V`` ``[rank, width]``, ``W``
``[width, rank]``, ``bias`` ``[width]``). torchrec's models output logits; the artifact
appends the sigmoid so it serves probabilities.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from recserve.contracts.errors import ImportFailed
from recserve.contracts.manifest import InteractionSpec, Manifest
from recserve.model.importers.common import (
    build_artifact,
    infer_interaction,
    load_state_dict,
    pop_linear_stack,
    relu_dlrm_layers,
    single_dim,
)

EMB = re.compile(r"sparse_arch\.embedding_bag_collection\.embedding_bags\.([^.]+)\.weight")
CROSS = "inter_arch.crossnet.{}.{}"
CROSS_KINDS = ("V_kernels", "W_kernels", "bias")
Cross = tuple[np.ndarray, np.ndarray, np.ndarray]


def pop_cross_layers(state: dict[str, np.ndarray], checkpoint: object) -> list[Cross]:
    """DLRM_DCN's cross layers, in order (none for a plain DLRM)."""
    layers: list[Cross] = []
    while any(CROSS.format(kind, len(layers)) in state for kind in CROSS_KINDS):
        i = len(layers)
        keys = [CROSS.format(kind, i) for kind in CROSS_KINDS]
        missing = [k for k in keys if k not in state]
        if missing:
            raise ImportFailed(f"{checkpoint}: cross layer {i} lacks {missing[0]}")
        v, w, b = (state.pop(k) for k in keys)
        layers.append((v, w, b))
    return layers


def check_cross(layers: list[Cross], width: int, over_in: int, checkpoint: object) -> None:
    """Every layer ``[rank, width]``, ``[width, rank]``, ``[width]`` with one rank, and the
    over arch taking ``width``: the error names the first key that disagrees."""
    rank = int(layers[0][0].shape[0]) if layers[0][0].ndim == 2 else 0
    for i, (v, w, b) in enumerate(layers):
        for kind, array, want in zip(
            CROSS_KINDS, (v, w, b), ((rank, width), (width, rank), (width,)), strict=True
        ):
            if array.shape != want or not rank:
                raise ImportFailed(
                    f"{checkpoint}: {CROSS.format(kind, i)} has shape {tuple(array.shape)}, "
                    f"expected {want} (width = dim x (tables + 1) = {width})"
                )
    if over_in != width:
        raise ImportFailed(
            f"{checkpoint}: the over arch takes {over_in} inputs, the cross network gives {width}"
        )


def import_torchrec(
    checkpoint: Path | str,
    out: Path | str,
    *,
    feature_names: Sequence[str] | None = None,
    name: str | None = None,
    version: str = "1",
    overwrite: bool = False,
) -> Manifest:
    state = load_state_dict(checkpoint)
    embs = [(m.group(1), state.pop(k)) for k in list(state) if (m := EMB.fullmatch(k))]
    if not embs:
        raise ImportFailed(f"{checkpoint}: no embedding_bags weights; is this a torchrec DLRM?")
    bottom = pop_linear_stack(
        state, r"dense_arch\.model\._mlp\.(\d+)\._linear\.weight", "dense arch"
    )
    over = []
    if any(k.startswith("over_arch.model.0.") for k in state):
        over = pop_linear_stack(
            state, r"over_arch\.model\.0\._mlp\.(\d+)\._linear\.weight", "over arch"
        )
    over += pop_linear_stack(state, r"over_arch\.model\.(1)\.weight", "over arch final layer")
    cross = pop_cross_layers(state, checkpoint)
    if state:
        raise ImportFailed(f"{checkpoint}: unrecognised keys {sorted(state)[:5]}")
    dim = single_dim(embs, checkpoint)
    if cross:
        width = dim * (len(embs) + 1)
        check_cross(cross, width, int(over[0][0].shape[1]), checkpoint)
        spec = InteractionSpec("dcn", layers=len(cross), rank=int(cross[0][0].shape[0]))
    else:
        spec = infer_interaction(
            int(over[0][0].shape[1]),
            dim,
            len(embs),
            kind="dot",
            self_interaction=False,
            order="torchrec_triu",
        )
    dense = replace(relu_dlrm_layers(bottom, over), cross=cross)
    return build_artifact(
        out,
        name=name or Path(checkpoint).stem,
        version=version,
        tables=embs,
        dense=dense,
        interaction=spec,
        feature_names=feature_names,
        overwrite=overwrite,
    )
