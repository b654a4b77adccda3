"""Artefacts in the ecosystem's shape: trackers' event files where the docs say, the trainers' own configs set
through --set, LoRA adapters kept, model cards, a preference set that plain TRL trains on, evaluation on the
user's own rows."""

import json
from pathlib import Path

import polars as pl
import pytest

from dagster_project.runs.cli import main
from src_assets.source_data import synthetic_source
from src_assets.storage import Store

SETTINGS = [
    "report_to=tensorboard",
    "sft.lr_scheduler_type=constant",
    "judge.warmup_steps=0.1",
    "dpo.optim=adamw_torch",
    "lora_r=4",
    "lora.lora_alpha=32",
    "keep_adapter=true",
]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run (an iteration) with a tracker, trainer fields set per stage, and LoRA adapters kept."""
    import os

    root = tmp_path_factory.mktemp("artefacts")
    os.environ["DAGSTER_HOME"] = str(root / "dagster_home")
    args = ["run", "--profile", "smoke", "--iterations", "1", "--store", str(root / "store"), "--json"]
    for setting in SETTINGS:
        args += ["--set", setting]
    assert main(args) == 0
    return root


def _events(folder: Path) -> bytes:
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {folder}"
    return b"".join(f.read_bytes() for f in files)


def test_trackers_write_under_logs_beside_the_store(smoke_run):
    logs = smoke_run / "logs"
    for training in ("base_policy_checkpoint", "sft_checkpoint", "judge_checkpoint", "policy_checkpoint/001"):
        assert b"train/train_loss" in _events(logs / training), training
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = {}
    for run in sorted((logs / "pipeline").glob("events.out.tfevents.*")):
        events = EventAccumulator(str(run))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            steps.setdefault(tag, set()).update(e.step for e in events.Scalars(tag))
    assert steps["pipeline/accuracy"] == {0, 1} and steps["pipeline/consistency"] == {0, 1}
    assert steps["pipeline/pairs_kept"] == {1} and steps["pipeline/mean_weight"] == {1}


def test_each_trainer_received_its_own_fields(smoke_run):
    # TensorBoard's callback records the trainer's arguments as text: what the trainer ran with.
    assert b'"lr_scheduler_type": "constant"' in _events(smoke_run / "logs" / "sft_checkpoint")
    assert b'"warmup_steps": 0.1' in _events(smoke_run / "logs" / "judge_checkpoint")
    assert b'"optim": "adamw_torch"' in _events(smoke_run / "logs" / "policy_checkpoint" / "001")
    assert b'"optim": "adamw_torch"' not in _events(smoke_run / "logs" / "sft_checkpoint")
    store = Store(str(smoke_run / "store"))
    policy = Path(store.current_model("models/policy_checkpoint/001"))
    adapter = json.loads((policy / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 32


def test_every_saved_policy_has_a_model_card_with_its_lineage_and_metrics(smoke_run):
    store = Store(str(smoke_run / "store"))
    sft = store.current_model("models/sft_checkpoint")
    policy = store.current_model("models/policy_checkpoint/001")
    card = (Path(policy) / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\nbase_model: tiny llava")
    assert f"- trained from: `{sft}`" in card and f"- iteration 1: `{policy}`" in card
    assert "| 0 | 0.000 |" in card and "| 1 | 0.000 |" in card  # the lineage's held-out metrics, this one included
    assert '"lora_args": "{\\"lora_alpha\\": 32}"' in card and "- pairs: " in card
    assert "| 0 | 0.000 |" in (Path(sft) / "README.md").read_text()
    store.local_model_dir(policy)  # the card is outside the manifest: the version still checks out


def test_plain_trl_dpo_trains_on_an_exported_preference_set(smoke_run, capsys):
    from datasets import load_from_disk
    from trl import DPOConfig, DPOTrainer

    from src_assets.models import load_policy

    out = smoke_run / "export"
    assert main(["export", "--store", str(smoke_run / "store"), "--iteration", "1", "--out", str(out)]) == 0
    assert main(["export", "--store", str(smoke_run / "store"), "--iteration", "1", "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    dataset = load_from_disk(str(out))
    assert set(dataset.column_names) == {"prompt_id", "prompt", "chosen", "rejected", "images", "weight"}
    assert type(dataset.features["images"].feature).__name__ == "Image"
    kept = Store(str(smoke_run / "store")).read_table("assets/preference_set/001.parquet").filter(pl.col("kept"))
    assert dataset["weight"] == kept["weight"].to_list() and dataset.num_rows == kept.height

    policy = Store(str(smoke_run / "store")).current_model("models/policy_checkpoint/001")
    model, processor = load_policy(policy)
    reference, _ = load_policy(policy)
    # The call docs/your-model.md gives: TRL's default bf16=True stops a CPU run ("Your setup doesn't support
    # bf16/gpu"), so precision and device follow the machine.
    import torch

    gpu = torch.cuda.is_available()
    args = DPOConfig(
        output_dir=str(smoke_run / "dpo"),
        max_steps=1,
        per_device_train_batch_size=2,
        use_cpu=not gpu,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        report_to=[],
        save_strategy="no",
    )
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset, processing_class=processor)
    result = trainer.train()
    assert result.global_step == 1 and result.training_loss == pytest.approx(0.6931, abs=1e-3)  # log 2 at the start


def test_evaluate_scores_a_checkpoint_on_the_users_own_rows(smoke_run, tmp_path, capsys):
    rows = synthetic_source(seed=31, n_sft=0, n_calibrate=0, n_eval=6)
    mine = rows.drop("scene", "question_spec", "split").rename({"question": "prompt"})  # no verifier, no split
    mine.write_parquet(tmp_path / "mine.parquet")
    store = Store(str(smoke_run / "store"))
    policy, sft = store.current_model("models/policy_checkpoint/001"), store.current_model("models/sft_checkpoint")
    args = ["evaluate", "--checkpoint", policy, "--data", str(tmp_path / "mine.parquet"), "--json"]
    args += ["--set", "source_columns=question:prompt", "--set", "split_fractions=eval:1"]
    assert main([*args, "--against", sft, "--judge", store.current_model("models/judge_checkpoint")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["n"] == 6 and row["split"] == "eval"
    assert isinstance(row["accuracy"], float) and row["consistency"] is None  # from the answer column alone
    assert 0.0 <= row["judge_win_rate"] <= 1.0
    assert main(args[:-2]) == 2  # no split column, no split_fractions
    assert "mine.parquet: has no 'split' column" in capsys.readouterr().err
    assert main([*args, "--split", "calibrate"]) == 2
    assert "has no rows with split 'calibrate'" in capsys.readouterr().err
    # The verifier judges from scenes, which these rows lack: refused in one line, not a win rate of nan.
    assert main([*args, "--against", sft, "--judge", "verifier"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the verifier judges each prompt from its scene, and 6 of the 6 'eval' rows" in err[0]


def test_trl_checkpoint_saving_works_with_the_image_only_qwen_processor(tmp_path):
    from src_assets.models import load_policy
    from src_assets.rationale_sft import build_rationale_sft_set, train_rationale_sft
    from src_assets.tiny_models import TinySpec, build_tiny_policy
    from src_assets.training import TrainSettings

    spec = TinySpec(hidden_size=32, intermediate_size=64, num_layers=1, vision_hidden_size=32, vision_layers=1)
    policy = build_tiny_policy(tmp_path / "policy", "qwen2_vl", spec)
    rows = build_rationale_sft_set(synthetic_source(seed=3, n_sft=8, n_calibrate=0, n_eval=0))
    checkpoints = tmp_path / "checkpoints"
    user = {"output_dir": str(checkpoints), "save_strategy": "steps", "save_steps": 1, "max_steps": 2}
    settings = TrainSettings(batch_size=4, trainer_args=tuple(user.items()))
    train_rationale_sft(str(policy), rows, str(tmp_path / "out"), settings)
    saved = sorted(p.name for p in checkpoints.glob("checkpoint-*"))
    assert saved == ["checkpoint-1", "checkpoint-2"]
    load_policy(str(checkpoints / "checkpoint-2"))  # TRL's own checkpoint loads as a policy
