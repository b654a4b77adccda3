"""``src-calibrate experiment``: the ablation table, each variant of the loop run for each seed.

Every (variant, seed) is one ``src-calibrate run --json`` in a child process with its own Dagster instance
under ``--out`` (inspect any of them with ``dg dev`` afterwards). The variants of one seed run one after
another on one store, so the rationale SFT (and the judge, where the variant does not change it) is trained
once per seed and reused (``reuse_checkpoints``); the seeds run in parallel.
The table compares iteration 0 (the SFT checkpoint) with the last iteration, as mean and standard deviation
over seeds, and is written as ``results.json`` and ``results.md``.
"""

import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# What each variant changes from the run settings; "src" is the method as configured.
VARIANTS = {
    "src": [],
    "independent_scoring": ["scoring=independent"],
    "unweighted_dpo": ["weighted_dpo=false"],
    "oracle_judge": ["judge_model=verifier"],
    "gold_bound": ["judge_model=verifier", "policy_update=gold_sft"],
}
DESCRIPTIONS = {
    "src": "learned judge, pairwise scoring, confidence-weighted DPO",
    "independent_scoring": "each candidate judged alone instead of side by side",
    "unweighted_dpo": "every kept pair weighted 1 (plain DPO)",
    "oracle_judge": "the verifier as the judge (upper bound)",
    "gold_bound": "SFT on the oracle's kept prompts' gold responses, same steps, instead of DPO",
}
METRICS = ("accuracy", "consistency", "factuality")


def _run_one(variant: str, seed: int, args, threads: int) -> dict:
    folder = Path(args.out, f"seed{seed}", variant).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "dagster_project.runs.cli",
        "run",
        "--json",
        "--iterations",
        str(args.iterations),
        "--profile",
        args.profile,
        "--seed",
        str(seed),
        "--store",
        str(folder.parent / "store"),
    ]
    for setting in [*args.set, *VARIANTS[variant]]:
        cmd += ["--set", setting]
    env = {**os.environ, "DAGSTER_HOME": str(folder / "dagster_home"), "OMP_NUM_THREADS": str(threads)}
    (folder / "dagster_home").mkdir(exist_ok=True)
    with open(folder / "run.log", "w") as log:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    if done.returncode != 0:
        return {"variant": variant, "seed": seed, "error": f"exit {done.returncode}; see {folder / 'run.log'}"}
    return {"variant": variant, "seed": seed, "rows": json.loads(done.stdout)}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_runs(runs: list[dict]) -> list[dict]:
    """One row per variant: each metric at iteration 0 and at the last iteration, and the change, over seeds."""
    table = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        ok = [r for r in runs if r["variant"] == variant and "rows" in r]
        row = {
            "variant": variant,
            "what": DESCRIPTIONS.get(variant, ""),
            "seeds": [r["seed"] for r in ok],
            "failed": [r["seed"] for r in runs if r["variant"] == variant and "error" in r],
        }
        for m in METRICS:
            first = [r["rows"][0][m] for r in ok]
            last = [r["rows"][-1][m] for r in ok]
            row[f"{m}_sft"] = _mean_sd(first)
            row[f"{m}_last"] = _mean_sd(last)
            pairs = [(a, b) for a, b in zip(first, last) if a is not None and b is not None]
            row[f"{m}_change"] = _mean_sd([b - a for a, b in pairs])
            row[f"{m}_improved_every_seed"] = bool(pairs) and len(pairs) == len(ok) and all(b > a for a, b in pairs)
        row["judge_agreement"] = _mean_sd([x.get("judge_agreement") for r in ok for x in r["rows"][1:]])
        table.append(row)
    return table


def markdown(table: list[dict], iterations: int, n_eval: str) -> str:
    f = lambda ms: "n/a" if ms[0] != ms[0] else f"{ms[0]:.3f} ± {ms[1]:.3f}"
    d = lambda ms: "n/a" if ms[0] != ms[0] else f"{ms[0]:+.3f} ± {ms[1]:.3f}"
    lines = [
        f"| variant | seeds | accuracy: SFT → iteration {iterations} | change | consistency: SFT → iteration {iterations} "
        f"| change | judge agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['variant']} ({r['what']}) | {len(r['seeds'])} | {f(r['accuracy_sft'])} → {f(r['accuracy_last'])} "
            f"| {d(r['accuracy_change'])} | {f(r['consistency_sft'])} → {f(r['consistency_last'])} "
            f"| {d(r['consistency_change'])} | {f(r['judge_agreement'])} |"
        )
    lines.append("")
    lines.append(
        f"Mean ± standard deviation over seeds; each seed has its own scenes, models and {n_eval} held-out scenes."
    )
    return "\n".join(lines) + "\n"


def experiment(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(1, args.parallel))
    print(
        f"{len(args.variants) * len(args.seeds)} runs ({', '.join(args.variants)} x seeds {args.seeds}), "
        f"{args.parallel} seed(s) at a time, into {out}",
        file=sys.stderr,
    )

    def one_seed(seed: int) -> list[dict]:
        done = []
        for variant in args.variants:
            done.append(_run_one(variant, seed, args, threads))
            status = done[-1].get("error") or " ".join(
                f"{m}={done[-1]['rows'][0][m]:.3f}->{done[-1]['rows'][-1][m]:.3f}" for m in ("accuracy", "consistency")
            )
            print(f"  {variant} seed {seed}: {status}", file=sys.stderr, flush=True)
        return done

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        runs = [run for seed_runs in pool.map(one_seed, args.seeds) for run in seed_runs]
    table = summarize_runs(runs)
    from src_assets.profiles import PROFILES

    n_eval = next((x for x in args.set if x.startswith("n_eval=")), f"n_eval={PROFILES[args.profile].n_eval}")
    (out / "results.json").write_text(
        json.dumps(
            {
                "iterations": args.iterations,
                "profile": args.profile,
                "settings": args.set,
                "table": table,
                "runs": runs,
            },
            indent=1,
        )
    )
    (out / "results.md").write_text(markdown(table, args.iterations, n_eval.removeprefix("n_eval=")))
    print((out / "results.md").read_text())
    return 0 if all("rows" in r for r in runs) else 1
