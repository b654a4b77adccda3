"""The command line beyond ``run``: scoring a checkpoint with real or blank images, and the ablation table."""

import json
import os

import pytest

from dagster_project.resources import SettingsResource
from dagster_project.runs.cli import build_parser, main
from dagster_project.runs.experiments import markdown, summarize_runs
from src_assets.config import setting_names
from src_assets.profiles import RenamedSettingWarning, profile


def test_evaluate_scores_a_checkpoint_with_real_and_with_blank_images(trained_tiny_vlm, capsys):
    rows = {}
    for images in ("real", "blank"):
        assert main(["evaluate", "--checkpoint", str(trained_tiny_vlm), "--n", "10", "--images", images, "--json"]) == 0
        rows[images] = json.loads(capsys.readouterr().out)
    assert rows["blank"]["images"] == "blank" and rows["real"]["images"] == "real"
    for row in rows.values():
        assert row["n"] == 10 and 0 <= row["accuracy"] <= 1


def test_evaluate_prints_the_anatomy_per_kind_and_scores_captions(trained_tiny_vlm, capsys):
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(trained_tiny_vlm),
                "--n",
                "10",
                "--anatomy",
                "--samples",
                "2",
                "--json",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    row = json.loads(capsys.readouterr().out)
    table = row["anatomy"]
    assert table["all"]["n"] == 10 and table["all"]["k"] == 2 and table["all"]["accuracy"] == row["accuracy"]
    for key in (
        "exact_listing",
        "conclusion_follows_listing",
        "answer_is_conclusion",
        "wrong_with_exact_listing",
        "wrong_with_wrong_listing",
        "any_correct_and_consistent_in_k",
    ):
        assert 0 <= table["all"][key] <= 1
    assert table["all"]["wrong_with_exact_listing"] + table["all"]["wrong_with_wrong_listing"] == pytest.approx(
        1 - row["accuracy"]
    )
    assert set(table) == {"all", "count", "exists", "attribute", "position", "compare"}
    assert main(["evaluate", "--checkpoint", str(trained_tiny_vlm), "--n", "10", "--anatomy", "--samples", "2"]) == 0
    text = capsys.readouterr().out
    assert "exact_listing" in text and "any_correct_and_consistent_in_2" in text and "compare" in text
    assert main(["evaluate", "--checkpoint", str(trained_tiny_vlm), "--n", "6", "--task", "caption", "--json"]) == 0
    caption = json.loads(capsys.readouterr().out)
    assert caption["n"] == 6 and 0 <= caption["factuality"] <= 1 and 0 <= caption["exact_listing"] <= 1
    with pytest.raises(SystemExit) as exit_:  # refused by argparse, as the command line is read
        main(["evaluate", "--checkpoint", str(trained_tiny_vlm), "--seed", "-1"])
    assert exit_.value.code == 2


def test_model_references_and_seed_can_be_overridden_like_any_setting():
    cfg = SettingsResource(
        profile="smoke", overrides={"judge_model": "verifier", "seed": 5, "policy_model": "/models/vlm"}
    ).config()
    assert (cfg.judge_model, cfg.seed, cfg.policy_model) == ("verifier", 5, "/models/vlm")


def _run(variant, seed, before, after, agreement):
    row = lambda it, m, a: {
        "iteration": it,
        "accuracy": m[0],
        "consistency": m[1],
        "factuality": m[2],
        "judge_agreement": a,
    }
    return {"variant": variant, "seed": seed, "rows": [row(0, before, None), row(1, after, agreement)]}


