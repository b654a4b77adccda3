"""A probe, not part of the package: can the policy learn the rationale form? From a store's base policy, SFT on
fresh gold rows (every row seen once, batch 32, constant learning rate after 20 warm-up steps), and every EVERY
steps the greedy answers on 500 held-out scenes (seed 777) are scored per question kind, with the anatomy.

    python docs/probes/gold_curve.py STORE STEPS EVERY OUT.json [LR [MODEL_DIR]]

MODEL_DIR, if given, keeps the trained policy (for docs/probes/text_or_image.py). STORE is a store after `src-calibrate run --iterations 0 --seed S --store STORE` (its base policy is used; the
fresh rows come from seed 5555, apart from every split of any seed below 5555). Results in docs/results.md.
"""

import glob
import json
import sys
import tempfile
import time

from transformers import TrainerCallback

from src_assets.evaluation import anatomy, evaluate_policy
from src_assets.source_data import synthetic_source
from src_assets.training import TrainSettings, train_vision_sft

store, steps, every, out_json = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lr = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-3
base = sorted(glob.glob(f"{store}/models/base_policy_checkpoint/versions/*"))[-1]
held_out = synthetic_source(777, 0, 0, 500)
rows = synthetic_source(5555, steps * 32, 0, 0).rename({"response": "completion"})
curve = []


def record(model, processor, step: int, started: float) -> None:
    summary, scored = evaluate_policy(model, processor, held_out, max_new_tokens=160)
    parts = anatomy(scored)
    curve.append(
        {
            "step": step,
            "train_s": round(time.time() - started),
            "accuracy": summary["accuracy"],
            "consistency": summary["consistency"],
            "steps_follow": parts["all"]["steps_follow"],
            "exact_listing": parts["all"]["exact_listing"],
            "kinds": {k: round(v["accuracy"], 3) for k, v in parts.items() if k != "all"},
            "example": scored["response"][0],
        }
    )
    print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
    with open(out_json, "w") as f:
        json.dump({"store": store, "base": base, "lr": lr, "curve": curve}, f, indent=1)


class EveryN(TrainerCallback):
    def __init__(self):
        self.started = time.time()

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % every == 0:
            was_training = model.training
            record(model, processing_class, state.global_step, self.started)
            model.train(was_training)


settings = TrainSettings(1.0, lr, 32, lr_scheduler_type="constant_with_warmup", warmup_steps=20)
with tempfile.TemporaryDirectory() as scratch:
    out = sys.argv[6] if len(sys.argv) > 6 else scratch
    train_vision_sft(base, rows.select("question", "image", "completion"), out, settings, "gold", [EveryN()])
