"""Real VLM architectures through the whole loop on the CPU: tiny random-weight checkpoints of LLaVA, Qwen2-VL,
Qwen2.5-VL and Idefics3 (built here, no download), each with a byte-level BPE Qwen2 judge, full fine-tuning and
LoRA, passed as ``--set policy_model=DIR --set judge_model=DIR2`` exactly as a user passes their own models.
And a run on the user's own data: Parquet rows with no synthetic scene and a table of judgements."""

import json

import polars as pl
import pytest
from safetensors import safe_open
from transformers import AutoConfig

from dagster_project.runs.cli import main
from src_assets.source_data import synthetic_source
from src_assets.storage import Store
from src_assets.tiny_models import POLICY_ARCHITECTURES, TinySpec, build_tiny_judge, build_tiny_policy

SPEC = TinySpec(hidden_size=32, intermediate_size=64, num_layers=1, vision_hidden_size=32, vision_layers=1)
MODEL_CLASS = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
}


@pytest.fixture(scope="module")
def bpe_judge(tmp_path_factory):
    return build_tiny_judge(tmp_path_factory.mktemp("judge"), "qwen2", SPEC)


def _run(tmp_path, monkeypatch, capsys, *settings) -> tuple[int, list[dict], str]:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    args = ["run", "--profile", "smoke", "--iterations", "1", "--store", str(tmp_path / "store"), "--json"]
    for setting in settings:
        args += ["--set", setting]
    code = main(args)
    out = capsys.readouterr()
    return code, json.loads(out.out) if code == 0 else [], out.err[-3000:]


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
@pytest.mark.parametrize("architecture", POLICY_ARCHITECTURES)
def test_each_architecture_runs_the_smoke_loop(architecture, lora_r, bpe_judge, tmp_path, monkeypatch, capsys):
    policy = build_tiny_policy(tmp_path / "policy", architecture, SPEC)
    # Three DPO epochs: with a single pair, one step would fall inside the learning-rate warmup (lr 0 at step 0).
    # A random-weight model seldom ends a response, so a wider and longer search than the smoke profile's gives
    # every prompt several finished candidates, whatever the random streams.
    code, rows, err = _run(
        tmp_path,
        monkeypatch,
        capsys,
        f"policy_model={policy}",
        f"judge_model={bpe_judge}",
        f"lora_r={lora_r}",
        "dpo_epochs=3",
        "beams=4",
        "samples_per_beam=4",
        "max_sentences=12",
    )
    assert code == 0, err
    assert rows[1]["pairs_kept"] > 0
    store = Store(str(tmp_path / "store"))
    trained = store.local_model_dir(rows[1]["checkpoint"])
    assert "/policy_checkpoint/001/" in rows[1]["checkpoint"]
    assert AutoConfig.from_pretrained(trained).architectures == [MODEL_CLASS[architecture]]
    # DPO trained it: weights differ from the SFT checkpoint it started from (LoRA merged into plain weights).
    sft = store.local_model_dir(rows[0]["checkpoint"])
    with safe_open(f"{trained}/model.safetensors", "pt") as a, safe_open(f"{sft}/model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert any(not a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys())
        assert all(a.get_tensor(k).dtype == b.get_tensor(k).dtype for k in a.keys())


def _without_scenes(df: pl.DataFrame) -> pl.DataFrame:
    """Synthetic rows as a user's own data looks: no scene, no question spec, question kind 'open'."""
    return df.drop("scene", "question_spec").with_columns(pl.lit("open").alias("kind"))


def _store_with_users_rows(tmp_path) -> tuple[Store, pl.DataFrame]:
    """A store whose source is 96 rows as a user's own data looks (no scenes), in one Parquet file."""
    store = Store(str(tmp_path / "store"))
    rows = _without_scenes(synthetic_source(seed=9, n_sft=60, n_calibrate=16, n_eval=20))
    store.write_table("source/mine.parquet", rows)
    return store, rows


def test_a_run_on_the_users_own_data_reports_real_accuracy(bpe_judge, tmp_path, monkeypatch, capsys):
    store, rows = _store_with_users_rows(tmp_path)
    judged = rows.filter(pl.col("split") == "calibrate").select(
        "question", "answer", "reference", pl.col("response").alias("response_a")
    )
    judged = judged.with_columns(
        pl.lit("I cannot tell. Answer: none").alias("response_b"), pl.lit("A").alias("verdict")
    )
    store.write_table("judgements/labelled.parquet", judged)
    policy = build_tiny_policy(tmp_path / "policy", "qwen2_vl", SPEC)
    code, out, err = _run(
        tmp_path,
        monkeypatch,
        capsys,
        "n_sft=0",
        "n_calibrate=0",
        "n_eval=0",
        f"policy_model={policy}",
        f"judge_model={bpe_judge}",
    )
    assert code == 0, err
    for row in out:
        assert isinstance(row["accuracy"], float)  # from the answer column, not NaN or missing
        assert row["factuality"] is None and row["consistency"] is None  # no verifier for these rows
    meta = (
        store.read_json("models/judge_checkpoint/CURRENT") if store.exists("models/judge_checkpoint/CURRENT") else None
    )
    assert meta is not None  # the judge was trained, on the user's judgements alone


def test_a_pretrained_judge_used_zero_shot_judges_the_users_rows(bpe_judge, tmp_path, monkeypatch, capsys):
    """Rows without scenes and no judgement table: a local instruction-tuned judge (Qwen2 architecture, with a
    chat template) used as it is (judge_epochs=0) judges the pairs; no judge is trained."""
    store, _ = _store_with_users_rows(tmp_path)
    code, out, err = _run(
        tmp_path,
        monkeypatch,
        capsys,
        f"judge_model={bpe_judge}",
        "judge_epochs=0",
        "judge_template=instruct",
    )
    assert code == 0, err
    assert [row["iteration"] for row in out] == [0, 1] and out[1]["pairs_kept"] is not None
    assert not store.exists("models/judge_checkpoint/CURRENT")  # used as it is, never trained


def test_the_verifier_as_judge_of_rows_without_scenes_is_refused_before_anything_trains(tmp_path, monkeypatch, capsys):
    store, _ = _store_with_users_rows(tmp_path)
    code, _, err = _run(tmp_path, monkeypatch, capsys, "judge_model=verifier")  # your rows alone, by default
    assert code == 1
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(
            "step vqa_source failed: the verifier judges each prompt from its scene, and 16 of the 16 "
            "'calibrate' rows have none (e.g. id "
        )
    )
    assert not store.exists("models/sft_checkpoint/CURRENT")


