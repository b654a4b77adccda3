"""A probe, not part of the package: does the policy reason from its rationale's text or from the image? Each
perception sentence of the gold rationale is given up to its comma, and the policy writes the step after it
(greedy, up to the full stop); after the last one it writes the conclusion and the answer line. Answers and steps
are scored per question kind on 500 held-out scenes (seed 777):
  listing_real   the gold listing given, the real image;
  listing_other  the gold listing given, the image of another held-out scene: reasoning that follows the text
                 scores as with the real image, reasoning that reads the image scores as a guess;
  listing_blank  the gold listing given, a blank image (which the policy never saw in training).

    python docs/probes/text_or_image.py MODEL_DIR OUT.json

Results in docs/results.md.
"""

import json
import sys

import polars as pl
import torch

from src_assets.evaluation import anatomy, score_responses, with_blank_images
from src_assets.generation import collate_prompts, never_generate, prompt_inputs, to_model
from src_assets.models import Runtime, load_policy
from src_assets.scenes import Scene
from src_assets.source_data import synthetic_source

model_dir, out_json = sys.argv[1], sys.argv[2]
model, processor = load_policy(model_dir, Runtime("cpu", "float32"))
model.eval()
held_out = synthetic_source(777, 0, 0, 500)
objects = [Scene.from_json(s).objects for s in held_out["scene"]]


@torch.no_grad()
def continue_(rows: pl.DataFrame, starts: list[str], max_new_tokens: int, batch_size: int = 100) -> list[str]:
    """Each row's response started with ``starts[i]``, continued greedily; returns the continuations."""
    out = []
    for i in range(0, rows.height, batch_size):
        chunk = rows.slice(i, batch_size)
        prompts = [prompt_inputs(processor, q, im) for q, im in zip(chunk["question"], chunk["image"])]
        ids = [tuple(processor.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in starts[i : i + batch_size]]
        batch = to_model(collate_prompts(prompts, ids, processor.tokenizer.pad_token_id), model)
        new = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, bad_words_ids=never_generate(model)
        )
        out += processor.batch_decode(new[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def reason_over_given_listing(rows: pl.DataFrame) -> list[str]:
    """The gold perception sentences given one by one, the policy's own steps after each, then its conclusion."""
    texts = [""] * rows.height
    for step in range(max(map(len, objects))):
        live = [i for i, objs in enumerate(objects) if step < len(objs)]
        starts = []
        for i in live:
            o = objects[i][step]
            starts.append(f"{texts[i]} there is a {o.color} {o.shape} at the {o.position},".strip())
        clauses = continue_(rows[live], starts, 12)
        for i, start, clause in zip(live, starts, clauses):
            texts[i] = f"{start} {clause.split('.')[0].strip()}."
    return [t + " " + rest for t, rest in zip(texts, continue_(rows, texts, 32))]


def score(rows: pl.DataFrame) -> dict:
    responses = reason_over_given_listing(rows)
    parts = anatomy(score_responses(held_out, responses))
    return {
        "accuracy": parts["all"]["accuracy"],
        "steps_follow": parts["all"]["steps_follow"],
        "consistency": parts["all"]["consistency"],
        "by_kind": {k: round(v["accuracy"], 3) for k, v in parts.items() if k != "all"},
        "example": responses[0],
    }


images = held_out["image"].to_list()
report = {
    "listing_real": score(held_out),
    "listing_other": score(held_out.with_columns(pl.Series("image", images[1:] + images[:1], dtype=pl.Binary))),
    "listing_blank": score(with_blank_images(held_out)),
}
print(json.dumps(report, indent=1))
with open(out_json, "w") as f:
    json.dump(report, f, indent=1)
