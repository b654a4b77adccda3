"""How a VQA row reaches the policy: the chat prompt with its image, and batched generation."""

from __future__ import annotations

import io

import torch
from PIL import Image


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def user_turn(question: str) -> list[dict]:
    """The prompt as TRL datasets hold it; TRL inserts the image placeholder itself."""
    return [{"role": "user", "content": question}]


def generation_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def encode_prompts(processor, questions, images) -> dict:
    """Left-padded prompt ids (image placeholders expanded) and pixel values for a batch."""
    texts = [generation_prompt(processor, q) for q in questions]
    pil = [decode_image(b) if isinstance(b, bytes) else b for b in images]
    return processor(images=pil, text=texts, return_tensors="pt", padding=True, padding_side="left")


def never_generate(model) -> list[list[int]] | None:
    """Token sequences a response must not contain: the image placeholder (it would desynchronise the image features)."""
    image_token = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    return [[image_token]] if image_token is not None else None


@torch.no_grad()
def generate_responses(model, processor, questions, images, max_new_tokens: int = 96, batch_size: int = 128,
                       do_sample: bool = False, temperature: float = 1.0) -> list[str]:
    """One response per prompt, greedy by default; decoded without special tokens."""
    model.eval()
    out = []
    for start in range(0, len(questions), batch_size):
        batch = encode_prompts(processor, questions[start : start + batch_size], images[start : start + batch_size])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature if do_sample else None, top_p=None, top_k=None,
                             bad_words_ids=never_generate(model))
        out += processor.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return out
