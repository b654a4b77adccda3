"""A probe, not part of the package: what stops the tiny judge from learning its verdict?

The judge is trained (``train_judge``, batch 32, cosine schedule) on the verifier-labelled contrast pairs of 200
calibrate scenes of seed 5 (3,896 ordered pairs, A 1,310 / B 1,310 / tie 1,276), with its compact prompt rewritten
into one of these forms, all ending in the same recap (``answers : reference R A X B Y verdict :``):

- ``full``: the compact prompt as the pipeline writes it (question, reference, both rationales, recap);
- ``recap``: the recap alone;
- ``lastN``: the last N words of the full prompt before the recap, then the recap;
- ``filler``: as many copies of one word as the full prompt has words, then the recap (same length, no content).

LABEL is ``verdict`` (the verifier's A / B / tie) or ``answer_is_reference`` (A when candidate A's answer equals
the reference answer, else B: one comparison of two recap tokens). The judge's verdicts are then read back on 600
of its own training rows (``verdict_fit``), and on 64 of them two links between training and read-out are
measured: the read-out against a plain forward pass, and the verdict's loss in TRL's training batch.

    python docs/probes/judge_reading.py FORM LABEL EPOCHS OUT.json [LR [JUDGE_DIR]]

JUDGE_DIR: the judge to start from (default: a fresh tiny judge, seed 0). Results in docs/results.md.
"""

import json
import re
import sys
import tempfile
import time

import polars as pl
import torch

from src_assets.judge import (
    JudgeConfig,
    train_judge,
    verdict_continuations,
    verdict_fit,
    verdict_probabilities,
)
from src_assets.judge_corpus import contrast_judgements
from src_assets.models import load_judge_model
from src_assets.source_data import synthetic_source
from src_assets.tiny_models import build_tiny_llama_judge
from src_assets.training import TrainSettings

form, label, epochs, out_json = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
lr = float(sys.argv[5]) if len(sys.argv) > 5 else 2e-3
scratch = tempfile.mkdtemp()
start = sys.argv[6] if len(sys.argv) > 6 else str(build_tiny_llama_judge(f"{scratch}/start"))
RECAP = re.compile(r"answers : reference (.*) A (.*) B (.*) verdict :$")


def rewrite(prompt: str) -> str:
    recap = RECAP.search(prompt)
    body = prompt[: recap.start()].split()
    if form == "full":
        return prompt
    if form == "recap":
        return recap.group(0)
    if form.startswith("last"):
        return " ".join(body[-int(form[4:]) :] + [recap.group(0)])
    if form == "filler":
        return " ".join(["there"] * len(body) + [recap.group(0)])
    raise SystemExit(f"unknown form {form!r}: full, recap, lastN or filler")


def read_out_links(model, tokenizer, rows) -> dict:
    """On ``rows``: the largest gap between the pipeline's read-out (batched, prefix cache) and one plain forward
    pass per prompt (single-token verdicts: the word-level tiny judge), and the verdict's own loss where TRL's
    collated training batch puts it."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    prompts = rows["prompt"].to_list()
    ids, tails = verdict_continuations(tokenizer, prompts)
    with torch.no_grad():
        plain = torch.stack(
            [
                model(input_ids=torch.tensor([i])).logits[0, -1].log_softmax(-1)[[t[0] for t in tail]]
                for i, tail in zip(ids, tails)
            ]
        ).softmax(-1)
        gap = (plain - verdict_probabilities(model, tokenizer, prompts)).abs().max().item()
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(output_dir=scratch, use_cpu=True, completion_only_loss=True, report_to=[]),
            train_dataset=Dataset.from_dict({"prompt": prompts, "completion": rows["completion"].to_list()}),
            processing_class=tokenizer,
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(prompts))])
        logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
        first = (batch["labels"] != -100).float().argmax(1)  # the verdict's position in each row
        rows_ = torch.arange(len(prompts))
        nll = -logp[rows_, first - 1, batch["labels"][rows_, first]].mean().item()
    return {"read_out_vs_plain_forward_max_gap": gap, "verdict_loss_in_training_batch": nll}


_, tokenizer = load_judge_model(start)
rows = contrast_judgements(synthetic_source(5, 0, 200, 0), tokenizer, JudgeConfig())
if label == "answer_is_reference":
    same = [RECAP.search(p).group(1) == RECAP.search(p).group(2) for p in rows["prompt"]]
    rows = rows.with_columns(pl.Series("verdict", ["A" if s else "B" for s in same]))
elif label != "verdict":
    raise SystemExit(f"unknown label {label!r}: verdict or answer_is_reference")
rows = rows.with_columns(
    pl.Series("prompt", [rewrite(p) for p in rows["prompt"]]), (pl.lit(" ") + pl.col("verdict")).alias("completion")
)
started = time.time()
result = train_judge(
    start, rows, f"{scratch}/judge", TrainSettings(epochs=epochs, learning_rate=lr, batch_size=32, warmup_steps=5)
)
judge, judge_tokenizer = load_judge_model(f"{scratch}/judge")
fit = verdict_fit(judge, judge_tokenizer, rows, n=600)
links = read_out_links(judge, judge_tokenizer, rows.head(64))
# The trainer's loss is the mean over the verdict token and the end-of-sequence token after it, which is learned
# at once: the verdict's own loss is about twice the logged figure (ln 3 = 1.10 at chance for three verdicts).
curve = [{"step": e["step"], "loss": round(e["loss"], 4)} for e in result["log"] if "loss" in e]
report = {
    "form": form,
    "label": label,
    "epochs": epochs,
    "learning_rate": lr,
    "start": sys.argv[6] if len(sys.argv) > 6 else "fresh tiny judge",
    "mean_prompt_words": rows["prompt"].str.split(" ").list.len().mean(),
    "steps": result["steps"],
    "train_s": round(time.time() - started),
    **fit,
    **links,
    "loss_curve": curve,
}
print(json.dumps({k: v for k, v in report.items() if k != "loss_curve"}))
with open(out_json, "w") as f:
    json.dump(report, f, indent=1)
