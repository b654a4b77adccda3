"""The whole SRC graph through Dagster on the smoke profile: two iterations in order, checks, sensor, schedule."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    build_schedule_context,
    build_sensor_context,
    instance_for_test,
    materialize,
)

from dagster_project.assets.partitions import iteration_partitions
from dagster_project.automation import ITERATION_ASSETS, iteration_schedule, new_source_data_sensor
from dagster_project.definitions import all_assets, all_checks, foundation_assets
from dagster_project.resources import SettingsResource, StoreResource, build_resources, store_label
from dagster_project.tags import STORE_TAG
from src_assets.leases import acquire_lease
from src_assets.storage import Store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_two_iterations(tmp_path_factory):
    """Materializes the foundation, then iterations 001 and 002, in one instance and store; returns both."""
    root = tmp_path_factory.mktemp("pipeline")
    instance = DagsterInstance.ephemeral()
    resources = build_resources(StoreResource(base_uri=str(root / "store")), SettingsResource(profile="smoke"))
    started = time.monotonic()
    foundation = foundation_assets
    foundation_result = materialize([*foundation, *all_checks], instance=instance, resources=resources)
    assert foundation_result.success
    # No partition is added here: the SFT checkpoint offers iteration 001, and each policy the next iteration.
    results = {"foundation": foundation_result}
    for key in ("001", "002"):
        results[key] = materialize(
            all_assets, selection=list(ITERATION_ASSETS), partition_key=key, instance=instance, resources=resources
        )
    return instance, Store(str(root / "store")), results, time.monotonic() - started, resources


def test_two_iterations_materialize_every_asset_in_time(run_two_iterations):
    instance, store, results, seconds, _ = run_two_iterations
    assert seconds < 180, f"the smoke loop took {seconds:.0f}s"
    for key, result in results.items():
        if key == "foundation":
            continue
        assert result.success
        done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert done == set(ITERATION_ASSETS)
        for asset in ITERATION_ASSETS:
            assert key in instance.get_materialized_partitions(AssetKey(asset))
    assert store.read_table("assets/preference_set/002.parquet").height > 0
    # Iteration 2 started from iteration 1's policy.
    meta = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in results["002"].get_asset_materialization_events()
    }
    assert meta["policy_checkpoint"]["started_from"].value == store.current_model("models/policy_checkpoint/001")
    assert meta["candidate_pool"]["policy"].value == store.current_model("models/policy_checkpoint/001")
    # What the Launchpad's partition box offers: the iterations run, and the next one (its policy is not committed).
    assert instance.get_dynamic_partitions(iteration_partitions.name) == ["001", "002", "003"]


def test_every_materialization_names_its_store_in_a_tag_and_its_metadata(run_two_iterations):
    instance, store, results, _, _ = run_two_iterations
    for result in results.values():
        for event in result.get_asset_materialization_events():
            name = event.asset_key.to_user_string()
            assert event.materialization.tags[STORE_TAG] == store_label(store.base_uri), name
            assert event.materialization.metadata["store"].value == store.base_uri, name


def test_metadata_and_checks_are_recorded(run_two_iterations):
    _, _, results, _, _ = run_two_iterations
    result = results["001"]
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    for metric in ("accuracy", "factuality", "completeness", "consistency", "judge_win_rate_vs_previous"):
        assert isinstance(meta["iteration_eval"][metric].value, float)
    assert "| candidate |" in meta["pairwise_scores"]["sample_matrix_q"].value
    assert "| weight |" in meta["preference_set"]["weight_histogram"].value
    foundation = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in results["foundation"].get_asset_materialization_events()
    }
    judge = foundation["judge_checkpoint"]
    assert judge["contrast_pairs"].value == 48 and judge["candidate_pairs"].value > 0  # the smoke profile's
    assert judge["training_pairs"].value == judge["candidate_pairs"].value + 48 + judge["user_pairs"].value
    # How the trained judge reads back its own training rows, beside what the label prior alone would give.
    assert 0 <= judge["training_rows_fit"].value <= 1 and 0 < judge["training_rows_prior_fit"].value <= 1
    assert judge["training_rows_verdict_spread"].value >= 0
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(checks) == {
        "most_prompts_have_two_distinct_candidates",
        "weights_in_unit_interval",
        "no_wrong_chosen_answer",
        "keeps_pairs",
        "no_regression",
    }
    assert checks["weights_in_unit_interval"].passed
    scores, clear = meta["pairwise_scores"], meta["pairwise_scores"]["clear_pairs"].value
    if clear:
        assert 0 <= scores["judge_agreement"].value <= 1
    else:  # nothing to agree on: no NaN, a note that says why
        assert "judge_agreement" not in scores and scores["judge_agreement_note"].value.startswith("none: no pair")


def test_a_tau_change_leaves_judging_fresh_and_marks_curation_stale(run_two_iterations):
    """Curation's threshold reads nothing upstream of the preference set: changing it marks preference_set stale
    in Dagster's own stale-status resolver (what trains on it follows once it is materialized again), while the
    candidate pool and the judged pairs, the costliest steps, stay fresh."""
    from dagster import Definitions, load_assets_from_modules
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    from dagster_project.definitions import ASSET_MODULES
    from dagster_project.versions import with_code_versions

    instance, _, _, _, resources = run_two_iterations
    every = load_assets_from_modules(ASSET_MODULES)
    as_run = SettingsResource().config()  # the settings the fixture's versions were stamped with

    def status(cfg, name):
        graph = Definitions(assets=with_code_versions(every, cfg), resources=resources).resolve_asset_graph()
        resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
        return resolver.get_status(AssetKey(name), "001")

    for name in ("candidate_pool", "pairwise_scores", "preference_set", "policy_checkpoint"):
        assert status(as_run, name) == StaleStatus.FRESH, name
    tau_changed = SettingsResource(overrides={"tau": as_run.curation.tau + 0.2}).config()
    assert status(tau_changed, "candidate_pool") == StaleStatus.FRESH
    assert status(tau_changed, "pairwise_scores") == StaleStatus.FRESH
    assert status(tau_changed, "preference_set") == StaleStatus.STALE


def test_sft_checkpoint_is_checked_for_using_its_image(run_two_iterations):
    _, _, results, _, _ = run_two_iterations
    checks = {e.check_name: e for e in results["foundation"].get_asset_check_evaluations()}
    check = checks["uses_its_image"]
    meta = {k: v.value for k, v in check.metadata.items()}
    assert meta["drop"] == pytest.approx(meta["accuracy"] - meta["accuracy_blank_images"])
    # The smoke profile's SFT is far too short to learn to see; its profile reports the check without requiring it.
    assert meta["required_drop"] == -1.0 and check.passed == (meta["drop"] >= meta["required_drop"])


def test_missing_predecessor_fails_clearly_and_writes_nothing(run_two_iterations):
    instance, store, _, _, resources = run_two_iterations
    instance.add_dynamic_partitions(iteration_partitions.name, ["004"])
    result = materialize(
        all_assets,
        selection=list(ITERATION_ASSETS),
        partition_key="004",
        instance=instance,
        resources=resources,
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.message
    assert "iteration 004 needs the policy of iteration 003" in message and "materialize iteration 003 first" in message
    assert not store.list("assets/candidate_pool", "004.parquet")
    assert store.current_model("models/policy_checkpoint/004") is None


def test_an_iteration_that_keeps_no_pair_carries_the_policy_forward(run_two_iterations):
    # Runs after the missing-predecessor test, which needs iteration 003 to be absent.
    instance, store, _, _, resources = run_two_iterations
    strict = build_resources(resources["store"], SettingsResource(profile="smoke", overrides={"tau": 1.0}))
    instance.add_dynamic_partitions(iteration_partitions.name, ["003"])
    result = materialize(
        all_assets, selection=list(ITERATION_ASSETS), partition_key="003", instance=instance, resources=strict
    )
    assert result.success
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert meta["policy_checkpoint"]["trained"].value is False
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["keeps_pairs"].passed
    assert store.current_model("models/policy_checkpoint/003") != store.current_model("models/policy_checkpoint/002")


def test_an_iteration_uses_the_start_policy_it_resolved_even_if_current_moves(run_two_iterations):
    """start_policy[k] is resolved once; a new version of policy k-1 committed mid-iteration changes nothing
    downstream: DPO starts from, and the evaluation compares with, the recorded policy."""
    instance, store, _, _, resources = run_two_iterations
    policy_3 = store.local_model_dir(store.current_model("models/policy_checkpoint/003"))
    store.put_model("models/policy_checkpoint/004", policy_3)
    instance.add_dynamic_partitions(iteration_partitions.name, ["005"])
    first = materialize(
        all_assets,
        selection=["start_policy", "calibration_prompts", "candidate_pool"],
        partition_key="005",
        instance=instance,
        resources=resources,
    )
    resolved = store.read_json("assets/start_policy/005.json")
    assert first.success and resolved == store.current_model("models/policy_checkpoint/004")
    policy_2 = store.local_model_dir(store.current_model("models/policy_checkpoint/002"))
    moved = store.put_model("models/policy_checkpoint/004", policy_2)  # as if iteration 004 were rerun meanwhile
    assert store.current_model("models/policy_checkpoint/004") == moved != resolved
    rest = materialize(
        all_assets,
        selection=["pairwise_scores", "preference_set", "policy_checkpoint", "iteration_eval"],
        partition_key="005",
        instance=instance,
        resources=resources,
    )
    assert rest.success
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in rest.get_asset_materialization_events()}
    assert meta["policy_checkpoint"]["started_from"].value == resolved
    assert meta["iteration_eval"]["compared_with"].value == resolved
    assert meta["iteration_eval"]["checkpoint"].value == store.read_json("assets/policy_checkpoint/005.json")


def test_calibration_prompts_are_a_slice_disjoint_from_the_judges(run_two_iterations):
    _, store, _, _, _ = run_two_iterations
    source = store.read_table("assets/vqa_source.parquet")
    judges = set(source.filter(pl.col("split") == "calibrate").head(8)["id"])  # smoke: judge_prompts=8
    first, second = (set(store.read_table(f"assets/calibration_prompts/{k}.parquet")["id"]) for k in ("001", "002"))
    assert len(first) == 8 and not first & judges and not second & judges


def test_the_run_log_shows_generation_and_judging_progress(run_two_iterations):
    instance, _, results, _, _ = run_two_iterations
    messages = [e.user_message for e in instance.all_logs(results["001"].run_id)]
    for stage in ("candidate search (prompts): 8/8", "judging pairs: ", "generating responses: 20/20"):
        assert any(stage in m for m in messages), stage


def test_a_preference_set_that_fails_its_error_check_blocks_training(run_two_iterations, monkeypatch):
    """A chosen response with a wrong answer among the kept pairs (here forced by a broken curation): the
    blocking check fails and policy_checkpoint is not trained on it."""
    import dagster_project.assets.iteration as iteration_assets

    instance, store, _, _, resources = run_two_iterations
    strict = build_resources(
        resources["store"], SettingsResource(profile="smoke", overrides={"require_correct_chosen": "true"})
    )
    real = iteration_assets.curate_preferences

    def keeps_a_wrong_answer(*args, **kwargs):
        prefs = real(*args, **kwargs)
        forced = pl.col("chosen").is_not_null()
        return prefs.with_columns(
            kept=forced, chosen_correct=pl.when(forced).then(False).otherwise(pl.col("chosen_correct"))
        )

    monkeypatch.setattr(iteration_assets, "curate_preferences", keeps_a_wrong_answer)
    before = store.current_model("models/policy_checkpoint/001")
    result = materialize(
        all_assets,
        selection=list(ITERATION_ASSETS),
        partition_key="001",
        instance=instance,
        resources=strict,
        raise_on_error=False,
    )
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["no_wrong_chosen_answer"].passed
    assert not result.success
    assert not [e for e in result.all_events if e.step_key == "policy_checkpoint" and e.is_step_start]  # never started
    assert store.current_model("models/policy_checkpoint/001") == before  # no new policy was committed


def _commit_policy(store: Store, key: str, model_dir) -> None:
    store.put_model(f"models/policy_checkpoint/{key}", model_dir)


def test_sensor_reads_new_files_and_runs_the_first_uncommitted_iteration(tmp_path, tiny_dirs):
    store = StoreResource(base_uri=str(tmp_path))
    settings = SettingsResource(profile="smoke")
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(iteration_partitions.name, ["001", "002"])
        _commit_policy(
            Store(str(tmp_path)), "001", tiny_dirs[0]
        )  # 001 done; 002 was added but failed, so not committed
        ctx = build_sensor_context(instance=instance, resources={"store": store, "settings": settings})
        assert new_source_data_sensor(ctx).__class__.__name__ == "SkipReason"
        Store(str(tmp_path)).write_table("source/batch-1.parquet", pl.DataFrame({"id": ["x"]}))
        result = new_source_data_sensor(
            build_sensor_context(instance=instance, resources={"store": store, "settings": settings})
        )
        assert [r.partition_key for r in result.run_requests] == ["002"]  # retried, not skipped for 003
        assert result.dynamic_partitions_requests[0].partition_keys == ["002"]
        # The same files again: nothing new.
        again = new_source_data_sensor(
            build_sensor_context(
                instance=instance, cursor=result.cursor, resources={"store": store, "settings": settings}
            )
        )
        assert again.__class__.__name__ == "SkipReason"
        # More files later: 002 may be asked for again, under a new run key.
        Store(str(tmp_path)).write_table("source/batch-2.parquet", pl.DataFrame({"id": ["y"]}))
        later = new_source_data_sensor(
            build_sensor_context(
                instance=instance, cursor=result.cursor, resources={"store": store, "settings": settings}
            )
        )
        assert (
            later.run_requests[0].partition_key == "002"
            and later.run_requests[0].run_key != result.run_requests[0].run_key
        )
        # A file fixed in place under the same name (or completed after a partial copy) is new again.
        Store(str(tmp_path)).write_table("source/batch-2.parquet", pl.DataFrame({"id": ["y", "z"]}))
        fixed = new_source_data_sensor(
            build_sensor_context(
                instance=instance, cursor=later.cursor, resources={"store": store, "settings": settings}
            )
        )
        assert fixed.__class__.__name__ == "SensorResult" and fixed.run_requests[0].tags["src/new_files"] == "1"
        assert fixed.run_requests[0].run_key not in (later.run_requests[0].run_key, result.run_requests[0].run_key)
        unchanged = new_source_data_sensor(
            build_sensor_context(
                instance=instance, cursor=fixed.cursor, resources={"store": store, "settings": settings}
            )
        )
        assert unchanged.__class__.__name__ == "SkipReason"


def test_the_sensor_job_reads_and_validates_the_source_table_again():
    from dagster_project.automation import new_data_job
    from dagster_project.definitions import defs

    job = defs.resolve_job_def(new_data_job.name)
    assets = {key.to_user_string() for key in job.asset_layer.executable_asset_keys}
    assert {"vqa_source", "eval_set", *ITERATION_ASSETS} <= assets
    assert "sft_checkpoint" not in assets and "judge_checkpoint" not in assets


def test_a_new_invalid_source_file_fails_the_sensor_run_naming_the_file(tmp_path):
    from dagster_project.automation import new_data_job
    from dagster_project.definitions import defs

    Store(str(tmp_path / "store")).write_table("source/bad.parquet", pl.DataFrame({"id": ["x"], "split": ["sft"]}))
    resources = build_resources(StoreResource(base_uri=str(tmp_path / "store")), SettingsResource(profile="smoke"))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(iteration_partitions.name, ["001"])
        job = defs.resolve_job_def(new_data_job.name)
        result = job.execute_in_process(
            instance=instance, partition_key="001", resources=resources, raise_on_error=False
        )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == "vqa_source")
    assert "bad.parquet: has no column 'question' or 'answer' or 'image'" in failure.step_failure_data.error.message
    assert not result.is_node_success("candidate_pool")  # nothing is sampled from unvalidated data


def test_schedule_requests_the_first_uncommitted_iteration(tmp_path, tiny_dirs):
    store = StoreResource(base_uri=str(tmp_path))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(iteration_partitions.name, ["001", "002"])
        request = iteration_schedule(build_schedule_context(instance=instance, resources={"store": store}))
        assert request.partition_key == "001"
        _commit_policy(Store(str(tmp_path)), "001", tiny_dirs[0])
        request = iteration_schedule(build_schedule_context(instance=instance, resources={"store": store}))
        assert request.partition_key == "002"
        assert "002" in instance.get_dynamic_partitions(iteration_partitions.name)


def test_cli_prints_one_row_per_iteration_as_json(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "SRC_STORE_URI": str(tmp_path / "store")}
    # The oracle judge, set through --set like any model reference.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster_project.runs.cli",
            "run",
            "--profile",
            "smoke",
            "--iterations",
            "1",
            "--json",
            "--set",
            "judge_model=verifier",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert set(rows[1]) >= {
        "accuracy",
        "factuality",
        "consistency",
        "pairs_kept",
        "mean_weight",
        "judge_agreement",
        "checkpoint",
    }
    agreement = rows[1]["judge_agreement"]
    assert agreement in (1.0, None)  # the verifier agrees with itself (null: no clear pair at all)
    assert rows[1]["checkpoint"].startswith(str(tmp_path / "store"))
    with DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        assert len(instance.get_runs()) == 2  # the foundation run and iteration 001's


def test_a_run_launched_while_another_holds_the_store_is_refused_before_it_writes(run_two_iterations):
    """A run from the UI, a sensor or a schedule holds the store for its whole length, like src-calibrate does:
    a foundation run (which would rewrite the eval set, SFT and judge) or an iteration run started meanwhile
    fails before any step, and nothing stored changes."""
    _, store, _, _, resources = run_two_iterations
    root = Path(store.base_uri)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    foundation = foundation_assets
    # The lease is the store's: a run from any instance (here a new one, as the UI's would be) is refused.
    with instance_for_test() as instance, acquire_lease(store, "leases/store_run.json", "another-run"):
        instance.add_dynamic_partitions(iteration_partitions.name, ["002"])
        refused = [
            materialize([*foundation, *all_checks], instance=instance, resources=resources, raise_on_error=False),
            materialize(
                all_assets,
                selection=list(ITERATION_ASSETS),
                partition_key="002",
                instance=instance,
                resources=resources,
                raise_on_error=False,
            ),
        ]
        after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "leases" not in p.parts}
    for result in refused:
        assert not result.success
        assert not result.get_asset_materialization_events() and not result.get_step_success_events()
        failure = next(e for e in result.all_events if e.event_type_value == "RESOURCE_INIT_FAILURE")
        assert "another run is using this store, so this run writes nothing" in str(failure.event_specific_data.error)
        assert "leases/store_run.json is held by another-run" in str(failure.event_specific_data.error)
    assert after == {p: t for p, t in before.items() if "leases" not in p.parts}
    assert not store.exists("leases/store_run.json")  # released by its holder; the refused runs took nothing
