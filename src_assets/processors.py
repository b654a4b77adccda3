"""Loading and saving a VLM's processor, with or without torchvision.

Qwen2-VL and Qwen2.5-VL processors carry a video processor, and transformers
builds video processors only with torchvision installed. SRC feeds images
only, so where torchvision is missing (PyPI's torchvision does not import
beside the CPU build of torch this project tests with) the processor is built
from its image processor and tokenizer, with no video processor, and saved as
those two parts plus a ``processor_config.json`` naming the processor class.
With torchvision installed (any GPU machine), nothing here changes what
``AutoProcessor`` does, and the directories saved either way load either way.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import transformers
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer


@cache
def image_only(processor_class: type) -> type:
    """``processor_class`` that accepts ``video_processor=None``."""

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, save_directory, **kwargs):
            # The base class's would read the missing video processor; trainers (TRL's checkpoints) call this.
            if self.video_processor is not None:
                return super().save_pretrained(save_directory, **kwargs)
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            save_processor(self, save_directory)
            return []

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly


def _processor_class_name(ref: str) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = Path(ref) / name
        if path.is_file():
            found = json.loads(path.read_text()).get("processor_class")
            if found:
                return found
    return None


def _needs_torchvision(error: ImportError) -> bool:
    return "torchvision" in str(error).lower()


def load_processor(ref: str, **kwargs):
    """``AutoProcessor.from_pretrained(ref)``; without torchvision, the image-only processor of the same class."""
    try:
        return AutoProcessor.from_pretrained(ref, trust_remote_code=False, **kwargs)
    except ImportError as e:
        name = _processor_class_name(ref) if Path(ref).is_dir() else None
        if not _needs_torchvision(e) or name is None or not hasattr(transformers, name):
            raise
        cls = image_only(getattr(transformers, name))
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
        image_processor = AutoImageProcessor.from_pretrained(ref, trust_remote_code=False, **kwargs)
        saved = (
            json.loads((Path(ref) / "processor_config.json").read_text())
            if (Path(ref) / "processor_config.json").is_file()
            else {}
        )
        extra = {k: v for k, v in saved.items() if k in _init_parameters(cls)}
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=tokenizer.chat_template,
            **extra,
        )


def _init_parameters(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {
        "self",
        "image_processor",
        "tokenizer",
        "video_processor",
        "chat_template",
        "kwargs",
    }


def save_processor(processor, out_dir: str | Path) -> None:
    """``processor.save_pretrained``; an image-only processor is saved as its parts and its class name."""
    if getattr(processor, "video_processor", True) is not None:
        processor.save_pretrained(out_dir)
        return
    processor.image_processor.save_pretrained(out_dir)
    processor.tokenizer.chat_template = processor.chat_template
    processor.tokenizer.save_pretrained(out_dir)
    config = {k: getattr(processor, k) for k in _init_parameters(type(processor)) if hasattr(processor, k)}
    config["processor_class"] = type(processor).__name__
    (Path(out_dir) / "processor_config.json").write_text(json.dumps(config, indent=2, default=str))


def save_model_dir(model, processing_class, out_dir: str | Path) -> Path:
    """A model directory as ``from_pretrained`` reads it: safetensors weights, and the tokenizer or processor."""
    model.save_pretrained(out_dir, safe_serialization=True)
    save_processor(processing_class, out_dir)
    return Path(out_dir)
