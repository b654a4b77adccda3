"""A probe, not part of the package: a judge that writes its comparisons as local steps before its verdict.

Same training rows as docs/probes/judge_reading.py (the contrast pairs of 200 calibrate scenes of seed 5, the
pipeline's compact prompt), but the judge is trained to write, after the prompt,

    A <A's answer> <reference answer> yes|no B <B's answer> <reference answer> yes|no so <verdict>

so that each comparison sits next to the two tokens it compares and has a loss of its own, as the policy's
rationale steps do. Read back by greedy generation on 300 of its training rows: the share whose two yes/no steps
are right, and the share whose verdict (the last word) is the verifier's.

    python docs/probes/judge_steps.py EPOCHS OUT.json

Results in docs/results.md.
"""

import json
import re
import sys
import tempfile
import time

import polars as pl
import torch

from src_assets.judge import JudgeConfig, train_judge
from src_assets.judge_corpus import contrast_judgements
from src_assets.models import load_judge_model
from src_assets.source_data import synthetic_source
from src_assets.tiny_models import build_tiny_llama_judge
from src_assets.training import TrainSettings

epochs, out_json = float(sys.argv[1]), sys.argv[2]
scratch = tempfile.mkdtemp()
start = str(build_tiny_llama_judge(f"{scratch}/start"))
_, tokenizer = load_judge_model(start)
RECAP = re.compile(r"answers : reference (.*) A (.*) B (.*) verdict :$")


def written_steps(prompt: str, verdict: str) -> str:
    reference, a, b = RECAP.search(prompt).groups()
    same = {x: "yes" if x == reference else "no" for x in (a, b)}
    return f" A {a} {reference} {same[a]} B {b} {reference} {same[b]} so {verdict}"


def step_bits(text: str) -> list[str]:
    return [w for w in text.split() if w in ("yes", "no")][:2]


rows = contrast_judgements(synthetic_source(5, 0, 200, 0), tokenizer, JudgeConfig())
rows = rows.with_columns(
    pl.Series("completion", [written_steps(p, v) for p, v in zip(rows["prompt"], rows["verdict"])])
)
started = time.time()
result = train_judge(start, rows, f"{scratch}/judge", TrainSettings(epochs=epochs, learning_rate=2e-3, batch_size=32))
model, tokenizer = load_judge_model(f"{scratch}/judge")
tokenizer.padding_side = "left"
sample = rows.sample(300, seed=0)
steps_right = verdict_right = 0
for i in range(0, sample.height, 50):
    chunk = sample[i : i + 50]
    encoded = tokenizer(chunk["prompt"].to_list(), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    written = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    for text, want in zip(written, chunk["completion"]):
        steps_right += step_bits(text) == step_bits(want)
        verdict_right += text.split()[-1:] == want.split()[-1:]
report = {
    "epochs": epochs,
    "steps": result["steps"],
    "train_s": round(time.time() - started),
    "steps_right": steps_right / sample.height,
    "verdict_fit": verdict_right / sample.height,
    "prior_fit": sample["verdict"].value_counts()["count"].max() / sample.height,
}
print(json.dumps(report))
with open(out_json, "w") as f:
    json.dump(report, f, indent=1)
