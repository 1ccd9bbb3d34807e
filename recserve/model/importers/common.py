"""What every importer shares: checkpoint loading, interaction inference, artifact building."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.contracts.errors import ArtifactError, ImportFailed
from recserve.contracts.manifest import (
    DenseSpec,
    InteractionSpec,
    Manifest,
    MLPSpec,
    TableSpec,
)
from recserve.model.artifact import ArtifactWriter, dense_weights

Layer = tuple[np.ndarray, np.ndarray]  # (weight [out, in], bias [out])


@dataclass(frozen=True)
class DenseLayers:
    bottom: Sequence[Layer]
    top: Sequence[Layer]
    bottom_activations: Sequence[str]
    top_activations: Sequence[str]
    cross: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] = ()  # dcn: (V, W, bias)


def load_state_dict(path: Path | str) -> dict[str, np.ndarray]:
    """Load a torch checkpoint as numpy arrays, refusing anything but plain tensors."""
    try:
        import torch
    except ImportError as exc:
        raise ImportFailed(
            "reading torch checkpoints needs the torch extra: pip install 'recserve[torch]'"
        ) from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ImportFailed(f"{path}: no such checkpoint") from exc
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ImportFailed(
            f"{path}: cannot be read as a weights-only checkpoint; files that need pickled "
            f"code to load are refused ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ImportFailed(f"{path}: expected a state_dict, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ImportFailed(f"{path}: entry {key!r} is not a tensor")
        out[str(key)] = value.detach().to(torch.float32).contiguous().numpy()
    return out


def numbered(state: Mapping[str, np.ndarray], pattern: str) -> list[tuple[int, str]]:
    """Keys matching ``pattern`` (one integer group), sorted by that integer."""
    rx = re.compile(pattern)
    found = [(int(m.group(1)), k) for k in state if (m := rx.fullmatch(k))]
    return sorted(found)


def pop_linear_stack(state: dict[str, np.ndarray], weight_pattern: str, what: str) -> list[Layer]:
    """Pop ``<prefix>.weight`` / ``.bias`` pairs whose weight key matches ``weight_pattern``."""
    layers = []
    for _, wkey in numbered(state, weight_pattern):
        bkey = wkey[: -len("weight")] + "bias"
        if bkey not in state:
            raise ImportFailed(f"{what}: {wkey} has no bias {bkey}")
        layers.append((state.pop(wkey), state.pop(bkey)))
    if not layers:
        raise ImportFailed(f"{what}: no layers found (keys like {weight_pattern})")
    return layers


def single_dim(embs: Sequence[tuple[str, np.ndarray]], source: object) -> int:
    """The one embedding dim all tables share (DLRM's interaction needs it)."""
    dims = {int(v.shape[1]) for _, v in embs if v.ndim == 2}
    if len(dims) != 1:
        raise ImportFailed(f"{source}: tables have differing dims {sorted(dims)}")
    return dims.pop()


def relu_dlrm_layers(bottom: Sequence[Layer], top: Sequence[Layer]) -> DenseLayers:
    """ReLU after every bottom layer and every top layer but the last, which ends in a
    sigmoid: both reference implementations' MLPs (torchrec's sigmoid is appended)."""
    return DenseLayers(
        bottom,
        top,
        bottom_activations=["relu"] * len(bottom),
        top_activations=["relu"] * (len(top) - 1) + ["sigmoid"],
    )


def infer_interaction(
    top_in: int,
    dim: int,
    n_features: int,
    *,
    kind: str | None,
    self_interaction: bool | None,
    order: str = "dlrm_tril",
) -> InteractionSpec:
    """The interaction whose output width is the top MLP's input width.

    Flags given by the user narrow the candidates; if several remain, the caller must say.
    """
    candidates = []
    for k in ("dot", "cat"):
        for s in (False, True):
            if k == "cat" and s:
                continue
            if order == "torchrec_triu" and s:
                continue
            spec = InteractionSpec(k, order, s)
            if spec.output_width(dim, n_features) != top_in:
                continue
            if kind is not None and kind != k:
                continue
            if self_interaction is not None and k == "dot" and self_interaction != s:
                continue
            candidates.append(spec)
    if not candidates:
        raise ImportFailed(
            f"no interaction gives the top MLP's input width {top_in} for {n_features} "
            f"features of dim {dim} (asked: {kind or 'any'}, self={self_interaction})"
        )
    if len(candidates) > 1:
        raise ImportFailed(
            f"the interaction is ambiguous from shapes ({', '.join(c.kind for c in candidates)}"
            "); pass --interaction (and --interaction-itself if it applies)"
        )
    return candidates[0]


def build_artifact(
    out: Path | str,
    *,
    name: str,
    version: str,
    tables: Sequence[tuple[str, np.ndarray]],
    dense: DenseLayers,
    interaction: InteractionSpec,
    feature_names: Sequence[str] | None = None,
    pooling: str = "sum",
    overwrite: bool = False,
) -> Manifest:
    """Write an artifact from in-memory weights; shape errors become ``ImportFailed``."""
    names = list(feature_names) if feature_names else [str(i) for i in range(len(tables))]
    if len(names) != len(tables):
        raise ImportFailed(f"{len(names)} feature names given for {len(tables)} tables")
    specs = []
    for (tname, values), feature in zip(tables, names, strict=True):
        if values.ndim != 2:
            raise ImportFailed(f"table {tname} has shape {values.shape}, expected [rows, dim]")
        specs.append(
            TableSpec(
                tname,
                int(values.shape[0]),
                int(values.shape[1]),
                pooling=pooling,
                features=(feature,),
            )
        )
    try:
        bottom = MLPSpec(_sizes(dense.bottom, "bottom"), tuple(dense.bottom_activations))
        top = MLPSpec(_sizes(dense.top, "top"), tuple(dense.top_activations))
        manifest = Manifest(
            name, version, bottom.sizes[0], tuple(specs), DenseSpec(bottom, interaction, top)
        )
    except ArtifactError as exc:
        raise ImportFailed(f"the checkpoint is not a servable DLRM: {exc.message}") from exc
    writer = ArtifactWriter(out, overwrite=overwrite)
    for spec, (_, values) in zip(specs, tables, strict=True):
        writer.write_table_array(spec, values.astype(np.float32, copy=False))
    writer.write_dense(dense_weights(dense.bottom, dense.top, dense.cross))
    return writer.finish(manifest)


def _sizes(layers: Sequence[Layer], part: str) -> tuple[int, ...]:
    sizes = [int(layers[0][0].shape[1])]
    for i, (w, b) in enumerate(layers):
        if w.ndim != 2 or b.shape != (w.shape[0],) or w.shape[1] != sizes[-1]:
            raise ImportFailed(
                f"{part} MLP layer {i}: weight {w.shape} / bias {b.shape} do not chain "
                f"from width {sizes[-1]}"
            )
        sizes.append(int(w.shape[0]))
    return tuple(sizes)
