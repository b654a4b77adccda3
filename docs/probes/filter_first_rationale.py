"""A probe, not part of the package: does a gold rationale that first names the listed objects of the asked colour
make the lookups learnable? From one SFT checkpoint, SFT on 4,000 fresh prompts (seed 5555) at learning rate 1e-3,
with the rationale in its usual form (`plain`) or with the filter sentence added (`filter_first`), then the answer
line's accuracy on 500 held-out scenes (seed 777), per question kind.

    python docs/probes/filter_first_rationale.py STORE plain|filter_first EPOCHS OUT.json

STORE as for update_bounds.py. 6 epochs are 1,500 steps. Results in docs/results.md.
"""

import glob
import json
import re
import sys
import tempfile
from dataclasses import replace

import polars as pl

from src_assets.generation import generate_responses
from src_assets.models import Runtime, load_policy
from src_assets.profiles import profile
from src_assets.scenes import Question, Scene, answer_question, conclusion_sentence, perception_sentence
from src_assets.source_data import synthetic_source
from src_assets.training import train_vision_sft

store, form, epochs, out_json = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
sft = sorted(glob.glob(f"{store}/models/sft_checkpoint/versions/*"))[-1]


def of_color(objects, color: str) -> str:
    hits = [o for o in objects if o.color == color]
    if not hits:
        return f"there are no {color} shapes."
    return f"the {color} shapes are " + " and ".join(f"a {o.shape} at the {o.position}" for o in hits) + "."


def filter_sentence(objects, q: Question) -> str:
    if q.color is None:  # count by shape: the cells of that shape
        hits = [o for o in objects if o.shape == q.shape]
        if not hits:
            return f"there are no {q.shape}s."
        return f"the {q.shape}s are " + " and ".join(f"at the {o.position}" for o in hits) + "."
    return of_color(objects, q.color) + (f" {of_color(objects, q.other_color)}" if q.kind == "compare" else "")


def response(row: dict) -> str:
    objects, q = Scene.from_json(row["scene"]).objects, Question.from_json(row["question_spec"])
    sentences = [perception_sentence(o) for o in objects]
    if form == "filter_first" and q.kind != "attribute":
        sentences.append(filter_sentence(objects, q))
    sentences.append(conclusion_sentence(objects, q))
    return " ".join(sentences) + f"\nAnswer: {answer_question(objects, q)}"


rows = synthetic_source(5555, 4000, 0, 0)
rows = rows.with_columns(pl.Series("completion", [response(r) for r in rows.iter_rows(named=True)]))
held_out = synthetic_source(777, 0, 0, 500)
settings = replace(profile("default").dpo_settings(), learning_rate=1e-3, epochs=epochs)
with tempfile.TemporaryDirectory() as out:
    result = train_vision_sft(sft, rows.select("question", "image", "completion"), out, settings, form)
    model, processor = load_policy(out, Runtime("cpu", "float32"))
    texts = generate_responses(
        model, processor, held_out["question"].to_list(), held_out["image"].to_list(), max_new_tokens=160
    )
stated = [m.group(1).strip() if (m := re.search(r"Answer\s*:\s*(.+)$", t.strip())) else None for t in texts]
correct = [s == gold for s, gold in zip(stated, held_out["answer"])]
kinds = held_out["kind"].to_list()
by_kind = {k: sum(c for c, x in zip(correct, kinds) if x == k) / kinds.count(k) for k in sorted(set(kinds))}
report = {"form": form, "epochs": epochs, "train_loss": result.get("train_loss"), "answer_accuracy": sum(correct) / 500}
report |= {"by_kind": by_kind, "examples": texts[:5]}
print(json.dumps(report, indent=1))
with open(out_json, "w") as f:
    json.dump(report, f, indent=1)
