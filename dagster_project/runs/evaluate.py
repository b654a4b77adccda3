"""``src-calibrate evaluate``: a checkpoint scored on fresh held-out scenes or on your rows."""

import json
from pathlib import Path

from .run import overrides_from, quiet_libraries, usage_error


def evaluate(args) -> int:
    from src_assets.base_stage import evaluate_captions
    from src_assets.evaluation import evaluate_policy, full_anatomy, with_blank_images
    from src_assets.models import Runtime, load_policy
    from src_assets.source_data import synthetic_source
    from src_assets.storage import Store

    if args.n < 1 or args.samples < 0 or not args.temperature > 0:
        return usage_error(
            f"--n must be >= 1, --samples >= 0 and --temperature > 0 (got {args.n}, {args.samples}, {args.temperature})"
        )
    quiet_libraries()  # no weight-loading bars around the one line of scores
    store = Store(args.store) if args.store else Store()
    store.check_reachable()
    if args.data:
        return _evaluate_on_data(args, store)
    if args.against or args.set:
        return usage_error("--against and --set go with --data (your rows); the synthetic scenes need neither")
    model, processor = load_policy(_model_dir(store, args.checkpoint), Runtime(args.device, args.dtype))
    held_out = synthetic_source(args.seed, 0, 0, args.n)
    if args.images == "blank":
        held_out = with_blank_images(held_out)
    row = {"checkpoint": args.checkpoint, "seed": args.seed, "images": args.images, "task": args.task}
    if args.task == "caption":
        summary, _ = evaluate_captions(model, processor, held_out)
        row.update(summary)
        print(json.dumps(row, indent=1) if args.json else _line(row))
        return 0
    summary, scored = evaluate_policy(model, processor, held_out)
    row.update(summary)
    if args.anatomy:
        row["anatomy"] = full_anatomy(
            model, processor, held_out, scored, args.samples, args.temperature, seed=args.seed
        )
    if args.json:
        print(json.dumps(row, indent=1))
        return 0
    print(_line({k: v for k, v in row.items() if k != "anatomy"}))
    if args.anatomy:
        print(anatomy_table(row["anatomy"]))
    return 0


def _model_dir(store, reference: str) -> str:
    """A checkpoint as a local model directory: a stored version (checked against its manifest), a model asset's
    folder (its current version), or your own model directory; a hub id, or a path that does not exist, is left
    for ``load_policy`` to load or to name."""
    if "://" not in reference and not Path(reference).is_dir():
        return reference
    return store.local_model_dir(store.current_version(reference))


def _evaluate_on_data(args, store) -> int:
    """``evaluate --data``: the checkpoint on the user's rows of one split (accuracy from their ``answer``), and
    with ``--against``, the judge's win rate of the checkpoint over another one on the same rows."""
    import polars as pl

    from src_assets.evaluation import evaluate_policy, full_anatomy
    from src_assets.generation import generate_responses
    from src_assets.judge import Judge
    from src_assets.models import Runtime, load_policy
    from src_assets.profiles import profile
    from src_assets.source_data import SourceDataError, combine_sources
    from src_assets.source_files import local_sources, source_options
    from src_assets.verifier import VERIFIER_JUDGE, check_scenes_to_judge

    try:
        cfg = profile("default", **overrides_from(args.set))
        options = source_options(cfg)
        sources = local_sources(args.data, cfg)
        rows = combine_sources([(src.name, src.read(options)) for src in sources])
    except (ValueError, SourceDataError) as e:
        return usage_error(str(e))
    rows = rows.filter(pl.col("split") == args.split).head(args.n)
    if rows.is_empty():
        return usage_error(f"{args.data} has no rows with split {args.split!r}")
    if args.against and args.judge == VERIFIER_JUDGE:
        try:
            check_scenes_to_judge(rows, f"{args.split!r} rows of {args.data}")
        except ValueError as e:
            return usage_error(str(e))
    runtime = Runtime(args.device, args.dtype)
    model, processor = load_policy(_model_dir(store, args.checkpoint), runtime)
    summary, scored = evaluate_policy(model, processor, rows)
    row = {"checkpoint": args.checkpoint, "data": args.data, "split": args.split, **summary}
    if args.anatomy:
        row["anatomy"] = full_anatomy(model, processor, rows, scored, args.samples, args.temperature, seed=args.seed)
    if args.against:
        other, other_processor = load_policy(_model_dir(store, args.against), runtime)
        old = generate_responses(other, other_processor, rows["question"].to_list(), rows["image"].to_list())
        judge = Judge.load(args.judge, runtime, cfg.judge, lambda ref: _model_dir(store, ref))
        row.update(against=args.against, judge=args.judge)
        row["judge_win_rate"] = judge.win_rate(rows, scored["response"].to_list(), old)
    print(json.dumps(row, indent=1) if args.json else _line({k: v for k, v in row.items() if k != "anatomy"}))
    return 0


def _line(row: dict) -> str:
    return "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def anatomy_table(anatomy: dict) -> str:
    """The anatomy as a plain-text table: one row per measure, one column per question kind."""
    from src_assets.evaluation import ANATOMY_ROWS

    rows = [*ANATOMY_ROWS, *(["any_correct_and_consistent_in_k"] if "k" in anatomy.get("all", {}) else [])]
    kinds = list(anatomy)
    width = max(map(len, rows)) + 2
    if "k" in anatomy.get("all", {}):
        rows[-1] = f"any_correct_and_consistent_in_{anatomy['all']['k']}"
    lines = ["".ljust(width) + "".join(f"{k:>11}" for k in kinds)]
    for label, key in zip(rows, [*ANATOMY_ROWS, "any_correct_and_consistent_in_k"]):
        lines.append(
            label.ljust(width)
            + "".join(f"{anatomy[k][key]:>11.3f}" if anatomy[k].get(key) is not None else f"{'':>11}" for k in kinds)
        )
    lines.append("n".ljust(width) + "".join(f"{anatomy[k].get('n', 0):>11}" for k in kinds))
    return "\n".join(lines)
