"""``src-calibrate bench-generation``: tokens/s and peak memory of candidate search and of judging.

Each measurement runs in a fresh Python process, so the peak resident memory it reports (``ru_maxrss``, the
high-water mark of the whole process) belongs to that stage alone; on CUDA the peak allocated GPU memory is
reported too. It only uses ``sentence_beam_search`` and ``judge``, whose signatures are stable, so the same
script can time an older checkout of ``src_assets`` (``--code DIR``) for a before/after comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_STAGE = r"""
import json, resource, sys, time
import polars as pl, torch
from src_assets.candidate_search import SearchConfig, sentence_beam_search
from src_assets.models import load_policy, load_judge_model
from src_assets.judge import judge, judge_prompt
from src_assets.source_data import synthetic_source

stage, model_dir, n, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
prompts = synthetic_source(seed=77, n_sft=0, n_calibrate=n, n_eval=0)
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if stage == "search":
    model, processor = load_policy(model_dir)
    model.to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    pool = sentence_beam_search(model, processor, prompts, SearchConfig(),
                                seed=0, progress=False)
    seconds = time.perf_counter() - start
    tokens = int(pool["n_tokens"].sum())
    work = {"candidates": pool.height, "candidate_tokens": tokens}
else:
    model, tok = load_judge_model(model_dir)
    model.to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    import random
    from itertools import permutations
    try:
        from src_assets.judge_corpus import perturbed_responses
        prompt_of = lambda r, a, b: judge_prompt(tok, r, a, b)
    except ImportError:  # a checkout from before judge_corpus.py (--code): the older judge_prompt
        from src_assets.judge import perturbed_responses
        prompt_of = lambda r, a, b: judge_prompt(tok, r["question"], r["reference"], r["answer"], a, b)
    rng, texts = random.Random(0), []
    for r in prompts.iter_rows(named=True):  # K = 6 distinct candidates per prompt: every ordered pair, 30 in all
        pool = list(dict.fromkeys([r["response"], *perturbed_responses(r["response"], rng), *perturbed_responses(r["response"], rng),
                                   *perturbed_responses(r["response"], rng)]))[:6]
        pool += [f"{r['response']} " * (i + 1) for i in range(6 - len(pool))]
        texts += [prompt_of(r, pool[i], pool[j]) for i, j in permutations(range(6), 2)]
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    judge(model, tok, texts)
    seconds = time.perf_counter() - start
    tokens = sum(len(tok(t)["input_ids"]) for t in texts)
    work = {"pairs": len(texts), "prompt_tokens": tokens}
out = {"stage": stage, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1), **work,
       "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
       "peak_rss_over_loaded_model_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_loaded) / 1024, 1)}
if device == "cuda":
    out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
print(json.dumps(out))
"""


def _trained_tiny_models(root: Path, epochs: float) -> tuple[Path, Path]:
    """The default tiny LLaVA after a short rationale SFT (so that it writes sentences that end), and the tiny judge."""
    from src_assets.rationale_sft import build_rationale_sft_set, train_rationale_sft
    from src_assets.source_data import synthetic_source
    from src_assets.tiny_models import build_tiny_llama_judge, build_tiny_vlm
    from src_assets.training import TrainSettings

    build_tiny_vlm(root / "base")
    sft = build_rationale_sft_set(synthetic_source(seed=0, n_sft=512, n_calibrate=0, n_eval=0))
    train_rationale_sft(
        str(root / "base"), sft, str(root / "policy"), TrainSettings(epochs=epochs, learning_rate=2e-3, batch_size=32)
    )
    return root / "policy", build_tiny_llama_judge(root / "judge")


def bench_generation(args) -> int:
    code = Path(args.code).resolve() if args.code else Path(__file__).resolve().parents[2]
    device = args.device if args.device != "auto" else ("cuda" if _cuda() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        policy, judge_dir = (
            (Path(args.policy), Path(args.judge)) if args.policy else _trained_tiny_models(Path(tmp), args.sft_epochs)
        )
        rows = []
        for stage, model_dir in (("search", policy), ("judge", judge_dir)):
            env = {**os.environ, "PYTHONPATH": str(code)}
            # cwd too: ``python -c`` puts the working directory first on sys.path, ahead of PYTHONPATH.
            done = subprocess.run(
                [sys.executable, "-c", _STAGE, stage, str(model_dir.resolve()), str(args.prompts), device],
                env=env,
                cwd=code,
                capture_output=True,
                text=True,
            )
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(
                {
                    "code": str(code),
                    "device": device,
                    "prompts": args.prompts,
                    **json.loads(done.stdout.strip().splitlines()[-1]),
                }
            )
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
