"""Pooled lookups from a real shard daemon equal the reference."""

from __future__ import annotations

import asyncio
import json

import msgpack
import numpy as np
import pytest

from recserve.contracts.manifest import read_manifest
from tests.integration.shardd.helpers import (
    lookup,
    make_lookup,
    reference,
    stats,
)
from tests.integration.shards import (
    header,
    raw,
)


@pytest.mark.parametrize("weighted, dtype", [(False, np.int64), (True, np.int32)])
def test_pooled_results_match_reference(shards, model_and_plan, weighted, dtype) -> None:
    endpoints, _, _ = shards
    model, _, plan = model_and_plan
    for k, endpoint in enumerate(endpoints):
        parts, ids, lengths, weights, ids_pp, len_pp, w_pp = make_lookup(
            plan, k, seed=k, weighted=weighted, dtype=dtype
        )
        groups = asyncio.run(lookup(endpoint, parts, ids, lengths, weights))
        want = reference(model, parts, ids_pp, len_pp, w_pp, weighted)
        seen = set()
        for g in groups:
            for j, i in enumerate(g.parts):
                np.testing.assert_allclose(g.pooled[:, j, :], want[i], rtol=1e-5, atol=1e-5)
                seen.add(i)
        assert seen == set(range(len(parts)))


def test_small_lookups_on_resident_parts_run_on_the_loop(shards, model_and_plan) -> None:
    """Shard 1 (--hugepages) pools lookups of up to --inline-ids ids on its loop and larger
    ones on a worker; shard 0 maps its parts lazily, so every lookup goes to a worker (a page
    fault must not stall the loop). Both paths give the reference's values."""
    endpoints, _, _ = shards
    model, _, plan = model_and_plan
    for k, endpoint in enumerate(endpoints):
        for bags in (9, 8000):  # a few dozen ids, then well over the default 16384
            before = asyncio.run(stats(endpoint))["inline"]
            parts, ids, lengths, _, ids_pp, len_pp, w_pp = make_lookup(plan, k, 7, bags=bags)
            groups = asyncio.run(lookup(endpoint, parts, ids, lengths))
            want = reference(model, parts, ids_pp, len_pp, w_pp, False)
            for g in groups:
                for j, i in enumerate(g.parts):
                    np.testing.assert_allclose(g.pooled[:, j, :], want[i], rtol=1e-5, atol=1e-5)
            inline = asyncio.run(stats(endpoint))["inline"] - before
            assert inline == (1 if k == 1 and ids.size <= 16384 else 0), (k, ids.size)
            assert (ids.size <= 16384) == (bags == 9)


def test_info_names_the_model_and_parts(shards, model_and_plan) -> None:
    endpoint = shards[0][1]
    model, _, plan = model_and_plan
    info = msgpack.unpackb(raw(endpoint, [header("info")])[0])
    assert info["model"]["digest"] == read_manifest(model).digest()
    assert [(p["table"], p["row_start"], p["row_end"]) for p in info["parts"]] == [
        (p.table, p.row_start, p.row_end) for p in plan.shard(1).parts
    ]


def test_hugepages_copy_is_logged(shards) -> None:
    """Shard 1 runs with --hugepages (its lookups are checked above): it says how much of
    the copy the kernel backs with 2 MiB pages (0 where THP is off)."""
    lines = [json.loads(x) for x in (shards[2] / "s1.log").read_text().splitlines() if x]
    copied = [x["msg"] for x in lines if "huge-page memory" in x.get("msg", "")]
    assert copied and "backed by 2 MiB pages" in copied[0], lines
