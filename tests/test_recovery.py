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


def test_a_killed_run_blocks_nothing_and_the_rerun_retrains_nothing_complete(tmp_path):
    command, env = _cli(tmp_path, "--iterations", "2")
    store = Store(str(tmp_path / "store"))
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # Killed inside iteration 002, once its candidate pool is stored: a model step is running and holds the pool.
    while not store.exists("assets/candidate_pool/002.parquet"):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "iteration 002 never started"
        time.sleep(0.2)
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
    assert len(_versions(store_dir, "sft_checkpoint")) == 1  # not retrained
    assert len(_versions(store_dir, "r_scorer_checkpoint")) == 1
    assert len(_versions(store_dir, "policy_checkpoint/001")) == 1  # iteration 001 not recomputed
    assert store.current_model("models/policy_checkpoint/002") is not None

    fresh, env = _cli(tmp_path, "--iterations", "1", "--fresh")
    again = subprocess.run(fresh, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_versions(store_dir, "sft_checkpoint")) == 2 and len(_versions(store_dir, "policy_checkpoint/001")) == 2
