import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterInstance, Definitions, materialize

from dagster_project.definitions import all_assets as every_asset
from dagster_project.definitions import defs
from dagster_project.resources import (
    IterationLeaseResource,
    SettingsResource,
    StoreIOManager,
    StoreResource,
    StoreRunLeaseResource,
    build_resources,
)
from src_assets.models import load_judge_model, load_policy
from src_assets.storage import Store

ROOT = Path(__file__).resolve().parents[1]
FOUNDATION = {
    "vqa_source",
    "rationale_sft_set",
    "eval_set",
    "perception_corpus",
    "base_policy_checkpoint",
    "base_judge_checkpoint",
}
all_assets = [a for a in every_asset if a.key.to_user_string() in FOUNDATION]


def _resources(base_uri, endpoint="", **overrides):
    return build_resources(
        StoreResource(base_uri=base_uri, s3_endpoint_url=endpoint),
        SettingsResource(profile="smoke", overrides=overrides),
    )


def test_dg_check_defs_loads_the_project_that_pyproject_names(tmp_path):
    """`dg check defs`, with the project's environment active as the README has it, finds the code location through
    pyproject.toml's [tool.dg] and loads it, warning of nothing."""
    bin_dir = Path(sys.executable).parent
    shutil.copy(ROOT / "deploy" / "dagster.yaml", tmp_path / "dagster.yaml")  # the home as the README sets it up
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path),
        "VIRTUAL_ENV": str(bin_dir.parent),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    out = subprocess.run(
        [str(bin_dir / "dg"), "check", "defs"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "All definitions loaded successfully" in out.stdout + out.stderr
    assert "warn" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr


def test_definitions_validate_through_workspace_yaml(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Validation successful" in out.stderr + out.stdout


def test_foundation_assets_materialize_with_metadata(tmp_path):
    instance = DagsterInstance.ephemeral()
    result = materialize(all_assets, instance=instance, resources=_resources(str(tmp_path)))
    assert result.success
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert set(meta) == FOUNDATION
    assert meta["vqa_source"]["rows"].value == 60 + 16 + 20
    assert meta["rationale_sft_set"]["rows"].value == 60
    assert meta["eval_set"]["rows"].value == 20
    for table in ("vqa_source", "rationale_sft_set", "eval_set"):
        assert "| count |" in meta[table]["question_kinds"].value
        assert len(meta[table]["preview"].value.records) > 0
    assert meta["vqa_source"]["splits"].value == {"calibrate": 16, "eval": 20, "sft": 60}

    store = Store(str(tmp_path))
    assert store.read_table("assets/eval_set.parquet").height == 20
    policy_uri = store.read_json("assets/base_policy_checkpoint.json")
    assert policy_uri == store.current_model("models/base_policy_checkpoint")
    assert meta["base_policy_checkpoint"]["architecture"].value == "LlavaForConditionalGeneration"
    model, _ = load_policy(store.local_model_dir(policy_uri))
    assert sum(p.numel() for p in model.parameters()) == meta["base_policy_checkpoint"]["parameters"].value
    # The tiny policy went through the base stage, and its held-out scores are recorded.
    assert meta["perception_corpus"]["rows"].value == 64
    assert (
        meta["base_policy_checkpoint"]["trained"].value is True and meta["base_policy_checkpoint"]["steps"].value == 2
    )
    for score in ("caption_factuality", "caption_exact_listing", "direct_accuracy", "direct_accuracy_blank_images"):
        assert 0 <= meta["base_policy_checkpoint"][score].value <= 1
    load_judge_model(store.local_model_dir(store.read_json("assets/base_judge_checkpoint.json")))


def test_bad_source_file_fails_naming_it_and_keeps_the_stored_table(tmp_path):
    store = Store(str(tmp_path))
    resources = _resources(str(tmp_path))
    instance = DagsterInstance.ephemeral()
    assert materialize(
        [a for a in all_assets if a.key.to_user_string() == "vqa_source"], instance=instance, resources=resources
    ).success
    before = store.read_bytes("assets/vqa_source.parquet")

    bad = store.read_table("assets/vqa_source.parquet").head(3).drop("question")
    store.write_table("source/new-batch.parquet", bad.with_columns(pl.col("id") + "-user"))
    result = materialize(
        [a for a in all_assets if a.key.to_user_string() == "vqa_source"],
        instance=instance,
        resources=resources,
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.message
    assert "source/new-batch.parquet: has no column 'question'; its columns are [" in message
    assert "Name yours with source_columns, e.g. source_columns=question:<your question column>" in message
    assert store.read_bytes("assets/vqa_source.parquet") == before


@pytest.mark.parametrize("synthetic_rows", ["auto", "on", "off"])
def test_user_files_are_the_source_alone_unless_synthetic_rows_are_asked_for(synthetic_rows, tmp_path):
    """A store with source files: by default (auto) its rows alone, never mixed with synthetic ones unasked; with
    synthetic_rows=on both join. The step's numbers say how many rows came from where."""
    store = Store(str(tmp_path))
    from src_assets.source_data import synthetic_source

    extra = synthetic_source(seed=99, n_sft=0, n_calibrate=3, n_eval=0).with_columns(pl.col("id") + "-mine")
    store.write_table("source/batch-001.parquet", extra.select("id", "split", "question", "answer", "image"))
    result = materialize(
        [a for a in all_assets if a.key.to_user_string() == "vqa_source"],
        instance=DagsterInstance.ephemeral(),
        resources=_resources(str(tmp_path), synthetic_rows=synthetic_rows),
        raise_on_error=False,
    )
    if synthetic_rows != "on":  # 3 calibrate rows alone: too few to train on, named before anything trains
        (failure,) = [e for e in result.all_events if e.is_step_failure]
        assert "the source has no 'sft' rows" in failure.step_failure_data.error.message
        return
    df = store.read_table("assets/vqa_source.parquet")
    assert df.height == 96 + 3 and df.filter(pl.col("kind") == "open").height == 3
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert (meta["rows_yours"].value, meta["rows_synthetic"].value) == (3, 96)
    assert meta["source_files"].value == [store.uri("source/batch-001.parquet")]


def test_without_source_files_the_synthetic_scenes_are_the_source(tmp_path):
    result = materialize(
        [a for a in all_assets if a.key.to_user_string() == "vqa_source"],
        instance=DagsterInstance.ephemeral(),
        resources=_resources(str(tmp_path)),
    )
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert (meta["rows_yours"].value, meta["rows_synthetic"].value) == (0, 96)


def test_assets_materialize_into_s3(s3_endpoint):
    resources = _resources("s3://src-test/dagster-run", s3_endpoint)
    wanted = {"vqa_source", "eval_set", "base_judge_checkpoint"}
    result = materialize(
        [a for a in all_assets if a.key.to_user_string() in wanted],
        instance=DagsterInstance.ephemeral(),
        resources=resources,
    )
    assert result.success
    for event in result.get_asset_materialization_events():  # the UI says which store each one went to
        assert event.materialization.metadata["store"].value == "s3://src-test/dagster-run"
    store = Store("s3://src-test/dagster-run", s3_endpoint_url=s3_endpoint)
    assert store.read_table("assets/eval_set.parquet").height == 20
    judge_uri = store.read_json("assets/base_judge_checkpoint.json")
    assert judge_uri.startswith("s3://src-test/dagster-run/models/base_judge_checkpoint/versions/")
    load_judge_model(store.local_model_dir(judge_uri))


def test_the_launchpad_explains_every_setting_and_resource_without_markup():
    """What the Launchpad shows beside each config field: the field's description, and each resource's."""
    fields = SettingsResource.to_config_schema().as_field().config_type.fields
    assert set(fields) >= {"profile", "overrides", "tau", "k", "judge_model"}
    for name, field in fields.items():
        assert field.description and "``" not in field.description, name
    # A resource's description is its class's docstring.
    for resource in (StoreResource, SettingsResource, StoreIOManager, IterationLeaseResource, StoreRunLeaseResource):
        assert resource.__doc__ and "``" not in resource.__doc__, resource.__name__


def test_definitions_carry_the_resources():
    assert set(defs.resources) == {"store", "io_manager", "settings", "iteration_lease"}


def test_every_asset_has_a_code_version():
    from dagster_project.definitions import defs

    graph = defs.resolve_asset_graph()
    assert {
        k.to_user_string(): graph.get(k).code_version
        for k in graph.get_all_asset_keys()
        if graph.get(k).code_version is None
    } == {}


def _versions(cfg):
    from dagster_project.versions import with_code_versions

    return {a.key.to_user_string(): a.specs_by_key[a.key].code_version for a in with_code_versions(every_asset, cfg)}


def test_a_setting_changes_the_code_version_of_exactly_the_assets_that_read_it():
    from src_assets.profiles import profile

    base = _versions(profile("smoke"))
    changed = lambda **kw: {name for name, v in _versions(profile("smoke", **kw)).items() if v != base[name]}
    assert changed(tau=0.3) == {"preference_set"}  # curation, not the judging or aggregation before it
    assert changed(bt_iters=20) == {"pairwise_scores"}
    assert changed(sft_epochs=2.0) == {"sft_checkpoint"}
    assert changed(beta=0.2) == {"policy_checkpoint"}
    assert changed(n_sft=61) == {"vqa_source"}
    assert changed(seed=1) >= {"vqa_source", "base_policy_checkpoint", "sft_checkpoint", "candidate_pool"}
    assert all(".settings-" in v and v.startswith("code-") for v in base.values())


def test_dagster_marks_an_asset_stale_when_its_settings_change(tmp_path):
    from dagster import AssetKey
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    from dagster_project.versions import with_code_versions
    from src_assets.profiles import profile

    instance = DagsterInstance.ephemeral()
    data = [a for a in every_asset if a.key.to_user_string() in ("vqa_source", "rationale_sft_set")]
    assert materialize(
        with_code_versions(data, profile("smoke")), instance=instance, resources=_resources(str(tmp_path))
    ).success

    def status(cfg, name):
        graph = Definitions(
            assets=with_code_versions(data, cfg), resources=_resources(str(tmp_path))
        ).resolve_asset_graph()
        return CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance)).get_status(AssetKey(name))

    assert status(profile("smoke"), "vqa_source") == StaleStatus.FRESH
    assert status(profile("smoke", n_sft=61), "vqa_source") == StaleStatus.STALE
    assert status(profile("smoke", tau=0.3), "vqa_source") == StaleStatus.FRESH  # vqa_source does not read tau


def test_each_asset_declares_every_setting_its_code_reads():
    """The @reads declaration is what versions and reuse fingerprints follow, so it must not miss a setting the
    asset's body (or a helper of its module it calls) reads: otherwise changing that setting would leave the asset
    fresh and reuse a model trained without it."""
    import ast
    import inspect
    import textwrap

    from dagster_project.definitions import ASSET_MODULES
    from dagster_project.versions import READS, asset_functions
    from src_assets.config import SETTING_BUNDLES, SETTING_GROUPS, TRAINING_SETTINGS, SRCConfig, setting_names

    trainings = {"base_settings": "base", "sft_settings": "sft", "judge_settings": "judge", "dpo_settings": "dpo"}
    methods = {
        "runtime": SETTING_BUNDLES["runtime"],
        "tiny_spec": SETTING_BUNDLES["tiny"],
        **{
            m: (f"{p}_epochs", f"{p}_learning_rate", f"{p}_batch_size", f"{p}_args", *TRAINING_SETTINGS)
            for m, p in trainings.items()
        },
    }
    methods["base_settings"] += ("base_lr_scheduler",)
    controls = {"reuse_checkpoints"}  # whether to reuse, not what is made

    flat = setting_names()
    by_field = {(g, f): n for n, (g, f, _) in flat.items() if g}

    def group_fields(group: str, attr: str) -> set[str]:
        """A field of a settings group, or the fields that a property of the group reads."""
        if (group, attr) in by_field:
            return {by_field[(group, attr)]}
        prop = getattr(type(getattr(SRCConfig(), group)), attr)
        tree = ast.parse(textwrap.dedent(inspect.getsource(prop.fget)))
        return {
            by_field[(group, n.attr)]
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
        }

    def used(fn, module, seen):
        names, tree = set(), ast.parse(inspect.getsource(fn).lstrip())
        parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg":
                parent = parents.get(id(node))
                if node.attr in SETTING_GROUPS and isinstance(parent, ast.Attribute):  # cfg.curation.tau: one field
                    names |= group_fields(node.attr, parent.attr)
                else:
                    names |= set(methods.get(node.attr, (node.attr,)))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in seen:
                # Followed into the asset graph's own modules; observe/ describes what was made (model cards,
                # trackers) and reads settings it does not change.
                helper = getattr(module, node.func.id, None)
                if inspect.isfunction(helper) and helper.__module__.startswith("dagster_project.assets."):
                    seen.add(node.func.id)
                    names |= used(helper, sys.modules[helper.__module__], seen)
        return names

    for module in ASSET_MODULES:
        for name, declared in READS.items():
            if not hasattr(module, name):
                continue
            functions = asset_functions(getattr(module, name))
            allowed = set()
            for d in declared.settings:
                allowed |= (
                    {d, *(n for n, (g, _, _) in flat.items() if g == d)}
                    if d in SETTING_GROUPS
                    else set(SETTING_BUNDLES.get(d, (d,)))
                )
            missing = set().union(*(used(fn, module, {name}) for fn in functions)) - allowed - controls - {"setting"}
            assert not missing, f"{name} reads {sorted(missing)} without declaring them in @reads"
