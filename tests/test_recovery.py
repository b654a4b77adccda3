"""Crash recovery: a run killed with SIGKILL blocks nothing, and a plain rerun continues from the last complete
asset: no SFT, judge or completed iteration is computed twice."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src_assets.storage import Store


def _cli(tmp_path, *args):
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "home"),
        "SRC_STORE_URI": str(tmp_path / "store"),
        "HF_HUB_OFFLINE": "1",
    }
    return [sys.executable, "-m", "dagster_project.runs.cli", "run", "--profile", "smoke", "--json", *args], env


def _versions(store_dir, key):
    return sorted(os.listdir(store_dir / key / "versions"))


def _wait_until_stored(store, key, process, what):
    """Polls until ``key`` is in the store, failing if ``process`` ends first or five minutes pass."""
    deadline = time.monotonic() + 300
    while not store.exists(key):
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"the run never reached {what}"
        time.sleep(0.05)


def test_a_killed_run_blocks_nothing_and_the_rerun_retrains_nothing_complete(tmp_path):
    command, env = _cli(tmp_path, "--iterations", "2")
    store = Store(str(tmp_path / "store"))
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Killed inside iteration 002, once its candidate pool is stored: a model step is running and holds the pool.
    _wait_until_stored(store, "assets/candidate_pool/002.parquet", victim, "iteration 002's candidate pool")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert store.current_model("models/policy_checkpoint/002") is None

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = json.loads(rerun.stdout)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert "died with its process" in rerun.stderr
    assert "iteration 001: already complete" in rerun.stderr
    assert re.search(r"^  sft_checkpoint +[\d.]+ s  reused$", rerun.stderr, re.M), rerun.stderr[-3000:]
    store_dir = tmp_path / "store" / "models"
    assert len(_versions(store_dir, "base_policy_checkpoint")) == 1  # the base stage is cached by its inputs too
    assert len(_versions(store_dir, "sft_checkpoint")) == 1  # not retrained
    assert len(_versions(store_dir, "judge_checkpoint")) == 1
    assert len(_versions(store_dir, "policy_checkpoint/001")) == 1  # iteration 001 not recomputed
    assert store.current_model("models/policy_checkpoint/002") is not None

    fresh, env = _cli(tmp_path, "--iterations", "1", "--fresh")
    again = subprocess.run(fresh, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.from_config(str(tmp_path / "home")) as instance:  # --fresh trained them again
        for key in ("base_policy_checkpoint", "sft_checkpoint", "judge_checkpoint"):
            latest = instance.get_latest_materialization_event(AssetKey(key)).asset_materialization
            assert latest.metadata["reused"].value is False, key


def test_two_runs_of_one_store_exactly_one_writes(tmp_path):
    """Run A holds the store (stopped with SIGSTOP inside iteration 001). Run B, from another Dagster instance
    with other settings, and run C, from A's own instance with --fresh, are refused before they write anything:
    neither rewrites the source table, the eval set or the checkpoints A's iteration reads. One policy version
    is written, and A's evaluation names A's checkpoint and A's eval set."""
    command, env_a = _cli(tmp_path, "--iterations", "1")
    store = Store(str(tmp_path / "store"))
    a = subprocess.Popen(command, env=env_a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until_stored(store, "leases/iteration/001.json", a, "iteration 001's lease")
    os.kill(a.pid, signal.SIGSTOP)
    try:
        written = {
            p: p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("*") if p.is_file() and "leases" not in p.parts
        }
        env_b = {**env_a, "DAGSTER_HOME": str(tmp_path / "home_b")}
        b = subprocess.run([*command, "--set", "n_eval=5"], env=env_b, capture_output=True, text=True, timeout=300)
        c = subprocess.run([*command, "--fresh"], env=env_a, capture_output=True, text=True, timeout=300)
        for refused in (b, c):
            assert refused.returncode == 1
            assert "another run is using this store, so this run writes nothing" in refused.stderr, refused.stderr[
                -3000:
            ]
            assert "leases/store_run.json is held by src-calibrate-" in refused.stderr
        after = {
            p: p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("*") if p.is_file() and "leases" not in p.parts
        }
        assert after == written  # nothing B or C could have written
        assert store.read_json("leases/store_run.json")["pid"] == a.pid
    finally:
        os.kill(a.pid, signal.SIGCONT)
    out_a, err_a = a.communicate(timeout=300)
    assert a.returncode == 0, err_a[-3000:]
    committed = store.current_model("models/policy_checkpoint/001")
    assert json.loads(out_a)[1]["checkpoint"] == committed
    assert store.read_table("assets/iteration_eval/001.parquet").height == 20  # A's eval set (smoke: 20), not B's 5
    assert len(_versions(tmp_path / "store" / "models", "policy_checkpoint/001")) == 1
    assert not store.exists("leases/iteration/001.json") and not store.exists("leases/store_run.json")


def test_weights_changed_in_place_retrain_sft_and_a_broken_committed_policy_is_recomputed(tmp_path, tiny_dirs):
    """Reuse follows content, not paths: a policy_model directory whose weights changed under the same path is a
    new model (SFT retrains), and a committed iteration whose policy fails its manifest check is not complete."""
    import shutil

    from safetensors.torch import load_file, save_file

    mine = tmp_path / "my_vlm"
    shutil.copytree(tiny_dirs[0], mine)
    command, env = _cli(tmp_path, "--iterations", "1", "--set", f"policy_model={mine}")
    store_dir = tmp_path / "store" / "models"
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]

    (version,) = _versions(store_dir, "policy_checkpoint/001")
    weights = store_dir / "policy_checkpoint" / "001" / "versions" / version / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated after it was committed
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "iteration 001: its committed policy fails verification, so the iteration runs again" in second.stderr
    assert "already complete" not in second.stderr
    assert len(_versions(store_dir, "policy_checkpoint/001")) == 2
    assert len(_versions(store_dir, "sft_checkpoint")) == 1  # reused: nothing it depends on changed

    tensors = load_file(mine / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0  # same shapes, same file size, same path
    save_file(tensors, mine / "model.safetensors", metadata={"format": "pt"})
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert third.returncode == 0, third.stderr[-3000:]
    assert len(_versions(store_dir, "sft_checkpoint")) == 2
    assert "already complete" not in third.stderr


def _pool_holder(home, pid: int) -> str:
    """A run of this host's src-calibrate, process ``pid``, holding the ``gpu`` pool's one slot in the instance
    at ``home``: what a run killed in the middle of a model step leaves behind."""
    import socket
    import uuid

    from dagster import DagsterInstance, DagsterRun, DagsterRunStatus

    from dagster_project.tags import RUN_HOST_TAG, RUN_PID_TAG

    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text((Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml").read_text())
    instance = DagsterInstance.from_config(str(home))
    run_id = str(uuid.uuid4())
    instance.add_run(
        DagsterRun(
            job_name="src_calibrate_run",
            run_id=run_id,
            status=DagsterRunStatus.STARTED,
            tags={RUN_HOST_TAG: socket.gethostname(), RUN_PID_TAG: str(pid)},
        )
    )
    assert instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")  # dagster.yaml: one slot
    assert instance.event_log_storage.claim_concurrency_slot("gpu", run_id, "sft_checkpoint").is_claimed
    return run_id


def _wait_for_line(process, text: str, timeout: float = 300) -> str:
    """Reads ``process``'s stderr until a line holds ``text``; returns what it read."""
    seen, deadline = [], time.monotonic() + timeout
    for line in process.stderr:
        seen.append(line)
        if text in line:
            return "".join(seen)
        assert time.monotonic() < deadline, f"no line with {text!r} in time: {''.join(seen)[-2000:]}"
    raise AssertionError(f"the run ended before a line with {text!r}: {''.join(seen)[-2000:]}")


def _sigterm(process) -> tuple[str, float]:
    """Sends SIGTERM to ``process`` and waits for it: its stderr, and the seconds it took to end."""
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = process.communicate(timeout=60)
    return err, time.monotonic() - sent


def test_a_pool_holder_killed_while_a_run_waits_frees_the_slot_and_a_waiting_run_stops_on_sigterm(tmp_path):
    holder = subprocess.Popen(["sleep", "600"])
    run_id = _pool_holder(tmp_path / "home", holder.pid)
    command, env = _cli(tmp_path, "--iterations", "0")
    try:
        # The holder is alive: the run waits for the pool, names the run that holds it, and stops on SIGTERM.
        waiting = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_line(waiting, f"waiting for pool 'gpu', held by run(s) {run_id[:8]}")
        os.kill(waiting.pid, signal.SIGTERM)
        _, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 130, err[-2000:]
        assert "interrupted while the run waited on a pool" in err and "leases released" in err
        assert not (tmp_path / "store" / "leases" / "store_run.json").exists()  # its store lease is released

        # Killed (kill -9 leaves its slot taken) while a second run waits: the waiting run frees it and goes on.
        second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_line(second, "waiting for pool 'gpu'")
        holder.kill()
        holder.wait()
        out, err = second.communicate(timeout=300)
        assert second.returncode == 0, err[-3000:]
        assert f"run {run_id[:8]} died with its process {holder.pid}: marked failed" in err
        assert f"freed the pool slot held by run {run_id[:8]}" in err
        assert json.loads(out)[0]["iteration"] == 0
    finally:
        holder.kill()


def test_sigterm_during_an_upload_ends_the_run_within_30_s_marked_failed_with_its_leases_released(
    tmp_path, monkeypatch
):
    """The SFT checkpoint's upload to an S3 store hangs (this test's server holds the PUT of its weights), and a
    SIGTERM lands while the step waits on it: the command ends within 30 s, non-zero, its run failed, its lease
    free, and no version of the SFT checkpoint is current."""
    import threading

    import boto3
    from dagster import DagsterInstance, DagsterRunStatus
    from moto.s3.responses import S3Response
    from moto.server import ThreadedMotoServer

    from src_assets.storage import Store

    held, let_go, put_object = threading.Event(), threading.Event(), S3Response.put_object

    def a_hanging_upload_of_the_sft_weights(response):
        if "/models/sft_checkpoint/versions/" in response.path and response.path.endswith("model.safetensors"):
            held.set()
            let_go.wait(120)
        return put_object(response)

    monkeypatch.setattr(S3Response, "put_object", a_hanging_upload_of_the_sft_weights)
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="uploads")
    command, env = _cli(tmp_path, "--iterations", "1", "--store", "s3://uploads/store")
    env.update(credentials, SRC_S3_ENDPOINT_URL=endpoint)
    running = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not held.wait(0.5):
            assert running.poll() is None and time.monotonic() < deadline, "the run ended before the SFT upload"
        err, took = _sigterm(running)
    finally:
        running.kill()
        let_go.set()
    try:
        assert running.returncode == 130 and took < 30, (running.returncode, round(took, 1), err[-2000:])
        assert err.rpartition("src-calibrate: interrupted")[2].strip().endswith("leases released"), err[-2000:]
        store = Store("s3://uploads/store", s3_endpoint_url=endpoint)
        assert not store.exists("leases/store_run.json")
        assert store.current_model("models/sft_checkpoint") is None
    finally:
        server.stop()
    with DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        assert [r.status for r in instance.get_runs()] == [DagsterRunStatus.FAILURE]


def test_two_stores_under_one_dagster_home_each_reuse_their_own_iterations(tmp_path):
    """Runs into stores X, Y, then X again, from one instance: the third finds X's iteration 001 complete, although
    the latest materialization of that partition is Y's."""
    command, env = _cli(tmp_path, "--iterations", "1")
    runs = []
    for name in ("x", "y", "x"):
        runs.append(
            subprocess.run(
                [*command, "--store", str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=400
            )
        )
        assert runs[-1].returncode == 0, runs[-1].stderr[-3000:]
    assert "already complete" not in runs[0].stderr and "already complete" not in runs[1].stderr
    assert "iteration 001: already complete with these settings" in runs[2].stderr
    assert json.loads(runs[2].stdout)[1]["checkpoint"] == json.loads(runs[0].stdout)[1]["checkpoint"]
    for name in ("x", "y"):
        assert len(_versions(tmp_path / name / "models", "policy_checkpoint/001")) == 1


@pytest.mark.parametrize(
    "during, after_line",
    [
        ("candidate search", "calibration_prompts"),
        ("judging", "candidate_pool.join_candidates"),
        ("weighted DPO training", "preference_set"),
    ],
)
def test_sigterm_at_any_step_ends_the_run_within_30_s_marked_failed_with_its_leases_released(
    tmp_path, during, after_line
):
    """A SIGTERM lands while a step's code runs. Inside a step Dagster raises it wherever the code is, and code
    that catches every exception (SQLAlchemy closing a connection, during candidate search) swallowed it: the run
    went on to its end and exited 0. Now the command ends within 30 s, non-zero, its run failed, its leases free."""
    from dagster import DagsterInstance, DagsterRunStatus

    # Large enough that each of these steps runs for many seconds (on 2 cores: search ~10 s, judging ~25 s, DPO ~12 s).
    sizes = ["--set", "n_calibrate=1100", "--set", "prompts_per_iteration=1000", "--set", "k=6"]
    command, env = _cli(tmp_path, "--iterations", "1", *sizes)
    running = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(running, after_line)
        time.sleep(2)  # into the next step
        assert running.poll() is None, f"the run ended before {during}"
        err, took = _sigterm(running)
    finally:
        running.kill()
    assert running.returncode == 130 and took < 30, (running.returncode, round(took, 1), err[-2000:])
    said = err.rpartition("src-calibrate: interrupted")[2]  # a progress bar's line may hold its start
    assert said and said.strip().endswith("leases released"), err[-2000:]
    assert not (tmp_path / "store" / "leases" / "store_run.json").exists()
    assert not list((tmp_path / "store" / "leases" / "iteration").glob("*.json"))
    with DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        iteration = [r for r in instance.get_runs() if r.job_name == "src_iteration"]
        assert [r.status for r in iteration] == [DagsterRunStatus.FAILURE]