@pytest.mark.parametrize("architecture", POLICY_ARCHITECTURES)
def test_candidate_search_continues_each_prompt_as_re_encoding_would(architecture, tmp_path):
    """Where the model allows a prompt cache (positions from the attention mask), continuing it gives the same
    greedy tokens and log-probs as re-encoding; Qwen's multimodal positions re-encode instead."""
    import torch

    from src_assets.candidate_search import _generate, _Prompts, reuses_prompt_cache, sentence_stop_ids
    from src_assets.generation import collate_prompts, prompt_inputs
    from src_assets.models import load_policy

    model, processor = load_policy(str(build_tiny_policy(tmp_path / "policy", architecture, SPEC)))
    assert reuses_prompt_cache(model) == (architecture in ("llava", "idefics3"))
    rows = synthetic_source(seed=8, n_sft=0, n_calibrate=3, n_eval=0)
    inputs = [prompt_inputs(processor, q, i) for q, i in zip(rows["question"], rows["image"])]
    tok = processor.tokenizer
    pad = tok.pad_token_id
    words = tok(" there is a red circle", add_special_tokens=False)["input_ids"]
    index, extra = [0, 1, 2, 1], [(), tuple(words), tuple(words[:2]), ()]
    batch, cache = _Prompts(model, inputs, pad).batch(index, extra)
    stop = sentence_stop_ids(tok, ".")
    continued = _generate(model, batch, pad, stop, 8, False, 1.0, cache)
    fresh = _generate(model, collate_prompts([inputs[i] for i in index], extra, pad), pad, stop, 8, False, 1.0)
    assert continued[0] == fresh[0]
    torch.testing.assert_close(torch.tensor(continued[1]), torch.tensor(fresh[1]), atol=1e-4, rtol=1e-5)
