"""Crash recovery: a run killed with SIGKILL blocks nothing, and a plain rerun continues from the last complete
asset: no SFT, R-Scorer or completed iteration is computed twice."""

import json
import os
import signal
import subprocess
import sys
import time

from src_assets.storage import Store


def _cli(tmp_path, *args):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "SRC_STORE_URI": str(tmp_path / "store"), "HF_HUB_OFFLINE": "1"}
    return [sys.executable, "-m", "dagster_project.cli", "run", "--profile", "smoke", "--json", *args], env


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
    store_dir = tmp_path / "store" / "models"
    assert len(_versions(store_dir, "base_policy_model")) == 1  # the base stage is cached by its inputs too
    assert len(_versions(store_dir, "sft_checkpoint")) == 1  # not retrained
    assert len(_versions(store_dir, "r_scorer_checkpoint")) == 1
    assert len(_versions(store_dir, "policy_checkpoint/001")) == 1  # iteration 001 not recomputed
    assert store.current_model("models/policy_checkpoint/002") is not None

    fresh, env = _cli(tmp_path, "--iterations", "1", "--fresh")
    again = subprocess.run(fresh, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_versions(store_dir, "sft_checkpoint")) == 2 and len(_versions(store_dir, "policy_checkpoint/001")) == 2
    assert len(_versions(store_dir, "base_policy_model")) == 2


def test_two_runs_of_one_iteration_exactly_one_writes(tmp_path):
    """Run A holds iteration 001's lease (stopped with SIGSTOP while it does). Run B, from another Dagster
    instance sharing the store, is refused before writing anything; run C, from A's own instance, waits for
    the pool A holds, then is refused or finds the iteration complete. One policy version is written, and A's
    evaluation names A's checkpoint."""
    command, env_a = _cli(tmp_path, "--iterations", "1")
    store = Store(str(tmp_path / "store"))
    a = subprocess.Popen(command, env=env_a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until_stored(store, "leases/iteration/001.json", a, "iteration 001's lease")
    os.kill(a.pid, signal.SIGSTOP)
    try:
        env_b = {**env_a, "DAGSTER_HOME": str(tmp_path / "home_b")}
        b = subprocess.run(command, env=env_b, capture_output=True, text=True, timeout=300)
        assert b.returncode == 1
        assert "iteration 001 is being written by another run, so this run writes nothing" in b.stderr
        assert store.read_json("leases/iteration/001.json")["pid"] == a.pid  # B took nothing over
        c = subprocess.Popen(command, env=env_a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)  # C starts while A is still stopped: its model steps wait for the gpu pool
    finally:
        os.kill(a.pid, signal.SIGCONT)
    out_a, err_a = a.communicate(timeout=300)
    assert a.returncode == 0, err_a[-3000:]
    out_c, err_c = c.communicate(timeout=300)
    committed = store.current_model("models/policy_checkpoint/001")
    assert json.loads(out_a)[1]["checkpoint"] == committed
    # Once A runs again, C either reaches iteration 001 while A still writes it (and is refused, like B), or
    # after A finished it (and reuses it): which one depends on how their steps interleave on the pool.
    if c.returncode == 0:
        assert "iteration 001: already complete" in err_c and json.loads(out_c)[1]["checkpoint"] == committed
    else:
        assert c.returncode == 1 and "iteration 001 is being written by another run" in err_c, err_c[-3000:]
    assert len(_versions(tmp_path / "store" / "models", "policy_checkpoint/001")) == 1
    assert not store.exists("leases/iteration/001.json")  # released at the end of A's run
