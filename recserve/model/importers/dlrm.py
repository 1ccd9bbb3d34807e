"""facebookresearch/dlrm ``DLRM_Net`` state_dicts.

Keys: ``emb_l.<k>.weight``, ``bot_l.<2i>.weight|bias``, ``top_l.<2i>.weight|bias`` (Linear and
activation alternate in an ``nn.Sequential``). The reference applies ReLU after every bottom
layer and after every top layer but the last, which is followed by a sigmoid, so the model
outputs probabilities. Interaction ``dot`` keeps the strict lower triangle (or, with
``--interaction-itself``, the diagonal too); ``cat`` concatenates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from recserve.contracts.errors import ImportFailed
from recserve.contracts.manifest import Manifest
from recserve.model.importers.common import (
    build_artifact,
    infer_interaction,
    load_state_dict,
    numbered,
    pop_linear_stack,
    relu_dlrm_layers,
    single_dim,
)


def import_dlrm(
    checkpoint: Path | str,
    out: Path | str,
    *,
    interaction: str | None = None,
    interaction_itself: bool | None = None,
    feature_names: Sequence[str] | None = None,
    name: str | None = None,
    version: str = "1",
    overwrite: bool = False,
) -> Manifest:
    state = load_state_dict(checkpoint)
    embs = [(f"emb_{k}", state.pop(key)) for k, key in numbered(state, r"emb_l\.(\d+)\.weight")]
    if not embs:
        raise ImportFailed(f"{checkpoint}: no emb_l.<k>.weight keys; is this a DLRM_Net?")
    bottom = pop_linear_stack(state, r"bot_l\.(\d+)\.weight", "bottom MLP")
    top = pop_linear_stack(state, r"top_l\.(\d+)\.weight", "top MLP")
    if state:
        raise ImportFailed(
            f"{checkpoint}: unrecognised keys {sorted(state)[:5]} (quotient-remainder or "
            "mixed-dimension embeddings are not supported)"
        )
    spec = infer_interaction(
        int(top[0][0].shape[1]),
        single_dim(embs, checkpoint),
        len(embs),
        kind=interaction,
        self_interaction=interaction_itself,
    )
    dense = relu_dlrm_layers(bottom, top)
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
