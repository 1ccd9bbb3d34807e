"""Deploying on one shard (``shardd.models``): a loaded artifact serves from its version on
once committed, older versions read the old one until it is released (its update state
deleted then), an aborted load is closed, the artifact served now is refused, and
``deployed.json`` names what a restart serves."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import kernels
from recserve.contracts.errors import BadRequest, VersionUnavailable
from recserve.contracts.manifest import DENSE_FILE, read_manifest
from recserve.model.artifact import ArtifactWriter, open_table, read_dense
from shardd.models import Loaded, Models, deployed
from shardd.store import PartStore
from tests.integration.shardd.test_cache import cached_model  # noqa: F401 - the fixture
from tests.integration.shardd.test_updates import updates_for


def retrained(model: Path, out: Path) -> Path:
    """The artifact with other rows: the same tables, another digest."""
    manifest = read_manifest(model)
    writer = ArtifactWriter(out)
    for spec in manifest.tables:
        table = open_table(model, spec)
        values = table.dequantize() if spec.dtype == "int8" else np.asarray(table, np.float32)
        values = values + np.float32(0.01)
        if spec.dtype == "int8":
            values = kernels.quantize_rows(values)
        elif spec.dtype == "fp16":
            values = values.astype(np.float16)
        writer.write_table_array(spec, values)
    writer.write_dense(read_dense(model / DENSE_FILE))
    writer.finish(replace(manifest, version="retrained"))
    return out


def test_a_deploy_is_a_version(cached_model, tmp_path) -> None:  # noqa: F811
    model, _, plan = cached_model
    other = retrained(model, tmp_path / "b")
    state = tmp_path / "state"

    def opener(path: Path, since: int, fresh: bool = False) -> tuple:
        m = read_manifest(path)
        store = PartStore(path, m, plan.shard(0), state_dir=state / m.digest()[:16],
                          first_version=since)  # fmt: skip
        return m, store

    first = Loaded(0, model, *opener(model, 0))
    models = Models(first, opener, state)
    parts, _ = updates_for(plan, model, seed=3)
    first.store.versions.stage(1, parts)
    first.store.versions.commit(1)
    with pytest.raises(BadRequest):
        models.load(3, other)  # not the next version
    loaded = models.load(2, other)
    assert models.staged() == 2 and models.store_for(None) is first.store
    assert models.commit(2) and models.current is loaded
    assert models.store_for(1) is first.store and models.store_for(0) is first.store
    assert models.store_for(2) is loaded.store and models.store_for(None) is loaded.store
    assert loaded.store.versions.current == 2
    assert deployed(state) == (other, 2)
    with pytest.raises(BadRequest):
        models.load(3, other)  # served now
    old_state = first.store.state_dir
    assert old_state is not None and old_state.exists()
    models.release()
    assert not old_state.exists()
    with pytest.raises(VersionUnavailable):
        models.store_for(1)
    models.load(3, model)  # the first artifact again, aborted this time
    assert models.abort(3) and models.loading is None and not models.commit(3)
    models.close()
