"""One loader for the policy VLM and the judge: tiny local directories and real hub models alike.

Pointing the pipeline at a real model is a change of ``ref`` only, e.g.
``llava-hf/llava-1.5-7b-hf`` or ``Qwen/Qwen2-VL-2B-Instruct`` for the policy and
``Qwen/Qwen2.5-1.5B-Instruct`` for the judge. Remote code is never run and
only safetensors weights are read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
)

from .processors import load_processor

# owner/name, as the Hugging Face hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@dataclass(frozen=True)
class Runtime:
    """Where and how models run: every stage that loads a model (training, generation, judging, evaluation) uses it."""

    device: str = "auto"  # "auto": CUDA when available, else CPU; or any torch device string ("cuda:1", "cpu")
    dtype: str = "auto"  # "auto": bfloat16 on a GPU that supports it, else float32; or float32 / bfloat16 / float16
    attn_implementation: str = ""  # "" lets transformers choose; "sdpa", "flash_attention_2", "eager"
    image_min_pixels: int = 0  # > 0: the processor's smallest image area (Qwen-family dynamic resolution)
    image_max_pixels: int = 0  # > 0: the processor's largest image area; bounds image tokens per prompt

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            on_gpu = self.torch_device().type == "cuda"
            return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
        if self.dtype not in _DTYPES or self.dtype == "auto":
            raise ValueError(
                f"dtype must be 'auto' or one of {sorted(k for k in _DTYPES if k != 'auto')}, got {self.dtype!r}"
            )
        return _DTYPES[self.dtype]

    def model_kwargs(self) -> dict:
        kwargs = {"dtype": self.torch_dtype()}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs

    def processor_kwargs(self) -> dict:
        return {
            k: v for k, v in (("min_pixels", self.image_min_pixels), ("max_pixels", self.image_max_pixels)) if v > 0
        }


CPU_FLOAT32 = Runtime(device="cpu", dtype="float32")


class ModelLoadError(RuntimeError):
    """A model reference that cannot be loaded; the message names the reference and why."""


def validate_model_ref(ref: str) -> str:
    """Checks that ``ref`` is a model directory or a hub id, before anything is loaded."""
    if not isinstance(ref, str) or not ref.strip():
        raise ModelLoadError(
            f"model reference {ref!r} is empty; give a local model directory or a hub id like 'owner/name'"
        )
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model directory {str(path)!r} has no config.json; is it a Hugging Face model directory?"
            )
        return str(path)
    if ref.startswith(("/", ".", "~")) or ref.count("/") > 1:
        raise ModelLoadError(f"model directory {ref!r} does not exist")
    if not _HUB_ID.match(ref):
        raise ModelLoadError(f"model reference {ref!r} is neither an existing directory nor a hub id like 'owner/name'")
    return ref


class AutoProcessorOrImageOnly:
    """``AutoProcessor``, or without torchvision the image-only processor (see ``processors``)."""

    @staticmethod
    def from_pretrained(ref, trust_remote_code=False, **kwargs):
        return load_processor(ref, **kwargs)


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
    except SafetensorError as e:  # a truncated or corrupt weights file
        raise ModelLoadError(
            f"cannot load {loader.__name__} from {ref!r}: its safetensors weights are unreadable ({e})"
        ) from e
    except ImportError as e:  # a model or processor class that needs a package this machine lacks
        raise ModelLoadError(f"cannot load {loader.__name__} from {ref!r}: {str(e).strip().splitlines()[0]}") from e


def load_model_config(ref: str):
    """The model's config alone: validates a reference without loading weights."""
    return _from_pretrained(AutoConfig, validate_model_ref(ref))


def load_policy(ref: str, runtime: Runtime = CPU_FLOAT32) -> tuple[PreTrainedModel, object]:
    """The vision-language policy and its processor, on ``runtime``'s device in its dtype."""
    ref = validate_model_ref(ref)
    processor = _from_pretrained(AutoProcessorOrImageOnly, ref, **runtime.processor_kwargs())
    model = _from_pretrained(AutoModelForImageTextToText, ref, use_safetensors=True, **runtime.model_kwargs())
    return model.to(runtime.torch_device()), processor


def load_tokenizer(ref: str):
    """The judge's tokenizer alone, for building its training prompts without loading its weights."""
    return _from_pretrained(AutoTokenizer, validate_model_ref(ref))


def load_judge_model(ref: str, runtime: Runtime = CPU_FLOAT32) -> tuple[PreTrainedModel, object]:
    """The text-only judge LM and its tokenizer, on ``runtime``'s device in its dtype."""
    ref = validate_model_ref(ref)
    tokenizer = _from_pretrained(AutoTokenizer, ref)
    model = _from_pretrained(AutoModelForCausalLM, ref, use_safetensors=True, **runtime.model_kwargs())
    return model.to(runtime.torch_device()), tokenizer
