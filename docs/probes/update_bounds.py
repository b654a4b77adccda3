"""A probe, not part of the package: from one SFT checkpoint and one iteration's preference set, train each kind of
policy update and score it on 500 held-out scenes (seed 777) with the anatomy of its greedy answers.

    python docs/probes/update_bounds.py STORE VARIANTS OUT.json [SETTING=VALUE ...]

STORE is a store after `src-calibrate run --iterations 1 --store STORE --set judge_model=verifier [--set ...]`;
the SETTING=VALUE pairs are that run's settings (its seed among them). VARIANTS is a comma-separated list of
KIND[:opt=value...] with KIND one of
  sft     the SFT checkpoint itself, untrained;
  dpo     the loop's weighted DPO on the kept pairs (opts: beta, nll = the likelihood anchor's weight,
          dpop = DPO-Positive's lambda, lr, ep);
  chosen  SFT on the kept pairs' chosen responses (rejection-sampling fine-tuning; opts: lr, ep);
  gold    SFT on the same prompts' gold responses, the gold-data bound (opts: lr, ep);
  more    SFT on n fresh gold rows (seed 5555): what more supervision gives (opts: n, lr, ep).
Unset opts take the run's DPO settings (2 epochs, learning rate 1e-4, batch size 16). Results in docs/results.md.
"""

import glob
import json
import sys
import tempfile
import time
from dataclasses import replace

import polars as pl
import torch

from src_assets.evaluation import anatomy, evaluate_policy
from src_assets.generation import collate_prompts, prompt_inputs, to_model
from src_assets.models import Runtime, load_policy
from src_assets.profiles import profile
from src_assets.source_data import synthetic_source
from src_assets.training import train_vision_sft
from src_assets.weighted_dpo import train_weighted_dpo

store, variants, out_json = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
cfg = profile("default", **dict(a.split("=", 1) for a in sys.argv[4:]))
sft = sorted(glob.glob(f"{store}/models/sft_checkpoint/versions/*"))[-1]
prefs = pl.read_parquet(sorted(glob.glob(f"{store}/assets/preference_set/001*.parquet"))[-1])
kept = prefs.filter(pl.col("kept"))
held_out = synthetic_source(777, 0, 0, 500)


@torch.no_grad()
def chosen_logp(model, processor, n: int = 200) -> float:
    """The mean summed log-prob of (at most ``n`` of) the kept pairs' chosen responses."""
    out = []
    for question, image, text in kept.head(n).select("question", "image", "chosen").iter_rows():
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        batch = to_model(collate_prompts([prompt_inputs(processor, question, image)], [tuple(ids)]), model)
        logps = model(**batch).logits[0, -len(ids) - 1 : -1].float().log_softmax(-1)
        out.append(logps.gather(1, torch.tensor(ids)[:, None]).sum().item())
    return sum(out) / len(out)


def score(model_dir: str) -> dict:
    model, processor = load_policy(model_dir, Runtime("cpu", "float32"))
    summary, scored = evaluate_policy(model, processor, held_out)
    parts = anatomy(scored)
    kinds = {k: [round(v["accuracy"], 3), round(v["consistency"], 3)] for k, v in parts.items() if k != "all"}
    return {
        "accuracy": summary["accuracy"],
        "consistency": summary["consistency"],
        "chosen_logp": chosen_logp(model, processor),
        **parts["all"],
        "kinds": kinds,
    }


def run(variant: str) -> dict:
    kind, *opts = variant.split(":")
    opt = dict(o.split("=") for o in opts)
    base = cfg.dpo_settings()
    settings = replace(
        base, learning_rate=float(opt.get("lr", base.learning_rate)), epochs=float(opt.get("ep", base.epochs))
    )
    if kind == "sft":
        return {"variant": variant, **score(sft)}
    with tempfile.TemporaryDirectory() as out:
        start = time.time()
        if kind == "dpo":
            beta, nll = float(opt.get("beta", cfg.beta)), float(opt.get("nll", cfg.dpo_nll_weight))
            dpop = float(opt.get("dpop", cfg.dpo_positive_lambda))
            result = train_weighted_dpo(
                sft, prefs, out, settings, beta=beta, use_fused_kernel=False, nll_weight=nll, dpop_lambda=dpop
            )
        else:
            if kind == "more":
                rows = synthetic_source(5555, int(opt["n"]), 0, 0).rename({"response": "completion"})
            else:
                rows = kept.rename({"gold_response" if kind == "gold" else "chosen": "completion"})
            result = train_vision_sft(sft, rows.select("question", "image", "completion"), out, settings, kind)
        trained = {"train_s": round(time.time() - start), "train_loss": result.get("train_loss")}
        return {"variant": variant, **trained, **score(out)}


results = []
for variant in variants:
    results.append(run(variant))
    print(json.dumps(results[-1]), file=sys.stderr)
    with open(out_json, "w") as f:
        json.dump(results, f, indent=1)
