"""Fixtures shared by the gateway integration tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recserve.cli import main as cli
from recserve.contracts.plan import read_plan
from tests.conftest import DEV_MODELS, importer_of
from tests.integration.shards import start_shard, stop, wait_healthy


@pytest.fixture(scope="package")
def deployments(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Every dev fixture imported, planned over 3 shards (a table split by rows), served."""
    root = tmp_path_factory.mktemp("gw")
    out, procs = {}, []
    try:
        for name in DEV_MODELS:
            src = importer_of(name)
            model = root / name
            assert (
                cli(
                    [
                        "import",
                        src,
                        "--checkpoint",
                        str(fixtures_dir / name / "model.pt"),
                        "--out",
                        str(model),
                    ]
                )
                == 0
            )
            plan = root / f"{name}.plan.json"
            assert (
                cli(
                    [
                        "plan",
                        "--model",
                        str(model),
                        "--shards",
                        "3",
                        "--strategy",
                        "capacity",
                        "--out",
                        str(plan),
                    ]
                )
                == 0
            )
            assert read_plan(plan).report["split_tables"], name
            doc = json.loads(plan.read_text())
            for s in doc["shards"]:  # private ipc endpoints for the test
                s["endpoints"] = [f"ipc://{root}/{name}-{s['id']}.sock"]
            plan.write_text(json.dumps(doc))
            for s in doc["shards"]:
                procs.append(
                    (s["endpoints"][0], start_shard(plan, model, s["id"], s["endpoints"][0]))
                )
            out[name] = (model, plan)
        for endpoint, proc in procs:
            wait_healthy(endpoint, proc)
        yield out
    finally:
        for _, proc in procs:
            stop(proc)
