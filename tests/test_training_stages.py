"""Rationale SFT (full and LoRA) and weighted DPO training, end to end on the smallest models."""

import os

import polars as pl

from src_assets.models import load_policy
from src_assets.preference import PREFERENCE_SCHEMA
from src_assets.rationale_sft import build_rationale_sft_set, train_rationale_sft
from src_assets.scenes import Question, Scene, gold_response
from src_assets.source_data import synthetic_source
from src_assets.training import TrainSettings
from src_assets.weighted_dpo import train_gold_bound, train_weighted_dpo


def test_lora_sft_saves_a_merged_plain_checkpoint(tiny_dirs, tmp_path):
    sft = build_rationale_sft_set(synthetic_source(seed=0, n_sft=16, n_calibrate=0, n_eval=0))
    result = train_rationale_sft(str(tiny_dirs[0]), sft, str(tmp_path), TrainSettings(epochs=1, batch_size=8, lora_r=4))
    assert result["steps"] == 2
    assert not any(name.startswith("adapter") for name in os.listdir(tmp_path))
    model, _ = load_policy(str(tmp_path))
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def _preferences(n=6):
    src = synthetic_source(seed=5, n_sft=0, n_calibrate=n, n_eval=0)
    rows = []
    for i, r in enumerate(src.iter_rows(named=True)):
        gold = gold_response(Scene.from_json(r["scene"]), Question.from_json(r["question_spec"]))
        rows.append(
            {
                "prompt_id": r["id"],
                "question": r["question"],
                "image": r["image"],
                "gold_answer": r["answer"],
                "gold_response": gold,
                "chosen": gold,
                "rejected": "there is a red circle at the top left.\nAnswer: no",
                "chosen_answer": r["answer"],
                "rejected_answer": "no",
                "weight": 0.5 + 0.1 * i,
                "kept": i != 0,
                "drop_reason": None if i else "weight 0.000 below tau 0.1",
            }
        )
    return pl.DataFrame(rows, schema=PREFERENCE_SCHEMA)


def test_weighted_dpo_trains_on_kept_pairs_only(trained_tiny_vlm, tmp_path):
    prefs = _preferences()
    result = train_weighted_dpo(str(trained_tiny_vlm), prefs, str(tmp_path), TrainSettings(epochs=1, batch_size=5))
    assert result["pairs"] == 5 and result["steps"] == 1
    load_policy(str(tmp_path))


def test_the_gold_data_bound_trains_on_the_kept_prompts_gold_responses_for_the_same_steps(trained_tiny_vlm, tmp_path):
    import pytest

    prefs = _preferences()
    settings = TrainSettings(epochs=2, batch_size=5, learning_rate=1e-3)
    dpo = train_weighted_dpo(str(trained_tiny_vlm), prefs, str(tmp_path / "dpo"), settings)
    gold = train_gold_bound(str(trained_tiny_vlm), prefs, str(tmp_path / "gold"), settings)
    assert (gold["pairs"], gold["steps"]) == (dpo["pairs"], dpo["steps"]) == (5, 2)
    before, _ = load_policy(str(trained_tiny_vlm))
    after, _ = load_policy(str(tmp_path / "gold"))
    assert any((a != b).any() for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    unknown = prefs.with_columns(
        pl.when(pl.col("prompt_id") == prefs["prompt_id"][3])
        .then(None)
        .otherwise(pl.col("gold_response"))
        .alias("gold_response")
    )
    with pytest.raises(ValueError, match=f"prompt '{prefs['prompt_id'][3]}' has none"):
        train_gold_bound(str(trained_tiny_vlm), unknown, str(tmp_path / "none"), settings)


def test_no_kept_pair_is_a_clear_error(trained_tiny_vlm, tmp_path):
    import pytest

    with pytest.raises(ValueError, match="keeps no pair"):
        train_weighted_dpo(
            str(trained_tiny_vlm),
            _preferences().with_columns(pl.lit(False).alias("kept")),
            str(tmp_path),
            TrainSettings(epochs=1),
        )


def test_a_bfloat16_runtime_loads_trains_and_saves_in_bfloat16(tiny_dirs, tmp_path):
    """The runtime's dtype is the training dtype: SFT in bf16 (CPU autocast here) saves a bf16 checkpoint, and
    generation loads it in bf16 on the runtime's device."""
    import torch
    from safetensors import safe_open

    from src_assets.generation import generate_responses
    from src_assets.models import Runtime

    runtime = Runtime(device="cpu", dtype="bfloat16")
    sft = build_rationale_sft_set(synthetic_source(seed=0, n_sft=8, n_calibrate=0, n_eval=0))
    train_rationale_sft(str(tiny_dirs[0]), sft, str(tmp_path), TrainSettings(epochs=1, batch_size=8, runtime=runtime))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model, processor = load_policy(str(tmp_path), runtime)
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert len(generate_responses(model, processor, sft["question"].to_list()[:2], sft["image"].to_list()[:2], 4)) == 2


def test_auto_runtime_is_float32_on_a_machine_without_cuda():
    import pytest
    import torch

    from src_assets.models import Runtime

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert Runtime().torch_device().type == "cpu" and Runtime().torch_dtype() == torch.float32
    with pytest.raises(ValueError, match="dtype must be"):
        Runtime(dtype="int8").torch_dtype()
    # float16 trains as mixed precision over float32 weights; bfloat16 trains bfloat16 weights.
    assert TrainSettings(runtime=Runtime(dtype="float16")).weights_runtime().torch_dtype() == torch.float32
    assert TrainSettings(runtime=Runtime(dtype="bfloat16")).weights_runtime().torch_dtype() == torch.bfloat16


def test_a_training_that_diverges_commits_nothing_and_names_the_setting(tiny_dirs, tmp_path):
    import pytest

    from src_assets.training import DivergedTraining

    sft = build_rationale_sft_set(synthetic_source(0, 16, 2, 2))
    # A finite but absurd learning rate: the first update overflows the weights, the next loss is not finite.
    with pytest.raises(
        DivergedTraining, match=r"rationale SFT: training diverged .* nothing was saved\. Lower sft_learning_rate"
    ):
        train_rationale_sft(
            str(tiny_dirs[0]), sft, str(tmp_path / "out"), TrainSettings(epochs=2, learning_rate=1e30, batch_size=8)
        )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_training_whose_loss_is_past_the_bound_commits_nothing_and_names_the_stage(tiny_dirs, tmp_path):
    """Starting weights that are finite but broken (an output layer scaled by 1e12, as a corrupted checkpoint may
    be) train to an absurd, finite loss: refused, naming the stage, like a non-finite one."""
    import shutil

    import pytest
    from safetensors.torch import load_file, save_file

    from src_assets.training import MAX_TRAIN_LOSS, DivergedTraining

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs[0], broken)
    weights = load_file(broken / "model.safetensors")
    head = next(name for name in weights if "lm_head" in name)
    weights[head] = weights[head] * 1e12
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    sft = build_rationale_sft_set(synthetic_source(0, 16, 2, 2))
    with pytest.raises(
        DivergedTraining, match=rf"rationale SFT: training diverged \(train loss .* is past {MAX_TRAIN_LOSS:g}"
    ):
        train_rationale_sft(
            str(broken), sft, str(tmp_path / "out"), TrainSettings(epochs=1, learning_rate=1e-6, batch_size=8)
        )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
