"""deploy/: what runs the same Definitions on Kubernetes, checked here without a cluster: the k8s executor is
chosen by the environment and the definitions validate with it, model steps ask for GPUs, and the Helm values
carry the store, the executor and the run queue's limits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_the_definitions_validate_with_the_k8s_executor_selected_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env={**os.environ, "SRC_EXECUTOR": "k8s", "DAGSTER_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Validation successful" in out.stderr + out.stdout
    monkeypatch.setenv("SRC_EXECUTOR", "k8s")
    from dagster_project.executors import executor_from_env

    assert executor_from_env().name == "k8s"


def test_an_unknown_executor_is_a_clear_error(monkeypatch):
    from dagster_project.executors import executor_from_env

    monkeypatch.setenv("SRC_EXECUTOR", "slurm")
    with pytest.raises(ValueError, match=r"SRC_EXECUTOR='slurm' is not one of \('local', 'k8s', 'celery'\)"):
        executor_from_env()


def test_model_steps_ask_kubernetes_for_a_gpu():
    import json

    from dagster_project.definitions import defs

    for asset in ("sft_checkpoint", "judge_checkpoint", "policy_checkpoint", "iteration_eval", "sft_eval"):
        tags = defs.resolve_assets_def(asset).op.tags
        limits = json.loads(tags["dagster-k8s/config"])["container_config"]["resources"]["limits"]
        assert limits == {"nvidia.com/gpu": "1"}, asset
    shard_ops = {op.name: op for op in defs.resolve_assets_def("candidate_pool").node_def.node_defs}
    assert "dagster-k8s/config" in shard_ops["search_shard"].tags
    assert "dagster-k8s/config" not in shard_ops["plan_shards"].tags  # no model: no GPU


def test_the_helm_values_carry_the_executor_the_s3_store_and_the_run_queue_limits():
    values = yaml.safe_load((ROOT / "deploy" / "values.yaml").read_text())
    [deployment] = values["dagster-user-deployments"]["deployments"]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["SRC_EXECUTOR"] == "k8s" and env["SRC_STORE_URI"].startswith("s3://")
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", "dagster_project.definitions"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    queue = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    shipped = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())["concurrency"]["runs"]
    assert queue["tagConcurrencyLimits"] == shipped["tag_concurrency_limits"]  # the same one-iteration-at-a-time
