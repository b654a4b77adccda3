"""``src-calibrate run`` makes runs of the code location's jobs: the UI can re-execute them, and ``--submit`` puts
them through the instance's run queue for a real ``dagster-daemon``."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from dagster_project.runs.cli import main
from dagster_project.runs.launch import LOCATION, queue_daemon_alive
from dagster_project.runs.run import _instance

ROOT = Path(__file__).resolve().parents[1]


def _home(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(
        ROOT / "deploy" / "dagster.yaml", path / "dagster.yaml"
    )  # the shipped instance: a run queue with limits
    return path


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_jobs")
    os.environ["DAGSTER_HOME"] = str(_home(root / "home"))
    code = main(["run", "--profile", "smoke", "--iterations", "1", "--store", str(root / "store"), "--json"])
    assert code == 0
    return root


def _runs(home: Path) -> list:
    os.environ["DAGSTER_HOME"] = str(home)
    return sorted(DagsterInstance.get().get_runs(), key=lambda r: r.run_id)


def test_cli_runs_are_runs_of_the_code_location_jobs(cli_run):
    runs = _runs(cli_run / "home")
    assert sorted(r.job_name for r in runs) == ["src_foundation", "src_iteration"]
    for run in runs:
        assert run.remote_job_origin.location_name == LOCATION
        assert run.remote_job_origin.repository_origin.repository_name == "__repository__"
        store = run.run_config["resources"]["store"]["config"]["base_uri"]
        assert store == str(cli_run / "store")  # a re-execution writes where this run wrote
    iteration = next(r for r in runs if r.job_name == "src_iteration")
    assert iteration.tags["dagster/partition"] == "001" and iteration.tags["src/iteration_run"] == "true"


def test_the_ui_can_re_execute_a_cli_run(cli_run):
    """What the UI's "Re-execute all" sends: the run's job is found in the workspace that workspace.yaml loads,
    and the new run carries the parent's store and settings."""
    from dagster_graphql.client.query import LAUNCH_PIPELINE_REEXECUTION_MUTATION
    from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

    runs = _runs(cli_run / "home")
    parent = next(r for r in runs if r.job_name == "src_iteration")
    instance = DagsterInstance.get()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with define_out_of_process_context(str(ROOT / "workspace.yaml"), None, instance) as context:
            result = execute_dagster_graphql(
                context,
                LAUNCH_PIPELINE_REEXECUTION_MUTATION,
                variables={"reexecutionParams": {"parentRunId": parent.run_id, "strategy": "ALL_STEPS"}},
            )
    finally:
        os.chdir(cwd)
    launched = result.data["launchPipelineReexecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    assert launched["run"]["parentRunId"] == parent.run_id and launched["run"]["pipeline"]["name"] == "src_iteration"
    assert str(cli_run / "store") in launched["run"]["runConfigYaml"]
    assert launched["run"]["status"] == "QUEUED"  # the shipped instance queues runs; no daemon runs in this test
    instance.delete_run(launched["run"]["runId"])


def test_submit_without_a_daemon_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(_home(tmp_path / "home")))
    code = main(["run", "--profile", "smoke", "--store", str(tmp_path / "store"), "--submit"])
    assert code == 2
    assert "--submit queues the runs for a dagster-daemon, and none is running" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_submit_queues_the_runs_for_a_real_daemon(tmp_path, monkeypatch, capsys):
    home = _home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    _instance()  # the home exists before the daemon starts on it, as the refusal without a daemon asks
    env = {**os.environ, "DAGSTER_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "daemon.log", "w"),
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not queue_daemon_alive(DagsterInstance.get()):
            assert daemon.poll() is None and time.time() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(1)
        store = tmp_path / "store"
        code = main(["run", "--profile", "smoke", "--iterations", "0", "--store", str(store), "--submit", "--json"])
        err = capsys.readouterr().err
        assert code == 0, err[-3000:] + (tmp_path / "daemon.log").read_text()[-3000:]
        assert "queued; the daemon launches it" in err
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=60)
    instance = DagsterInstance.get()
    runs = instance.get_runs()
    [run] = runs
    assert run.job_name == "src_foundation" and run.status == DagsterRunStatus.SUCCESS
    kinds = [e.dagster_event.event_type for e in instance.all_logs(run.run_id) if e.dagster_event]
    # Queued by this command, then launched by the daemon (a worker process of its own).
    assert kinds.index(DagsterEventType.RUN_ENQUEUED) < kinds.index(DagsterEventType.RUN_STARTING)
    assert run.tags["src/pid"] == str(os.getpid())
    assert (store / "models" / "sft_checkpoint" / "CURRENT").exists()


