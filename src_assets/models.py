"""One loader for the policy VLM and the R-Scorer: tiny local directories and real hub models alike.

Pointing the pipeline at a real model is a change of ``ref`` only, e.g.
``llava-hf/llava-1.5-7b-hf`` or ``Qwen/Qwen2-VL-2B-Instruct`` for the policy and
``Qwen/Qwen2.5-1.5B-Instruct`` for the R-Scorer. Remote code is never run and
only safetensors weights are read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
)

# owner/name, as the Hugging Face hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelLoadError(RuntimeError):
    """A model reference that cannot be loaded; the message names the reference and why."""


def validate_model_ref(ref: str) -> str:
    """Checks that ``ref`` is a model directory or a hub id, before anything is loaded."""
    if not isinstance(ref, str) or not ref.strip():
        raise ModelLoadError(f"model reference {ref!r} is empty; give a local model directory or a hub id like 'owner/name'")
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {str(path)!r} has no config.json; is it a Hugging Face model directory?")
        return str(path)
    if ref.startswith(("/", ".", "~")) or ref.count("/") > 1:
        raise ModelLoadError(f"model directory {ref!r} does not exist")
    if not _HUB_ID.match(ref):
        raise ModelLoadError(f"model reference {ref!r} is neither an existing directory nor a hub id like 'owner/name'")
    return ref


def _from_pretrained(loader, ref: str, **kwargs):
    try:
        return loader.from_pretrained(ref, trust_remote_code=False, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if offline and not Path(ref).is_dir():
            why = (
                "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; "
                f"download it first (`hf download {ref}`) or give a local directory"
            )
        else:
            why = str(e).splitlines()[0]
        raise ModelLoadError(f"cannot load {loader.__name__} from {ref!r}: {why}") from e
    except ValueError as e:  # e.g. a checkpoint that only ships .bin weights while safetensors are required
        raise ModelLoadError(f"cannot load {loader.__name__} from {ref!r}: {e}") from e


def load_model_config(ref: str):
    """The model's config alone: validates a reference without loading weights."""
    return _from_pretrained(AutoConfig, validate_model_ref(ref))


def load_policy(ref: str, dtype: str = "float32") -> tuple[PreTrainedModel, object]:
    """The vision-language policy and its processor."""
    ref = validate_model_ref(ref)
    processor = _from_pretrained(AutoProcessor, ref)
    model = _from_pretrained(AutoModelForImageTextToText, ref, use_safetensors=True, dtype=_DTYPES[dtype])
    return model, processor


def load_scorer(ref: str, dtype: str = "float32") -> tuple[PreTrainedModel, object]:
    """The text-only judge LM (R-Scorer) and its tokenizer."""
    ref = validate_model_ref(ref)
    tokenizer = _from_pretrained(AutoTokenizer, ref)
    model = _from_pretrained(AutoModelForCausalLM, ref, use_safetensors=True, dtype=_DTYPES[dtype])
    return model, tokenizer
