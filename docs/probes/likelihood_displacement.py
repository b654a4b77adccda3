"""A probe, not part of the package: how the loop's weighted DPO moves summed log-probabilities, of the kept pairs'
chosen and rejected responses and of held-out gold rationales (300 prompts of seed 777, per question kind).

    python docs/probes/likelihood_displacement.py STORE [NLL_WEIGHT]

STORE as for update_bounds.py (an iteration-1 oracle run on seed 22). Results in docs/results.md.
"""

import glob
import json
import sys
import tempfile

import polars as pl
import torch

from src_assets.generation import collate_prompts, prompt_inputs, to_model
from src_assets.models import Runtime, load_policy
from src_assets.profiles import profile
from src_assets.source_data import synthetic_source
from src_assets.weighted_dpo import train_weighted_dpo

store = sys.argv[1]
nll_weight = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
cfg = profile("default", seed="22", teacher_error_rate="0", judge_model="verifier", base_stop_at_exact_listing="0")
sft = sorted(glob.glob(f"{store}/models/sft_checkpoint/versions/*"))[-1]
prefs = pl.read_parquet(sorted(glob.glob(f"{store}/assets/preference_set/001*.parquet"))[-1])
kept = prefs.filter(pl.col("kept"))
held_out = synthetic_source(777, 300, 0, 0)


@torch.no_grad()
def summed_logps(model, processor, questions, images, texts) -> torch.Tensor:
    out = []
    for question, image, text in zip(questions, images, texts):
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        batch = to_model(collate_prompts([prompt_inputs(processor, question, image)], [tuple(ids)]), model)
        logps = model(**batch).logits[0, -len(ids) - 1 : -1].float().log_softmax(-1)
        out.append(logps.gather(1, torch.tensor(ids)[:, None]).sum().item())
    return torch.tensor(out)


def measure(model_dir: str):
    model, processor = load_policy(model_dir, Runtime("cpu", "float32"))
    model.eval()
    chosen = summed_logps(model, processor, kept["question"], kept["image"], kept["chosen"])
    rejected = summed_logps(model, processor, kept["question"], kept["image"], kept["rejected"])
    gold = summed_logps(model, processor, held_out["question"], held_out["image"], held_out["response"])
    kinds = held_out["kind"].to_list()
    by_kind = {k: float(gold[[i for i, x in enumerate(kinds) if x == k]].mean()) for k in sorted(set(kinds))}
    means = {"chosen": float(chosen.mean()), "rejected": float(rejected.mean()), "held_out_gold": float(gold.mean())}
    return {**means, "held_out_gold_by_kind": by_kind}, chosen, rejected


before, chosen0, rejected0 = measure(sft)
with tempfile.TemporaryDirectory() as out:
    train_weighted_dpo(
        sft, prefs, out, cfg.dpo_settings(), beta=cfg.beta, use_fused_kernel=False, nll_weight=nll_weight
    )
    after, chosen1, rejected1 = measure(out)
shares = {
    "chosen_fell": float((chosen1 < chosen0).float().mean()),
    "margin_grew": float(((chosen1 - rejected1) > (chosen0 - rejected0)).float().mean()),
}
print(json.dumps({"sft": before, "dpo": after, **shares}, indent=1))
