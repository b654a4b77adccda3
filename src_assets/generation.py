"""How a VQA row reaches the policy: the chat prompt with its image, and batched generation."""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image

from .progress import Progress, ProgressBar

# A response's default token budget: the longest gold rationale of the embedded domain (five objects, each step
# with its state, the conclusion and the answer line) is 105 tokens.
RESPONSE_TOKENS = 128


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def user_turn(question: str) -> list[dict]:
    """The prompt as TRL datasets hold it; TRL inserts the image placeholder itself."""
    return [{"role": "user", "content": question}]


def generation_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def encode_prompts(processor, questions, images) -> dict:
    """Left-padded prompt ids (image placeholders expanded) and the image tensors for a batch, as the processor makes them."""
    texts = [generation_prompt(processor, q) for q in questions]
    pil = [decode_image(b) if isinstance(b, bytes) else b for b in images]
    return processor(images=pil, text=texts, return_tensors="pt", padding=True, padding_side="left")


@dataclass
class PromptInputs:
    """One prompt as its processor encoded it: ``tokens`` are the per-token arrays (``input_ids`` and any others the
    processor aligns with it, such as Qwen's ``mm_token_type_ids``), ``images`` everything else (pixel values,
    grid sizes, pixel masks), each with its leading batch or patch dimension."""

    tokens: dict[str, list[int]]
    images: dict[str, torch.Tensor]


def prompt_inputs(processor, question: str, image) -> PromptInputs:
    enc = encode_prompts(processor, [question], [image])
    width = enc["input_ids"].shape[1]
    tokens = {
        k: v[0].tolist() for k, v in enc.items() if k != "attention_mask" and v.dim() == 2 and v.shape == (1, width)
    }
    images = {k: v for k, v in enc.items() if k != "attention_mask" and k not in tokens}
    return PromptInputs(tokens, images)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenated along the first dimension; where rows differ in a later one (e.g. the number of image tiles)
    each is zero-padded to the largest, as processors pad a batch themselves."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad = [x for d in reversed(range(1, t.dim())) for x in (0, shape[d - 1] - t.shape[d])]
        padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(padded)


def collate_prompts(rows: list[PromptInputs], extra: list[tuple[int, ...]] | None = None, pad_id: int = 0) -> dict:
    """A left-padded batch of prompts, each followed by its ``extra`` response tokens (text, so 0 in every other
    per-token array); image tensors are concatenated in row order, which is how every processor lays them out."""
    extra = extra or [()] * len(rows)
    lengths = [len(r.tokens["input_ids"]) + len(e) for r, e in zip(rows, extra)]
    width = max(lengths)
    batch = {"attention_mask": torch.zeros(len(rows), width, dtype=torch.long)}
    for key in rows[0].tokens:
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, (row, tail, n) in enumerate(zip(rows, extra, lengths)):
        batch["attention_mask"][i, width - n :] = 1
        for key, values in row.tokens.items():
            batch[key][i, width - n :] = torch.tensor(values + (list(tail) if key == "input_ids" else [0] * len(tail)))
    for key in rows[0].images:
        batch[key] = _stack([r.images[key] for r in rows])
    return batch


def to_model(batch: dict, model) -> dict:
    """The batch on the model's device, floating tensors (pixel values) in the model's dtype."""
    return {
        k: v.to(model.device, dtype=model.dtype) if v.is_floating_point() else v.to(model.device)
        for k, v in batch.items()
    }


def left_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one left-padded batch: ids and attention mask."""
    width = max(map(len, seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s) :], mask[r, width - len(s) :] = torch.tensor(s), 1
    return ids, mask


def cache_rows(cache, rows: list[int]):
    """A new KV cache holding ``rows`` of ``cache`` (rows may repeat): how many continuations share one encoding."""
    from transformers import DynamicCache

    selected = DynamicCache()
    index = torch.tensor(rows)
    for layer_idx, layer in enumerate(cache.layers):
        at = index.to(layer.keys.device)
        selected.update(layer.keys[at], layer.values[at], layer_idx)
    return selected


def never_generate(model) -> list[list[int]] | None:
    """Token sequences a response must not contain: the image placeholder (it would desynchronise the image features)."""
    image_token = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    return [[image_token]] if image_token is not None else None


@torch.no_grad()
def generate_responses(
    model,
    processor,
    questions,
    images,
    max_new_tokens: int = RESPONSE_TOKENS,
    batch_size: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    progress: Progress = False,
) -> list[str]:
    """One response per prompt, greedy by default; decoded without special tokens."""
    model.eval()
    out = []
    bar = ProgressBar(len(questions), "generating responses", progress)
    for start in range(0, len(questions), batch_size):
        batch = encode_prompts(processor, questions[start : start + batch_size], images[start : start + batch_size])
        batch = to_model(batch, model)
        ids = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=None,
            top_k=None,
            bad_words_ids=never_generate(model),
        )
        out += processor.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        bar.update(len(ids))
    bar.close()
    return out
