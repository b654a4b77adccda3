"""A probe, not part of the package: does the policy conclude from its rationale's text or from the image? The
response is started for it, and the rest generated greedily; the answer line is scored per question kind on 500
held-out scenes (seed 777):
  listing_real   the gold listing given, the real image;
  listing_blank  the gold listing given, a blank image (which the policy never saw in training);
  listing_other  the gold listing given, the image of another held-out scene: a conclusion that follows the text
                 scores as with the real image, one that follows the image scores as a guess.

    python docs/probes/text_or_image.py MODEL_DIR OUT.json

Results in docs/results.md.
"""

import json
import re
import sys

import polars as pl
import torch

from src_assets.evaluation import with_blank_images
from src_assets.generation import collate_prompts, never_generate, prompt_inputs, to_model
from src_assets.models import Runtime, load_policy
from src_assets.scenes import Scene, perception_sentence
from src_assets.source_data import synthetic_source

model_dir, out_json = sys.argv[1], sys.argv[2]
model, processor = load_policy(model_dir, Runtime("cpu", "float32"))
model.eval()
held_out = synthetic_source(777, 0, 0, 500)
listings = [" ".join(perception_sentence(o) for o in Scene.from_json(s).objects) for s in held_out["scene"]]


@torch.no_grad()
def complete(rows, starts: list[str], batch_size: int = 64) -> list[str]:
    out = []
    for i in range(0, rows.height, batch_size):
        chunk = rows.slice(i, batch_size)
        prompts = [prompt_inputs(processor, q, im) for q, im in zip(chunk["question"], chunk["image"])]
        starts_ids = [tuple(processor.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in starts[i:]]
        batch = to_model(collate_prompts(prompts, starts_ids[: len(prompts)], processor.tokenizer.pad_token_id), model)
        ids = model.generate(**batch, max_new_tokens=40, do_sample=False, bad_words_ids=never_generate(model))
        out += processor.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def score(texts: list[str]) -> dict:
    stated = [m.group(1).strip() if (m := re.search(r"Answer\s*:\s*(.+)$", t.strip())) else None for t in texts]
    correct = [s == gold for s, gold in zip(stated, held_out["answer"])]
    kinds = held_out["kind"].to_list()
    by_kind = {k: sum(c for c, x in zip(correct, kinds) if x == k) / kinds.count(k) for k in sorted(set(kinds))}
    return {"accuracy": sum(correct) / len(correct), "by_kind": by_kind, "example": texts[0]}


blank = with_blank_images(held_out)
images = held_out["image"].to_list()
other_images = held_out.with_columns(pl.Series("image", images[1:] + images[:1], dtype=pl.Binary))
report = {
    "listing_real": score(complete(held_out, listings)),
    "listing_blank": score(complete(blank, listings)),
    "listing_other": score(complete(other_images, listings)),
}
print(json.dumps(report, indent=1))
with open(out_json, "w") as f:
    json.dump(report, f, indent=1)