def test_the_ablation_table_reports_mean_and_sd_of_each_change_over_seeds():
    runs = [
        _run("src", 1, (0.5, 0.4, 0.7), (0.6, 0.5, 0.7), 0.8),
        _run("src", 2, (0.4, 0.4, 0.7), (0.6, 0.3, 0.7), 0.9),
        _run("oracle_judge", 1, (0.5, 0.4, 0.7), (0.7, 0.6, 0.8), 1.0),
        {"variant": "oracle_judge", "seed": 2, "error": "exit 1"},
    ]
    table = {r["variant"]: r for r in summarize_runs(runs)}
    src = table["src"]
    assert src["seeds"] == [1, 2] and src["failed"] == []
    assert src["accuracy_change"][0] == pytest.approx(0.15) and src["accuracy_change"][1] == pytest.approx(
        0.0707, abs=1e-4
    )
    assert src["accuracy_improved_every_seed"] and not src["consistency_improved_every_seed"]
    assert src["judge_agreement"][0] == pytest.approx(0.85)
    assert table["oracle_judge"]["failed"] == [2] and table["oracle_judge"]["seeds"] == [1]
    md = markdown(list(table.values()), 1, "500")
    assert "| src (" in md and "+0.150 ± 0.071" in md and "500 held-out scenes" in md


