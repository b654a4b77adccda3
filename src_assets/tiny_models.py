"""Tiny models built locally from real ``transformers`` classes.

The embedded default needs a VLM and an R-Scorer that exist without a
download. These are a LLaVA-architecture VLM (CLIP vision tower, projector,
Llama decoder) and a Llama decoder LM, both with a word-level tokenizer over
the domain's closed vocabulary. They are saved as ordinary Hugging Face
directories, so every later stage loads them with ``from_pretrained`` exactly
as it would load ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .scenes import CELL_PIXELS, DOMAIN_WORDS, IMAGE_PIXELS

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
CHAT_WORDS = ("user", "assistant")
# The judge prompt's words and the verdict tokens. "A" and "B" are upper case
# so they never collide with the article "a" of the domain.
VERDICT_TOKENS = ("A", "B", "tie")
JUDGE_WORDS = ("question", "reference", "candidate", "which", "response", "better", "answers", "none", "verdict", "A", "B", "tie")

# Turns separated by a space; an image item becomes the processor's <image> placeholder,
# which LlavaProcessor expands to one token per image patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }} :"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %} <image>{% elif item['type'] == 'text' %} {{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %} </s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def build_tokenizer(extra_words=()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: one token per domain word, punctuation split off."""
    specials = [PAD, UNK, BOS, EOS, IMAGE]
    words = [w for w in dict.fromkeys((*DOMAIN_WORDS, *CHAT_WORDS, *extra_words)) if w not in specials]
    vocab = {w: i for i, w in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ." -> "."
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=512,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    return tok


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model; the defaults train in minutes on a laptop CPU."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    vision_hidden_size: int = 64
    vision_layers: int = 2
    max_positions: int = 512


def _text_config(tok: PreTrainedTokenizerFast, spec: TinySpec) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_vlm(out_dir: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """Writes a randomly initialised tiny LLaVA VLM with its processor to ``out_dir``."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    patches = (IMAGE_PIXELS // CELL_PIXELS) ** 2  # one patch per grid cell
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=IMAGE_PIXELS,
            patch_size=CELL_PIXELS,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=2 * spec.vision_hidden_size,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=4,
            projection_dim=spec.vision_hidden_size,
        ),
        text_config=_text_config(tok, spec),
        image_token_index=tok.convert_tokens_to_ids(IMAGE),
        image_seq_length=patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_PIXELS},
        crop_size={"height": IMAGE_PIXELS, "width": IMAGE_PIXELS},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=CELL_PIXELS,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token, which the "default" strategy drops again
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_scorer(out_dir: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """Writes a randomly initialised tiny decoder LM for the R-Scorer to ``out_dir``."""
    torch.manual_seed(seed)
    tok = build_tokenizer(extra_words=JUDGE_WORDS)
    model = LlamaForCausalLM(_text_config(tok, spec))
    model.generation_config.pad_token_id = tok.pad_token_id
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