def test_commands_starting_together_on_a_fresh_home_make_one_instance(tmp_path):
    """Four commands' first use of one fresh DAGSTER_HOME at once: each opens the instance, and every database holds
    its schema version once. (Opened without the lock, this failed 2 of 3 tries on 2 cores: a table made twice, or a
    version table with two heads that breaks every later use.)"""
    import sqlite3

    home, go = _home(tmp_path / "home"), tmp_path / "go"
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    # Each process imports, says it is ready, and waits for the same signal, so the first uses overlap.
    opening_when_told = (
        "import os, sys, time; from dagster_project.runs.run import _instance; from dagster import DagsterInstance\n"
        f"open({str(tmp_path)!r} + '/ready-' + sys.argv[1], 'w').close()\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "_instance()"
    )
    opening = [
        subprocess.Popen(
            [sys.executable, "-c", opening_when_told, str(i)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(opening) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    failures = [err.strip()[-500:] for p in opening if (err := p.communicate()[1]) and p.returncode]
    assert not failures, failures
    databases = sorted(home.rglob("*.db"))
    assert {db.name for db in databases} >= {"runs.db", "schedules.db"}
    for db in databases:
        with sqlite3.connect(db) as connection:
            assert connection.execute("select count(*) from alembic_version").fetchone() == (1,), db


def test_every_setting_the_cli_takes_reaches_the_run_config():
    """What ``run`` builds its runs' config from (profile, ``--seed``, ``--set``, typed fields) comes back whole
    when the run's settings resource is made from that config, as the run's assets make it."""
    from dagster_project.resources import SettingsResource, StoreResource
    from dagster_project.runs.launch import run_config

    given = SettingsResource(
        profile="smoke", seed=7, n_eval=12, overrides={"tau": "0.3", "k": 4, "sft.lr_scheduler_type": "constant"}
    )
    config = run_config(StoreResource(base_uri="/tmp/x"), given, None, "multiprocess")
    seen = SettingsResource(**config["resources"]["settings"]["config"]).config()
    assert seen == given.config()
    assert (seen.seed, seen.n_eval, seen.curation.tau, seen.search.k) == (7, 12, 0.3, 4)
    assert '"lr_scheduler_type": "constant"' in seen.sft_args


def test_two_seeds_train_on_different_data_and_the_tag_is_the_digest_the_run_used(tmp_path):
    import json
    from dataclasses import asdict

    import polars as pl

    from dagster_project.resources import SettingsResource
    from dagster_project.tags import SETTINGS_TAG
    from src_assets.fingerprints import digest
    from src_assets.profiles import profile

    tables, weights = {}, {}
    for seed in (1, 2):
        os.environ["DAGSTER_HOME"] = str(_home(tmp_path / f"home{seed}"))
        store = tmp_path / f"store{seed}"
        assert main(["run", "--profile", "smoke", "--iterations", "0", "--seed", str(seed), "--store", str(store)]) == 0
        tables[seed] = pl.read_parquet(store / "assets" / "vqa_source.parquet")
        assert tables[seed]["id"].str.contains(f"-{seed}-").all()  # the seed's own scenes
        model = store / "models" / "base_policy_checkpoint"
        version = json.loads((model / "CURRENT").read_text())["version"]
        weights[seed] = (model / "versions" / version / "model.safetensors").read_bytes()
        (run,) = _runs(tmp_path / f"home{seed}")
        used = SettingsResource(**run.run_config["resources"]["settings"]["config"]).config()
        assert used.seed == seed
        assert (
            run.tags[SETTINGS_TAG]
            == digest(asdict(used), length=16)
            == digest(asdict(profile("smoke", seed=seed)), length=16)
        )
    assert not tables[1].select("question", "answer").equals(tables[2].select("question", "answer"))
    assert weights[1] != weights[2]