def test_experiment_runs_each_variant_and_trains_sft_once_per_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "exp"
    code = main(
        [
            "experiment",
            "--profile",
            "smoke",
            "--seeds",
            "4",
            "--variants",
            "src",
            "oracle_judge",
            "--iterations",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0, (out / "seed4" / "src" / "run.log").read_text()[-2000:]
    result = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in result["table"]] == ["src", "oracle_judge"]
    assert all(len(r["rows"]) == 2 for r in result["runs"])
    oracle = next(r for r in result["runs"] if r["variant"] == "oracle_judge")
    agreement = oracle["rows"][1]["judge_agreement"]
    assert agreement in (1.0, None)  # the verifier agrees with itself (null: no clear pair at all)
    # Both variants started from the same SFT checkpoint, trained once.
    assert len(list((out / "seed4" / "store" / "models" / "sft_checkpoint" / "versions").iterdir())) == 1
    assert (
        oracle["rows"][0]["checkpoint"]
        == next(r for r in result["runs"] if r["variant"] == "src")["rows"][0]["checkpoint"]
    )
    assert "| oracle_judge (" in (out / "results.md").read_text()


def test_overrides_are_coerced_to_each_settings_type():
    cfg = SettingsResource(
        profile="smoke",
        overrides={
            "weighted_dpo": "false",
            "k": "4",
            "tau": "0.25",
            "gradient_checkpointing": "1",
            "report_to": "tensorboard",
        },
    ).config()
    assert (
        cfg.weighted_dpo is False
        and cfg.search.k == 4
        and cfg.curation.tau == 0.25
        and cfg.gradient_checkpointing is True
    )
    assert cfg.dpo_settings().report_to == ("tensorboard",)
    for bad in ({"k": "abc"}, {"weighted_dpo": "maybe"}, {"tau": "x"}):
        with pytest.raises(ValueError, match="is not a valid"):
            SettingsResource(profile="smoke", overrides=bad).config()


def test_each_default_lives_in_its_stage_settings_type():
    """The run settings hold the stages' own settings types; their defaults are the default profile's."""
    from dataclasses import fields

    from src_assets.candidate_search import SearchConfig
    from src_assets.config import SRCConfig, setting_names
    from src_assets.judge import JudgeConfig
    from src_assets.preference import AggregationConfig, CurationConfig
    from src_assets.profiles import PROFILES

    default = PROFILES["default"]
    assert (default.search, default.aggregation, default.curation, default.judge) == (
        SearchConfig(),
        AggregationConfig(),
        CurationConfig(),
        JudgeConfig(),
    )
    names = {f.name for f in fields(SRCConfig)}
    assert not names & {"k", "beams", "tau", "select_by", "judge_template"}  # not copied: composed
    assert setting_names()["k"][:2] == ("search", "k") and setting_names()["judge_template"][:2] == (
        "judge",
        "template",
    )
    assert setting_names()["search_batch_size"][:2] == ("search", "batch_size")


def test_gpu_settings_are_typed_launchpad_fields():
    settings = SettingsResource(profile="smoke", device="cpu", dtype="float32", lora_r=8, gradient_accumulation_steps=2)
    cfg = settings.config()
    assert (cfg.device, cfg.dtype, cfg.lora_r, cfg.gradient_accumulation_steps) == ("cpu", "float32", 8, 2)
    assert cfg.sft_settings().runtime.torch_device().type == "cpu"
    with pytest.raises(Exception):
        SettingsResource(profile="smoke", lora_r="many")


@pytest.mark.parametrize(
    "setting, message",
    [
        ("k=1", "setting k: 1 is out of range; it must be in [2, 256]"),
        ("k=abc", "setting k: 'abc' is not a valid int"),
        ("tau=1.5", "setting tau: 1.5 is out of range; it must be in [0, 1]"),
        ("tau=", "setting tau: '' is not a valid float"),
        ("beta=-1", "setting beta: -1.0 is out of range; it must be > 0"),
        ("temperature=0", "setting temperature: 0.0 is out of range; it must be > 0"),
        ("dpo_batch_size=0", "setting dpo_batch_size: 0 is out of range; it must be >= 1"),
        ("weighted_dpo=maybe", "setting weighted_dpo: 'maybe' is not a valid bool"),
        ("nosuch=1", "unknown setting 'nosuch' (src-calibrate settings lists every setting)"),
        ("tua=0.2", "unknown setting 'tua'; did you mean 'tau'?"),
        ("dpo_batchsize=4", "unknown setting 'dpo_batchsize'; did you mean 'dpo_batch_size'"),
        ("sft.warmup_stepz=3", "unknown setting sft.warmup_stepz: SFTConfig has no field 'warmup_stepz'; did you mean"),
        ("tau", "--set takes NAME=VALUE, got 'tau'"),
        # NaN passes every comparison and inf every lower bound: both are refused for every float
        ("beta=nan", "setting beta: 'nan' is not a finite number"),
        ("sft_learning_rate=inf", "setting sft_learning_rate: 'inf' is not a finite number"),
        ("bt_tol=nan", "setting bt_tol: 'nan' is not a finite number"),
        ("dpo_learning_rate=-inf", "setting dpo_learning_rate: '-inf' is not a finite number"),
        ("bt_iters=0", "setting bt_iters: 0 is out of range; it must be >= 1"),
        ("bt_iters=-1", "setting bt_iters: -1 is out of range; it must be >= 1"),
        ("bt_tol=0", "setting bt_tol: 0.0 is out of range; it must be > 0"),
        ("judge_tie_margin=-5", "setting judge_tie_margin: -5.0 is out of range; it must be >= 0"),
        ("judge_template=foo", "setting judge_template: 'foo' is not one of ('compact', 'instruct')"),
        ("scoring=both", "setting scoring: 'both' is not one of ('pairwise', 'independent')"),
        ("base_answer_form=essay", "setting base_answer_form: 'essay' is not one of ('sentence', 'short')"),
        ("report_to=foo", "setting report_to: ['foo'] are not transformers integrations"),
        ("k=--5", "setting k: '--5' is not a valid int"),
        ("k=1000", "setting k: 1000 is out of range; it must be in [2, 256]"),
        ("n_sft=99999999999", "setting n_sft: 99999999999 is out of range; it must be in [0, 1000000]"),
        ("sft_epochs=1e9", "setting sft_epochs: 1000000000.0 is out of range; it must be in [0, 1000]"),
        ("seed=-1", "setting seed: -1 is out of range; it must be in [0, 4294967295]"),
        ("judge_epochs=0", "setting judge_epochs: 0 uses a pretrained judge as it is, and judge_model=tiny is"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_code_2(setting, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    code = main(["run", "--profile", "smoke", "--store", str(tmp_path / "store"), "--set", setting])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("src-calibrate: error: ") and message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "store").exists()  # refused before anything ran


def test_settings_lists_every_setting_in_sections_with_its_value_range_and_help(capsys):
    assert main(["settings", "--profile", "smoke", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["name"] for r in rows) == sorted(setting_names())  # each once
    by_name = {r["name"]: r for r in rows}
    assert by_name["tau"]["value"] == 0.0 and by_name["tau"]["allowed"] == "[0, 1]"  # the smoke profile's value
    assert (
        by_name["k"]["section"] == "2. Candidate search" and by_name["scoring"]["allowed"] == "pairwise | independent"
    )
    assert all(r["help"] and "``" not in r["help"] for r in rows)
    assert main(["settings"]) == 0
    text = capsys.readouterr().out
    assert "\n5. Curation\n  tau = 0.1  (float, [0, 1])\n      Pairs whose confidence weight is below this" in text


def test_the_judges_old_setting_names_are_read_as_the_new_ones_with_a_warning_line():
    with pytest.warns(RenamedSettingWarning, match="setting scorer_model is now called judge_model"):
        cfg = profile("smoke", scorer_model="verifier", **{"scorer.warmup_steps": "3", "scorer_batch_size": "8"})
    assert cfg.judge_model == "verifier" and cfg.judge_train_batch_size == 8
    assert json.loads(cfg.judge_args) == {"warmup_steps": 3}
    resource = SettingsResource(profile="smoke", overrides={"scorer_epochs": 2})  # the Launchpad's overrides
    with pytest.warns(RenamedSettingWarning):
        assert resource.config().judge_epochs == 2


def test_an_old_setting_name_on_the_command_line_prints_one_warning_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    code = main(["run", "--profile", "smoke", "--store", str(tmp_path / "store"), "--set", "scorer_epochs=-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2  # the value is then checked under the new name
    assert err[0] == (
        "src-calibrate: warning: setting scorer_epochs is now called judge_epochs; the old name is read as the new "
        "one until the next release"
    )
    assert err[1].startswith("src-calibrate: error: setting judge_epochs: -1.0 is out of range")


def test_every_command_line_option_has_help_and_says_its_default():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps no public list of subcommands
    commands = {**commands, "store check": commands["store"]._subparsers._group_actions[0].choices["check"]}
    for name, command in commands.items():
        if name == "store":
            continue
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
        text = command.format_help()
        assert "``" not in text, name
    run_help = commands["run"].format_help()
    assert "(default: 2)" in run_help and "(default: 0)" in run_help  # --iterations, --seed


@pytest.mark.parametrize("seed", ["-1", "x", "4294967296"])
def test_a_bad_seed_is_refused_as_the_command_line_is_read(seed, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--profile", "smoke", "--store", str(tmp_path / "store"), "--seed", seed])
    assert exit_.value.code == 2 and f"seed {seed!r} must be an integer in [0, 4294967295]" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_meaningful_zeros_are_kept():
    zeros = {"n_sft": "0", "judge_epochs": "0", "lora_r": "0", "judge_model": "someone/judge-instruct"}
    cfg = SettingsResource(profile="smoke", overrides=zeros).config()
    assert (cfg.n_sft, cfg.judge_epochs, cfg.lora_r) == (0, 0.0, 0)


def test_a_failed_error_check_fails_the_run_and_names_the_check(tmp_path, monkeypatch, capsys):
    """The smoke SFT cannot see; requiring that it does (an ERROR-level check) stops the run after the foundation."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    code = main(["run", "--profile", "smoke", "--store", str(tmp_path / "store"), "--set", "min_blank_image_drop=1.0"])
    err = capsys.readouterr().err
    assert code == 1
    assert "check sft_checkpoint.uses_its_image failed: " in err and "required_drop=1.0" in err


def test_a_failed_step_names_its_innermost_cause(tmp_path, monkeypatch, capsys):
    """A model directory without config.json: the line names the directory, not Dagster's wrapper."""
    (tmp_path / "empty_model").mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    code = main(
        [
            "run",
            "--profile",
            "smoke",
            "--store",
            str(tmp_path / "store"),
            "--set",
            f"policy_model={tmp_path / 'empty_model'}",
        ]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[-1]
    assert code == 1
    assert err.startswith("step base_policy_checkpoint failed: ") and "has no config.json" in err
    assert "Error occurred while executing" not in err
    # The steps skipped after the failure (Dagster's "Dependencies ... Not executing.") are for -v only.
    assert not [line for line in lines if "Not executing" in line]


def test_split_sizes_are_checked_before_anything_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    code = main(["run", "--profile", "smoke", "--store", str(tmp_path / "store"), "--set", "n_calibrate=8"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert err.startswith("step vqa_source failed: the source has 8 'calibrate' rows, but the first judge_prompts=8")
    assert not (tmp_path / "store" / "models" / "sft_checkpoint").exists()  # nothing was trained


def test_a_run_prints_one_line_per_step_and_v_shows_dagsters_events(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    store = str(tmp_path / "store")
    assert main(["run", "--profile", "smoke", "--iterations", "1", "--store", store, "--json"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) < 40, "\n".join(lines)  # fits on one screen, progress bars aside
    assert "DEBUG" not in err and "STEP_SUCCESS" not in err
    steps = [line.split()[0] for line in lines if line.startswith("  ") and " s" in line]
    assert {
        "sft_checkpoint",
        "start_policy",
        "candidate_pool.join_candidates",
        "policy_checkpoint",
        "iteration_eval",
    } <= set(steps)
    assert any(line.split()[0] == "preference_set" and "pairs_kept=" in line for line in lines)
    assert any(line.split()[0] == "vqa_source" and "rows_yours=0  rows_synthetic=96" in line for line in lines)
    assert "sft_checkpoint_uses_its_image" in steps and "sft_checkpoint_sft_checkpoint_uses_its_image" not in err
    # The smoke profile's wrong chosen answers warn, and the warning says why it only warns there.
    warned = [line for line in lines if "check preference_set.no_wrong_chosen_answer failed" in line]
    assert warned and all(
        "warns_only_because=require_correct_chosen=false, as in the smoke profile" in w for w in warned
    )
    assert main(["run", "--profile", "smoke", "--iterations", "1", "--store", store, "--json", "-v", "--fresh"]) == 0
    assert "STEP_SUCCESS" in capsys.readouterr().err


def test_a_full_disk_a_bad_current_pointer_and_a_bad_by_inputs_record_each_give_one_line(tmp_path, monkeypatch, capsys):
    """Each names the path and the cause in the run's last line (a by_inputs record: in a warning, and the step
    retrains), and a full disk leaves no half-written file."""
    import errno

    from fsspec.implementations.local import LocalFileSystem

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    store = tmp_path / "store"
    command = ["run", "--profile", "smoke", "--iterations", "1", "--store", str(store)]
    pipe_file = LocalFileSystem.pipe_file

    def disk_full_at_the_perception_corpus(self, path, *args, **kwargs):
        if "perception_corpus" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: naming no file
        return pipe_file(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "pipe_file", disk_full_at_the_perception_corpus)
    assert main(command) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"step perception_corpus failed: OSError: [Errno 28] No space left on device: "
        f"'{store}/assets/perception_corpus.parquet'"
    )
    assert not [p for p in store.rglob("*") if "perception_corpus" in p.name]  # no partial file, no temporary one
    monkeypatch.setattr(LocalFileSystem, "pipe_file", pipe_file)

    assert main(command) == 0
    (record,) = (store / "models" / "sft_checkpoint" / "by_inputs").glob("*.json")
    record.write_text("garbage{")
    assert main(command) == 0
    err = capsys.readouterr().err
    assert f"not reusing the model trained earlier from these inputs, training again: {record} is not valid JSON" in err

    (store / "models" / "policy_checkpoint" / "001" / "CURRENT").write_text("not json")
    assert main(command) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"src-calibrate: error: {store}/models/policy_checkpoint/001/CURRENT is not valid JSON (")


def test_an_s3_store_survives_its_server_stopping_mid_iteration_and_a_rerun_completes_two_sharded_iterations(
    tmp_path, monkeypatch
):
    """The store's server stops once iteration 1's candidate search has written a shard: the run fails naming the
    endpoint, with no traceback, and says when its lease lapses. Restarted with the same data, a rerun in a new
    process takes the lease over, reuses the SFT committed before the stop and completes both iterations, every
    key the loop writes (a shard step's bracketed one included) round-tripping through a real S3 server."""
    import subprocess
    import sys
    import time

    import boto3
    from moto.server import ThreadedMotoServer

    from src_assets.storage import Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("SRC_S3_ENDPOINT_URL", endpoint)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="restarted")
    uri = "s3://restarted/store"
    command = [sys.executable, "-m", "dagster_project.runs.cli", "run", "--profile", "smoke", "--iterations", "2"]
    command += ["--store", uri, "--set", "shards=2", "--set", "search_batch_size=16"]
    try:
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while run.poll() is None and time.monotonic() < deadline:
            listed = s3.list_objects_v2(Bucket="restarted", Prefix="store/runs/").get("Contents", [])
            if any("search_shard[" in o["Key"] for o in listed):
                break
            time.sleep(0.2)
        server.stop()
        out, err = run.communicate(timeout=300)
        assert run.returncode == 1, (out, err)
        assert "Traceback" not in err, err
        failed = [line for line in err.splitlines() if line.startswith("step ")]
        assert len(failed) == 1 and f'Could not connect to the endpoint URL: "{endpoint}/restarted/store/' in failed[0]
        assert (
            err.strip()
            .splitlines()[-1]
            .startswith(
                f"src-calibrate: the lease {uri}/leases/store_run.json could not be released (EndpointConnectionError"
            )
        )
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # same data, same port
        server.start()
        store = Store(uri)
        sft = store.current_model("models/sft_checkpoint")
        assert sft and store.current_model("models/policy_checkpoint/001") is None
        rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        assert store.current_model("models/sft_checkpoint") == sft  # committed before the stop, so reused
        for iteration in ("001", "002"):
            assert store.read_table(f"assets/preference_set/{iteration}.parquet").height > 0
            store.local_model_dir(store.current_model(f"models/policy_checkpoint/{iteration}"))  # manifest checked
        shards = {k.split("search_shard[")[1].split("]")[0] for k in store.list("runs") if "search_shard[" in k}
        assert shards == {"prompts_0_4", "prompts_4_8"}
    finally:
        server.stop()


def _s3_reader(endpoint: str) -> dict:
    """Credentials of a user of the local S3 server who may read and list, but not write."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint)
    iam.create_user(UserName="reader")
    only_reads = {"Effect": "Allow", "Action": ["s3:Get*", "s3:List*"], "Resource": "*"}
    iam.put_user_policy(
        UserName="reader",
        PolicyName="read-only",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [only_reads]}),
    )
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


STORE_CASES = [
    "a file",
    "an unknown scheme",
    "a read-only directory",
    "no S3 credentials",
    "refused S3 credentials",
    "read-only S3 credentials",
    "a missing bucket",
    "an S3 endpoint that does not answer",
]


@pytest.mark.parametrize("kind", STORE_CASES)
def test_a_store_that_cannot_be_used_is_one_line_naming_it_in_every_command(
    kind, s3_endpoint, tmp_path, monkeypatch, capsys
):
    """Each bad store or credential case, through run, evaluate and export: at most two lines on stderr, the last
    naming the cause, no traceback, and no secret."""
    from moto import settings as moto_settings

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SRC_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup off this machine
    uri, secrets = f"s3://src-test/{tmp_path.name}", []
    if kind == "a file":
        (tmp_path / "store").write_text("not a directory")
        uri, cause = str(tmp_path / "store"), f"the store {tmp_path / 'store'} is a file, not a directory"
    elif kind == "an unknown scheme":
        uri, cause = "foo://bucket/prefix", "cannot open the store 'foo://bucket/prefix' (Protocol not known: foo)"
    elif kind == "a read-only directory":
        if os.geteuid() == 0:
            pytest.skip("root writes to a read-only directory")
        (tmp_path / "ro").mkdir(mode=0o555)
        uri, cause = str(tmp_path / "ro" / "store"), f"cannot be written: {tmp_path / 'ro'} is not writable"
    elif kind == "no S3 credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        cause = "NoCredentialsError: Unable to locate credentials (credentials come from AWS_ACCESS_KEY_ID"
    elif kind == "refused S3 credentials":
        secrets = ["wrong-secret-9f3a7c"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets[0])
        monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks credentials
        cause = "PermissionError: Forbidden (credentials come from AWS_ACCESS_KEY_ID"
    elif kind == "read-only S3 credentials":
        reader = _s3_reader(s3_endpoint)
        secrets = [reader["AWS_SECRET_ACCESS_KEY"]]
        for name, value in reader.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
        cause = "PermissionError: Forbidden (credentials come from AWS_ACCESS_KEY_ID"
    elif kind == "a missing bucket":
        uri, cause = "s3://no-such-bucket/prefix", "its bucket 'no-such-bucket' does not exist"
    else:
        monkeypatch.setenv("SRC_S3_ENDPOINT_URL", "http://127.0.0.1:9")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the cause is the same after botocore's retries, 8 s later
        cause = 'EndpointConnectionError: Could not connect to the endpoint URL: "http://127.0.0.1:9/'
    commands = [
        ["run", "--profile", "smoke", "--iterations", "0", "--store", uri],
        ["evaluate", "--checkpoint", f"{uri}/models/policy_checkpoint/001", "--store", uri, "--n", "1"],
        ["export", "--iteration", "1", "--out", str(tmp_path / "out"), "--store", uri],
    ]
    for command in commands:
        assert main(command) == 1
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) <= 2 and cause in err[-1], (command, err)
        assert "Traceback" not in captured.err
        assert not [s for s in secrets if s in captured.err + captured.out]


def test_evaluate_names_what_is_wrong_with_a_checkpoint_and_takes_a_model_folder_as_its_current_version(
    tiny_dirs, tmp_path, monkeypatch, capsys
):
    from src_assets.storage import MANIFEST, Store

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    store = Store(str(tmp_path / "store"))
    version = store.put_model("models/sft_checkpoint", tiny_dirs[0])
    unfinished = store.put_model("models/unfinished", tiny_dirs[0])
    os.remove(f"{unfinished}/{MANIFEST}")
    cases = {
        "foo://bucket/models/x": "cannot open 'foo://bucket/models/x' (Protocol not known: foo)",
        f"{tmp_path}/store/models/x/versions/v1": f"model directory '{tmp_path}/store/models/x/versions/v1' does not exist",
        unfinished: f"{unfinished} has no {MANIFEST}: its upload never completed, so it is not used",
        f"{tmp_path}/store/models/unfinished": f"{unfinished} has no {MANIFEST}: its upload never completed",
    }
    for checkpoint, cause in cases.items():
        assert main(["evaluate", "--checkpoint", checkpoint, "--store", str(tmp_path / "store"), "--n", "1"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("src-calibrate: error: ") and cause in err[0], (checkpoint, err)
    folder = f"{tmp_path}/store/models/sft_checkpoint"
    assert main(["evaluate", "--checkpoint", folder, "--store", str(tmp_path / "store"), "--n", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2
    assert store.current_version(folder) == version
