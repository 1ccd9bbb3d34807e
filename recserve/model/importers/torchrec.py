"""``torchrec.models.dlrm.DLRM`` state_dicts.

Keys: ``sparse_arch.embedding_bag_collection.embedding_bags.<table>.weight`` (tables in the
collection's order), ``dense_arch.model._mlp.<i>._linear.*`` (ReLU after every layer),
``over_arch.model.0._mlp.<i>._linear.*`` (ReLU) and ``over_arch.model.1.*`` (the final
Linear, no activation). The interaction keeps the strict upper triangle. torchrec's model
outputs logits; the artifact appends the sigmoid so it serves probabilities.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from recserve.contracts.errors import ImportFailed
from recserve.contracts.manifest import Manifest
from recserve.model.importers.common import (
    build_artifact,
    infer_interaction,
    load_state_dict,
    pop_linear_stack,
    relu_dlrm_layers,
    single_dim,
)

EMB = re.compile(r"sparse_arch\.embedding_bag_collection\.embedding_bags\.([^.]+)\.weight")


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
    if state:
        raise ImportFailed(f"{checkpoint}: unrecognised keys {sorted(state)[:5]}")
    spec = infer_interaction(
        int(over[0][0].shape[1]),
        single_dim(embs, checkpoint),
        len(embs),
        kind="dot",
        self_interaction=False,
        order="torchrec_triu",
    )
    dense = relu_dlrm_layers(bottom, over)
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
