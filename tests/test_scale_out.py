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

from dagster_project.runs.cli import main
from src_assets.storage import Store

ROOT = Path(__file__).resolve().parents[1]
SEARCH_AND_JUDGING = "candidate_pool,pairwise_scores"

# A run of iteration 001's candidate search and judging alone, the job loaded from the code location (each step in
# a process of its own), in its own process, with the gpu pool opened to 3 slots as a user does for parallel
# shards: prints the run's id, status and its search shards' [start, end] times as JSON.
RUN_SUBSET = """
import json, sys
from dagster import AssetKey, DagsterInstance, execute_job
from dagster_project.runs.launch import reconstructable_job, run_config
from dagster_project.resources import SettingsResource, StoreResource
store, overrides = sys.argv[1], json.loads(sys.argv[2])
config = run_config(StoreResource(base_uri=store), SettingsResource(profile="smoke", overrides=overrides),
                    executor="multiprocess")
with DagsterInstance.get() as instance:
    instance.event_log_storage.set_concurrency_slots("gpu", 3)
    result = execute_job(reconstructable_job("src_iteration"), instance, run_config=config,
                         tags={"dagster/partition": "001"},
                         asset_selection=[AssetKey(k) for k in sys.argv[3].split(",")])
    spans = {}
    for record in instance.all_logs(result.run_id):
        event = record.dagster_event
        shard = event and "search_shard" in (event.step_key or "")
        if shard and event.event_type_value in ("STEP_START", "STEP_SUCCESS"):
            spans.setdefault(event.step_key, [0, 0])[event.event_type_value == "STEP_SUCCESS"] = record.timestamp
    print(json.dumps({"run_id": result.run_id, "success": result.success, "search_shards": spans}))
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
    """In parallel, each shard with its share of the cores (the torch threads the machine and the pool allow,
    whatever the number of shards): the same tables, floats included."""
    tables = {}
    for shards in (1, 3):
        store = smoke_store / f"store_{shards}"
        shutil.copytree(smoke_store / "store", store)
        run = _subset(smoke_store, store, {**ONE_PROMPT_PER_BATCH, "shards": str(shards)})
        assert run["success"]
        shard_steps = sorted(p.name for p in (store / "runs" / run["run_id"]).iterdir() if "search_shard" in p.name)
        assert len(shard_steps) == shards  # each shard was a step of its own, its table stored under the run
        if shards == 3 and (os.cpu_count() or 1) >= 2:  # the executor ran two at once (one per core)
            spans = sorted(run["search_shards"].values())
            assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans
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


def test_shards_cover_the_prompts_in_order_and_cut_only_between_search_batches():
    from dagster_project.assets.sharded import shard_ranges

    for n, shards, whole in [(1024, 2, 56), (1024, 3, 56), (10, 3, 1), (5, 8, 1), (100, 3, 56), (57, 2, 56)]:
        ranges = shard_ranges(n, shards, whole)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a < b for a, b in ranges) and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
        assert all(a % whole == 0 for a, _ in ranges)
        assert len(ranges) == min(shards, -(-n // whole))
    assert shard_ranges(1024, 3, 56) == [(0, 336), (336, 728), (728, 1024)]


def test_shards_running_side_by_side_split_the_cores_and_others_keep_torchs_default(tmp_path, monkeypatch):
    """On 2 cores, two shard processes with a thread per core each ran about 7 times slower than one. The share
    comes from the pool and the executor, never the number of shards, so that 1 and 3 shards round alike."""
    from types import SimpleNamespace

    from dagster import DagsterInstance

    from dagster_project.executors import shard_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with DagsterInstance.local_temp(str(tmp_path)) as instance:

        def threads(execution: dict | None, slots: int):
            instance.event_log_storage.set_concurrency_slots("gpu", slots)
            run_config = {"execution": {"config": execution}} if execution is not None else {}
            return shard_threads(SimpleNamespace(run=SimpleNamespace(run_config=run_config), instance=instance), "gpu")

        assert threads({"multiprocess": {}}, 3) == 5  # three model steps at once: 16 // 3
        assert threads({"multiprocess": {"max_concurrent": 2}}, 3) == 8  # the executor runs two at a time
        assert threads({"multiprocess": {}}, 1) == 16  # one slot: shards run one after another
        assert threads({"multiprocess": {}}, 32) == 1
        assert threads(None, 3) is None and threads({"in_process": {}}, 3) is None
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        assert threads({"multiprocess": {}}, 3) is None  # the user's own choice stands


def test_shards_running_side_by_side_take_one_gpu_each(monkeypatch):
    from types import SimpleNamespace

    import torch

    from dagster_project.executors import shard_device

    def device(execution: dict | None, index: int, gpus: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        run_config = {"execution": {"config": execution}} if execution is not None else {}
        return shard_device(SimpleNamespace(run=SimpleNamespace(run_config=run_config)), index)

    assert [device({"multiprocess": {}}, i, 4) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert device({"multiprocess": {}}, 3, 1) is None and device({"multiprocess": {}}, 3, 0) is None
    assert device(None, 3, 4) is None and device({"in_process": {}}, 3, 4) is None


# --- Trainings in several processes (accelerate launch, gloo on the CPU) ------------------------------------------


def _launch(tmp_path: Path, stage: str, model: str, rows: pl.DataFrame, settings, **options) -> dict:
    """The worker under ``accelerate launch``, as the training assets start it (without Dagster around it)."""
    from dataclasses import asdict

    from dagster_project.train_worker import launch_command

    rows.write_parquet(tmp_path / "rows.parquet")
    spec = {
        "stage": stage,
        "model": model,
        "rows": str(tmp_path / "rows.parquet"),
        "out_dir": str(tmp_path / "out"),
        "settings": asdict(settings),
        "options": options,
        "result": str(tmp_path / "result.json"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec, default=str))
    command, env = launch_command(settings.processes, str(tmp_path / "spec.json"), "cpu")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


def _losses(log: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log if "loss" in entry]


def _settings(batch_size: int, processes: int):
    from src_assets.training import TrainSettings

    # Three steps, each logged; a constant rate with no warmup, so the first step already moves the weights.
    steps = (("max_steps", 3), ("logging_steps", 1))
    return TrainSettings(
        batch_size=batch_size,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        trainer_args=steps,
        processes=processes,
    )


# The same global batch of 8 in one process or two: each step sees the same 8 examples (accelerate splits the one
# seeded order between the processes) and the same mean loss over them. What differs is float32 summation order
# (the two halves' gradients are summed by gloo, not inside one backward pass), ~1e-7 relative per step, which
# Adam can grow where a gradient is near zero: 1e-4 relative leaves a wide margin over that and is far below any
# real difference (a wrong weight, a shifted batch: 1e-2 and more).
LOSS_TOLERANCE = 1e-4


def test_two_process_rationale_sft_matches_one_process_and_its_checkpoint_loads(tmp_path):
    from src_assets.models import load_policy
    from src_assets.rationale_sft import build_rationale_sft_set, train_rationale_sft
    from src_assets.source_data import synthetic_source
    from src_assets.tiny_models import TinySpec, build_tiny_policy

    spec = TinySpec(hidden_size=32, intermediate_size=64, num_layers=1, vision_hidden_size=32, vision_layers=1)
    policy = str(build_tiny_policy(tmp_path / "policy", "llava", spec))
    rows = build_rationale_sft_set(synthetic_source(seed=4, n_sft=24, n_calibrate=0, n_eval=0))
    one = train_rationale_sft(policy, rows, str(tmp_path / "one"), _settings(8, 1))
    (tmp_path / "two").mkdir()
    two = _launch(tmp_path / "two", "rationale_sft", policy, rows, _settings(4, 2))
    assert two["processes"] == 2 and two["steps"] == one["steps"] == 3
    assert _losses(two["log"]) == pytest.approx(_losses(one["log"]), rel=LOSS_TOLERANCE)
    load_policy(str(tmp_path / "two" / "out"))  # saved once, by the first process, and loads as any checkpoint


def test_two_process_weighted_dpo_keeps_each_pairs_weight_and_reference(tmp_path):
    """Weights that differ per pair, and reference log-probs computed before training, follow their pairs into
    whichever process gets them: the two-process losses equal the one-process ones."""
    from src_assets.source_data import synthetic_source
    from src_assets.tiny_models import TinySpec, build_tiny_policy
    from src_assets.weighted_dpo import train_weighted_dpo

    spec = TinySpec(hidden_size=32, intermediate_size=64, num_layers=1, vision_hidden_size=32, vision_layers=1)
    policy = str(build_tiny_policy(tmp_path / "policy", "llava", spec))
    prompts = synthetic_source(seed=5, n_sft=0, n_calibrate=24, n_eval=0)
    pairs = prompts.select(
        pl.col("id").alias("prompt_id"),
        "question",
        "image",
        pl.col("response").alias("chosen"),
        pl.lit("there is nothing here.\nAnswer: none").alias("rejected"),
        pl.Series("weight", [0.1 + 0.9 * ((i * 7) % 24) / 23 for i in range(24)]),
        pl.lit(True).alias("kept"),
    )
    one = train_weighted_dpo(policy, pairs, str(tmp_path / "one"), _settings(8, 1), beta=0.1)
    (tmp_path / "two").mkdir()
    two = _launch(tmp_path / "two", "weighted_dpo", policy, pairs, _settings(4, 2), beta=0.1)
    assert _losses(two["log"]) == pytest.approx(_losses(one["log"]), rel=LOSS_TOLERANCE)
    flat = train_weighted_dpo(policy, pairs, str(tmp_path / "flat"), _settings(8, 1), beta=0.1, weighted=False)
    assert _losses(flat["log"])[0] != pytest.approx(_losses(one["log"])[0], rel=1e-2)  # the weights matter


def test_train_processes_runs_the_smoke_loop_through_accelerate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    store = tmp_path / "store"
    args = ["run", "--profile", "smoke", "--iterations", "1", "--store", str(store), "--set", "train_processes=2"]
    assert main([*args, "--json"]) == 0, capsys.readouterr().err[-3000:]
    from src_assets.models import load_policy

    for key in ("models/sft_checkpoint", "models/policy_checkpoint/001"):
        load_policy(Store(str(store)).current_model(key))
