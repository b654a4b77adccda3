"""Reuse follows the code: an asset's version and a model's reuse fingerprint hold a digest of the code it runs
(its function, the project functions it calls, its stage modules and what they import, ``kernels/`` included), and
@reads cannot leave out a module the asset's code calls."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy_of_the_project(dest: Path) -> Path:
    for package in ("src_assets", "kernels", "dagster_project"):
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("workspace.yaml", "deploy/dagster.yaml", "pyproject.toml"):
        (dest / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / file, dest / file)
    return dest


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + "\n" + line + "\n")


def _code_digests(project: Path) -> dict[str, str]:
    """Every asset's code digest, computed by the project copy's own code in a process of its own."""
    script = (
        "import json, dagster_project.definitions; from dagster_project.versions import READS, code_digest\n"
        "import dagster_project.versions as v; assert v.__file__.startswith(%r), v.__file__\n"
        "print(json.dumps({name: code_digest(name) for name in READS}))" % str(project)
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_edited_module_changes_the_versions_of_exactly_the_assets_that_run_it(tmp_path):
    project = _copy_of_the_project(tmp_path / "project")
    before = _code_digests(project)

    _append(project / "src_assets" / "rationale_sft.py", "# a comment changes no version")
    assert _code_digests(project) == before

    _append(project / "kernels" / "dpo.py", "KERNEL_EDITED_BY_THE_TEST = 1")
    after_kernel = _code_digests(project)
    changed = {name for name in before if after_kernel[name] != before[name]}
    assert changed == {"policy_checkpoint"}  # the weighted-DPO kernel runs in the DPO step only

    _append(project / "src_assets" / "rationale_sft.py", "SFT_EDITED_BY_THE_TEST = 1")
    after_sft = _code_digests(project)
    changed = {name for name in before if after_sft[name] != after_kernel[name]}
    assert {"rationale_sft_set", "sft_checkpoint"} <= changed
    assert not changed & {"judge_checkpoint", "base_policy_checkpoint", "pairwise_scores", "policy_checkpoint"}


def test_reads_must_name_every_method_module_the_asset_calls():
    from dagster_project.versions import READS, code_digest, reads

    @reads(stages=("preference",))
    def an_asset_that_evaluates():
        from src_assets.evaluation import score_responses  # noqa: F401

    with pytest.raises(ValueError, match=r"an_asset_that_evaluates.*src_assets\.evaluation.*stages of its @reads"):
        code_digest("an_asset_that_evaluates")

    @reads(stages=("preference", "evaluation"))
    def an_asset_that_evaluates_and_says_so():
        from src_assets.evaluation import score_responses  # noqa: F401

    assert code_digest("an_asset_that_evaluates_and_says_so")
    del READS["an_asset_that_evaluates"], READS["an_asset_that_evaluates_and_says_so"]


def _store_current(store: Path, key: str) -> str:
    return json.loads((store / "models" / key / "CURRENT").read_text())["version"]


def test_an_edited_stage_retrains_that_stage_and_what_follows_and_reuses_the_rest(tmp_path):
    """The smoke loop, then an edit to the DPO stage's module (and a comment in the SFT stage's): the rerun reuses
    the base policy, the SFT checkpoint and the judge, and computes iteration 1 again, saying why."""
    project = _copy_of_the_project(tmp_path / "project")
    store = tmp_path / "store"
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(project)}
    command = [sys.executable, "-m", "dagster_project.runs.cli", "run", "--profile", "smoke", "--iterations", "1"]
    command += ["--store", str(store), "--json"]

    def run() -> subprocess.CompletedProcess:
        done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run()
    foundation = ("base_policy_checkpoint", "sft_checkpoint", "judge_checkpoint")
    models = {key: _store_current(store, key) for key in (*foundation, "policy_checkpoint/001")}

    _append(project / "src_assets" / "weighted_dpo.py", "DPO_EDITED_BY_THE_TEST = 1")
    _append(project / "src_assets" / "rationale_sft.py", "# a comment retrains nothing")
    second = run()
    assert {key: _store_current(store, key) for key in foundation} == {key: models[key] for key in foundation}
    # DPO trained again: its step line carries its loss. (The edit changes no weight, and the same bytes are not
    # stored as a new version, so the version itself need not change.)
    assert re.search(r"^  policy_checkpoint +[\d.]+ s .*train_loss=", second.stderr, re.M), second.stderr[-3000:]
    assert "iteration 001: policy_checkpoint was made by other code or settings" in second.stderr
    assert "already complete" not in second.stderr
