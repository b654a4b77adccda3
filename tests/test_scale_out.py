"""Beyond one process: candidate search and judging in shards, each a step of its own under the multiprocess
executor, give the same tables as one shard; and one writer per iteration holds for a whole multiprocess run."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from dagster_project.cli import main
from src_assets.storage import Store

ROOT = Path(__file__).resolve().parents[1]
SEARCH_AND_JUDGING = "candidate_pool,pairwise_scores"

# A run of iteration 001's candidate search and judging alone, the job loaded from the code location (each step in
# a process of its own), in its own process: prints the run's id and status as JSON.
RUN_SUBSET = """
import json, sys
from dagster import AssetKey, DagsterInstance, execute_job
from dagster_project.launch import reconstructable_job, run_config
from dagster_project.resources import SettingsResource, StoreResource
store, overrides = sys.argv[1], json.loads(sys.argv[2])
config = run_config(StoreResource(base_uri=store), SettingsResource(profile="smoke", overrides=overrides),
                    executor="multiprocess")
with DagsterInstance.get() as instance:
    result = execute_job(reconstructable_job("src_iteration"), instance, run_config=config,
                         tags={"dagster/partition": "001"},
                         asset_selection=[AssetKey(k) for k in sys.argv[3].split(",")])
    print(json.dumps({"run_id": result.run_id, "success": result.success}))
"""


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory):
    """A store after one smoke iteration (run in-process): the inputs of iteration 001's search and judging."""
    root = tmp_path_factory.mktemp("scale_out")
    os.environ["DAGSTER_HOME"] = str(root / "home")
    assert main(["run", "--profile", "smoke", "--iterations", "1", "--store", str(root / "store"), "--json"]) == 0
    return root


def _subset(root: Path, store: Path, overrides: dict, wait: bool = True):
    env = {**os.environ, "DAGSTER_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-c", RUN_SUBSET, str(store), json.dumps(overrides), SEARCH_AND_JUDGING]
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


ONE_PROMPT_PER_BATCH = {"search_batch_size": "1", "judge_batch_size": "1"}


def test_three_shards_give_the_tables_of_one_under_the_multiprocess_executor(smoke_store):
    tables = {}
    for shards in (1, 3):
        store = smoke_store / f"store_{shards}"
        shutil.copytree(smoke_store / "store", store)
        run = _subset(smoke_store, store, {**ONE_PROMPT_PER_BATCH, "shards": str(shards)})
        assert run["success"]
        shard_steps = sorted(p.name for p in (store / "runs" / run["run_id"]).iterdir() if "search_shard" in p.name)
        assert len(shard_steps) == shards  # each shard was a step of its own, its table stored under the run
        tables[shards] = {
            a: Store(str(store)).read_table(f"assets/{a}/001.parquet") for a in ("candidate_pool", "pairwise_scores")
        }
    for asset in ("candidate_pool", "pairwise_scores"):
        one, three = tables[1][asset], tables[3][asset]
        assert one.height > 0 and one.equals(three), asset  # bit-identical, floats included


def test_two_runs_of_one_iteration_under_the_multiprocess_executor_exactly_one_writes(smoke_store):
    """Run A holds the iteration from its first step to its last, although each step is a process of its own: run
    B, started while A is between steps, is refused before any of its steps runs."""
    store = smoke_store / "store_ab"
    shutil.copytree(smoke_store / "store", store)
    before = {p.name for p in (store / "runs").iterdir()}  # the in-process smoke run's shard tables
    a = _subset(smoke_store, store, {**ONE_PROMPT_PER_BATCH, "shards": "3"}, wait=False)
    deadline = time.monotonic() + 600
    planned = lambda: {p.parent.parent.name for p in (store / "runs").glob("*/candidate_pool.plan_shards/*")}
    while not planned() - before:  # A's first step has ended
        assert a.poll() is None and time.monotonic() < deadline, a.communicate()[1][-3000:]
        time.sleep(0.2)
    b = _subset(smoke_store, store, {**ONE_PROMPT_PER_BATCH, "shards": "3"}, wait=False)
    out_b, err_b = b.communicate(timeout=600)
    out_a, err_a = a.communicate(timeout=900)
    run_a, run_b = json.loads(out_a.strip().splitlines()[-1]), json.loads(out_b.strip().splitlines()[-1])
    assert run_a["success"] and not run_b["success"]
    assert "another run is writing, so this run writes nothing" in err_b and run_a["run_id"] in err_b
    assert {p.name for p in (store / "runs").iterdir()} - before == {run_a["run_id"]}  # B stored nothing
    assert not (store / "leases" / "iteration" / "001.json").exists()  # A released it at its end
    assert pl.read_parquet(store / "assets/candidate_pool/001.parquet").height > 0
