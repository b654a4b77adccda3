"""Tiny models built locally from real ``transformers`` classes.

The embedded default needs a VLM and a judge that exist without a
download. By default these are a LLaVA-architecture VLM (CLIP vision tower,
projector, Llama decoder) and a Llama decoder LM, both with a word-level
tokenizer over the domain's closed vocabulary.

The same builders make tiny random-weight checkpoints of the other policy
architectures the pipeline supports (Qwen2-VL, Qwen2.5-VL, Idefics3/SmolVLM)
and a Qwen2-architecture judge, each with a byte-level BPE tokenizer trained
here and the chat template of its family: what a real checkpoint of that
family looks like to the pipeline, at a size that runs on a CPU in seconds.
All are saved as ordinary Hugging Face directories, so every later stage loads
them with ``from_pretrained`` exactly as it would load a hub model.
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

from .processors import save_model_dir
from .scenes import CELL_PIXELS, DOMAIN_WORDS, IMAGE_PIXELS

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
CHAT_WORDS = ("user", "assistant")
# The judge prompt's words and the verdict tokens. "A" and "B" are upper case
# so they never collide with the article "a" of the domain.
VERDICT_TOKENS = ("A", "B", "tie")
JUDGE_WORDS = (
    "question",
    "reference",
    "candidate",
    "which",
    "response",
    "better",
    "answers",
    "none",
    "verdict",
    "A",
    "B",
    "tie",
)

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
    patch_size: int = CELL_PIXELS  # the LLaVA tower's patch side in pixels: one patch per grid cell by default
    position_embedding_std: float = 0.0  # > 0: the LLaVA tower's patch position embeddings drawn at this scale


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
    patches = (IMAGE_PIXELS // spec.patch_size) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=IMAGE_PIXELS,
            patch_size=spec.patch_size,
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
    if spec.position_embedding_std > 0:
        with torch.no_grad():
            model.model.vision_tower.embeddings.position_embedding.weight.normal_(0.0, spec.position_embedding_std)
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
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token, which the "default" strategy drops again
    )
    return save_model_dir(model, processor, out_dir)


def build_tiny_llama_judge(out_dir: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """Writes a randomly initialised tiny decoder LM for the judge to ``out_dir``."""
    torch.manual_seed(seed)
    tok = build_tokenizer(extra_words=JUDGE_WORDS)
    model = LlamaForCausalLM(_text_config(tok, spec))
    model.generation_config.pad_token_id = tok.pad_token_id
    return save_model_dir(model, tok, out_dir)


# --- The other policy architectures, with the byte-level BPE tokenizers their families use ---------------

POLICY_ARCHITECTURES = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3")
JUDGE_ARCHITECTURES = ("llama", "qwen2")

_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_IDEFICS_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
)

# ChatML as Qwen writes it; an image item is Qwen's vision block, which the processor expands per image patch.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# SmolVLM's template: "User:<image>question<end_of_utterance>\nAssistant:".
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %} {{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %} {{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _domain_corpus() -> list[str]:
    """Text the BPE tokenizers learn their merges from: the domain's and the judge prompt's words, in sentences."""
    from .scenes import generate_examples

    rows = [e.row() for e in generate_examples(200, seed=12345, split="tokenizer")]
    # "tie" is left out on purpose: it then takes several tokens, as rare verdict words do in real vocabularies,
    # so the judge's multi-token verdict path is exercised.
    judge_words = [w for w in JUDGE_WORDS if w != "tie"]
    return [f"{r['question']} {r['response']} {r['reference']}" for r in rows] + [
        " ".join(DOMAIN_WORDS),
        " ".join(judge_words),
    ]


def build_bpe_tokenizer(
    specials: tuple[str, ...],
    eos: str,
    pad: str,
    chat_template: str | None,
    extra_special_tokens: dict | None = None,
    vocab_size: int = 512,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2/Qwen style: a word after a space is one ``Ġword`` token) trained here."""
    from tokenizers import trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(_domain_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=eos,
        pad_token=pad,
        chat_template=chat_template,
        extra_special_tokens=extra_special_tokens or {},
        model_max_length=4096,
        padding_side="left",
    )


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    return build_bpe_tokenizer(
        _QWEN_SPECIALS,
        "<|im_end|>",
        "<|endoftext|>",
        QWEN_CHAT_TEMPLATE,
        {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )


def _qwen_vlm(spec: TinySpec, version: str):
    """A tiny Qwen2-VL or Qwen2.5-VL: 8-pixel patches merged 2x2, so a 48-pixel scene is 9 image tokens."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .processors import image_only

    tok = _qwen_tokenizer()
    (half,) = {spec.hidden_size // spec.num_heads // 2}
    rest = 3 * half // 8  # Qwen's split of the rotary dimensions among time, height and width: 16/24/24 of 64
    text = dict(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=4 * spec.max_positions,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * rest, rest, rest]},
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=spec.vision_layers,
        hidden_size=spec.vision_hidden_size,
        num_heads=4,
        patch_size=CELL_PIXELS // 2,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    ids = {
        name: tok.convert_tokens_to_ids(t)
        for name, t in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    if version == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

        config = Qwen2VLConfig(
            text_config=text,
            vision_config=vision | dict(embed_dim=spec.vision_hidden_size, hidden_size=spec.hidden_size, mlp_ratio=2),
            tie_word_embeddings=False,
            **ids,
        )
        model_class, processor_class = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

        config = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision
            | dict(
                intermediate_size=2 * spec.vision_hidden_size,
                out_hidden_size=spec.hidden_size,
                window_size=4 * CELL_PIXELS,
                fullatt_block_indexes=[0],
            ),
            tie_word_embeddings=False,
            **ids,
        )
        model_class, processor_class = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=CELL_PIXELS // 2,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": IMAGE_PIXELS**2, "longest_edge": 4 * IMAGE_PIXELS**2},
    )
    processor = image_only(processor_class)(
        image_processor=image_processor, tokenizer=tok, video_processor=None, chat_template=QWEN_CHAT_TEMPLATE
    )
    return model_class(config), processor, tok


def _idefics3_vlm(spec: TinySpec):
    """A tiny Idefics3 (SmolVLM): a SigLIP tower on the whole 48-pixel scene, 8-pixel patches, pixel shuffle 2: 9 tokens."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = build_bpe_tokenizer(
        _IDEFICS_SPECIALS,
        "<end_of_utterance>",
        "<|endoftext|>",
        IDEFICS3_CHAT_TEMPLATE,
        {
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    patch, scale = CELL_PIXELS // 2, 2
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=spec.vision_hidden_size,
            intermediate_size=2 * spec.vision_hidden_size,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=4,
            image_size=IMAGE_PIXELS,
            patch_size=patch,
        ),
        text_config=_text_config(tok, spec).to_dict(),
        scale_factor=scale,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_PIXELS},
        max_image_size={"longest_edge": IMAGE_PIXELS},
        resample=3,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
        image_seq_len=(IMAGE_PIXELS // patch) ** 2 // scale**2,
    )
    return Idefics3ForConditionalGeneration(config), processor, tok


