import io
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from src_assets.models import ModelLoadError, load_judge_model, load_model_config, load_policy, validate_model_ref
from src_assets.scenes import generate_examples
from src_assets.tiny_models import VERDICT_TOKENS


def test_tiny_vlm_round_trips_and_generates(tiny_dirs, tmp_path):
    vlm_dir, _ = tiny_dirs
    model, processor = load_policy(str(vlm_dir))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    model.save_pretrained(tmp_path / "again")
    before, after = load_file(vlm_dir / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    row = generate_examples(1, seed=0, split="eval")[0].row()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(io.BytesIO(row["image"]))], text=[prompt], return_tensors="pt")
    # One <image> token per grid cell, expanded by the processor.
    assert (inputs["input_ids"] == model.config.image_token_index).sum() == 9
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(processor.batch_decode(out, skip_special_tokens=True)[0], str)


def test_tokenizer_covers_gold_responses(tiny_dirs):
    _, processor = load_policy(str(tiny_dirs[0]))
    tok = processor.tokenizer
    for e in generate_examples(20, seed=3, split="sft"):
        ids = tok(e.row()["response"])["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids).replace(" :", ":") == e.row()["response"].replace("\n", " ")


def test_tiny_judge_round_trips_with_verdict_tokens(tiny_dirs):
    model, tok = load_judge_model(str(tiny_dirs[1]))
    ids = tok.convert_tokens_to_ids(list(VERDICT_TOKENS))
    assert tok.unk_token_id not in ids and len(set(ids)) == 3
    assert tok.convert_tokens_to_ids("a") not in ids  # the article stays distinct from verdict "A"
    logits = model(
        **tok(["question : how many red shapes are there ? verdict :"], return_tensors="pt"), logits_to_keep=1
    ).logits
    assert logits.shape == (1, 1, len(tok))


@pytest.mark.parametrize("ref", ["llava-hf/llava-1.5-7b-hf", "Qwen/Qwen2-VL-2B-Instruct"])
def test_real_hub_id_reaches_from_pretrained_and_fails_clearly_offline(ref, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert validate_model_ref(ref) == ref
    with pytest.raises(ModelLoadError, match=ref.replace(".", r"\.")) as info:
        load_policy(ref)
    assert "HF_HUB_OFFLINE=1" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)  # raised by from_pretrained itself
    with pytest.raises(ModelLoadError, match="Qwen/Qwen2.5-1.5B-Instruct"):
        load_model_config("Qwen/Qwen2.5-1.5B-Instruct")


@pytest.mark.parametrize(
    "ref, message",
    [
        ("", "is empty"),
        ("/no/such/model", "does not exist"),
        ("./relative/missing", "does not exist"),
        ("a/b/c", "does not exist"),
        ("not a model id!", "neither an existing directory nor a hub id"),
    ],
)
def test_bad_references_fail_before_loading(ref, message):
    with pytest.raises(ModelLoadError, match=message):
        validate_model_ref(ref)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        validate_model_ref(str(tmp_path))


def test_pickle_weights_are_refused(tiny_dirs, tmp_path):
    shutil.copytree(tiny_dirs[1], tmp_path, dirs_exist_ok=True)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_judge_model(str(tmp_path))


def test_our_kernels_package_is_not_taken_for_the_hub_kernels_library():
    from transformers.utils.import_utils import is_kernels_available

    assert not is_kernels_available()


def test_a_truncated_weights_file_is_a_load_error_naming_the_directory(tiny_dirs, tmp_path):
    shutil.copytree(tiny_dirs[1], tmp_path, dirs_exist_ok=True)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=f"from '{tmp_path}'.*safetensors weights are unreadable"):
        load_judge_model(str(tmp_path))