def build_tiny_policy(
    out_dir: str | Path, architecture: str = "llava", spec: TinySpec = TinySpec(), seed: int = 0
) -> Path:
    """A tiny random-weight VLM of ``architecture`` (one of ``POLICY_ARCHITECTURES``) with its processor."""

    if architecture == "llava":
        return build_tiny_vlm(out_dir, spec, seed)
    if architecture not in POLICY_ARCHITECTURES:
        raise ValueError(f"unknown tiny policy architecture {architecture!r}; expected one of {POLICY_ARCHITECTURES}")
    torch.manual_seed(seed)
    model, processor, tok = _idefics3_vlm(spec) if architecture == "idefics3" else _qwen_vlm(spec, architecture)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return save_model_dir(model, processor, out_dir)


def build_tiny_judge(
    out_dir: str | Path, architecture: str = "llama", spec: TinySpec = TinySpec(), seed: int = 0
) -> Path:
    """A tiny random-weight judge LM: ``llama`` with the word-level tokenizer, or ``qwen2`` with a byte-level BPE one."""
    if architecture == "llama":
        return build_tiny_llama_judge(out_dir, spec, seed)
    if architecture not in JUDGE_ARCHITECTURES:
        raise ValueError(f"unknown tiny judge architecture {architecture!r}; expected one of {JUDGE_ARCHITECTURES}")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tok = _qwen_tokenizer()
    config = Qwen2Config(**{k: v for k, v in _text_config(tok, spec).to_dict().items() if k in Qwen2Config().to_dict()})
    config.bos_token_id = None
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    return save_model_dir(model, tok, out_dir)
