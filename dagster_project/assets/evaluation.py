"""Every policy on the held-out set: the SFT checkpoint (iteration 0) with its blank-image check, and each
iteration's policy with its win rate over the policy it started from.
"""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    MetadataValue,
    Output,
    asset,
    asset_check,
)

from src_assets.evaluation import (
    evaluate_policy,
    full_anatomy,
    score_responses,
    summarize,
    with_blank_images,
)
from src_assets.generation import generate_responses
from src_assets.judge import Judge
from src_assets.models import load_policy

from .. import store_layout
from ..observe.metadata import anatomy_metadata, metric_values, table_preview
from ..observe.policy_cards import write_model_card
from ..observe.trackers import log_pipeline_metrics
from ..resources import IterationLeaseResource, SettingsResource, StoreResource
from ..versions import reads
from .models import sft_checkpoint
from .partitions import GPU_POOL, GPU_STEP_TAGS, iteration_key, iteration_number, iteration_partitions


def _anatomy(model, processor, eval_set: pl.DataFrame, scored: pl.DataFrame, cfg, context) -> dict:
    return full_anatomy(
        model,
        processor,
        eval_set,
        scored,
        cfg.anatomy_samples,
        cfg.anatomy_temperature,
        cfg.eval_max_new_tokens,
        seed=cfg.seed,
        progress=context.log.info,
    )


@asset(group_name="evaluation", pool=GPU_POOL, op_tags=GPU_STEP_TAGS)
@reads(
    "runtime",
    "eval_max_new_tokens",
    "anatomy_samples",
    "anatomy_temperature",
    "seed",
    stages=("evaluation", "generation", "verifier", "models", "model_card"),
)
def sft_eval(
    context: AssetExecutionContext,
    sft_checkpoint: str,
    eval_set: pl.DataFrame,
    settings: SettingsResource,
    store: StoreResource,
):
    """Iteration 0: the SFT checkpoint on the held-out set."""
    cfg = settings.config()
    model, processor = load_policy(store.store().local_model_dir(sft_checkpoint), cfg.runtime())
    summary, scored = evaluate_policy(model, processor, eval_set, cfg.eval_max_new_tokens, progress=context.log.info)
    parts = _anatomy(model, processor, eval_set, scored, cfg, context)
    log_pipeline_metrics(cfg, store.store(), 0, tracked_metrics(summary), context.log)
    yield Output(
        scored.with_columns(pl.lit(sft_checkpoint).alias("checkpoint")),
        metadata={**metric_values(summary), **anatomy_metadata(parts), "preview": table_preview(scored)},
        tags=store.tags(),
    )
    update_card(store.store(), sft_checkpoint, cfg, "SFT checkpoint")


def update_card(s, uri: str, cfg, name: str) -> None:
    """The policy's model card again, now with the evaluation just stored (a model outside the store has none)."""
    if uri.startswith(s.base_uri + "/"):
        write_model_card(s, uri, cfg, name)


def tracked_metrics(summary: dict) -> dict:
    return {m: summary.get(m) for m in ("accuracy", "factuality", "consistency")}


@asset_check(
    asset=sft_checkpoint,
    name="uses_its_image",  # its step is then sft_checkpoint_uses_its_image, not the asset's name twice
    additional_ins={"eval_set": AssetIn("eval_set"), "sft_eval": AssetIn("sft_eval")},
    description="The SFT policy uses its image: held-out accuracy drops by at least min_blank_image_drop "
    "when every image is replaced by a blank one. A policy that ignores its image leaves "
    "calibration nothing to fix.",
)
def sft_checkpoint_uses_its_image(
    context,
    sft_checkpoint: str,
    eval_set: pl.DataFrame,
    sft_eval: pl.DataFrame,
    settings: SettingsResource,
    store: StoreResource,
) -> AssetCheckResult:
    cfg = settings.config()
    model, processor = load_policy(store.store().local_model_dir(sft_checkpoint), cfg.runtime())
    real = summarize(sft_eval)["accuracy"]
    blank, _ = evaluate_policy(
        model, processor, with_blank_images(eval_set), cfg.eval_max_new_tokens, progress=context.log.info
    )
    drop = real - blank["accuracy"]
    return AssetCheckResult(
        passed=bool(drop >= cfg.min_blank_image_drop),
        metadata={
            "accuracy": real,
            "accuracy_blank_images": blank["accuracy"],
            "drop": drop,
            "required_drop": cfg.min_blank_image_drop,
        },
    )


def _start_policy_answers(context, store, cfg, start_policy: str, eval_set: pl.DataFrame) -> pl.DataFrame:
    """The start policy's scored answers on the held-out rows: its stored evaluation where it is of exactly this
    checkpoint on exactly these rows, else generated again (e.g. the held-out set changed since)."""
    before = _start_policy_evaluation(store, context.partition_key, start_policy, eval_set)
    if before is not None:
        return before
    previous, processor = load_policy(store.local_model_dir(start_policy), cfg.runtime())
    questions, images = eval_set["question"].to_list(), eval_set["image"].to_list()
    answers = generate_responses(
        previous, processor, questions, images, cfg.eval_max_new_tokens, progress=context.log.info
    )
    return score_responses(eval_set, answers)


def _start_policy_evaluation(store, key: str, start_policy: str, eval_set: pl.DataFrame) -> pl.DataFrame | None:
    """The stored held-out evaluation of the start policy (sft_eval, or iteration_eval[k-1]) if it evaluated
    exactly this checkpoint on exactly these rows; its greedy responses need not be generated again."""
    k = iteration_number(key)
    table = (
        store_layout.asset_table("sft_eval")
        if k == 1
        else store_layout.asset_table("iteration_eval", iteration_key(k - 1))
    )
    if not store.exists(table):
        return None
    before = store.read_table(table)
    same = (
        "checkpoint" in before.columns
        and before["checkpoint"].unique().to_list() == [start_policy]
        and before["id"].to_list() == eval_set["id"].to_list()
    )
    return before if same else None


@asset(
    group_name="evaluation",
    partitions_def=iteration_partitions,
    pool=GPU_POOL,
    op_tags=GPU_STEP_TAGS,
    check_specs=[
        AssetCheckSpec(
            "no_regression",
            asset="iteration_eval",
            description="Accuracy and consistency do not fall below the start policy's by more than the tolerance (WARN).",
        )
    ],
)
@reads(
    "runtime",
    "judge",
    "eval_max_new_tokens",
    "anatomy_samples",
    "anatomy_temperature",
    "regression_tolerance",
    "seed",
    stages=("evaluation", "generation", "judge", "verifier", "model_card"),
)
def iteration_eval(
    context: AssetExecutionContext,
    policy_checkpoint: str,
    start_policy: str,
    eval_set: pl.DataFrame,
    judge_checkpoint: str,
    settings: SettingsResource,
    store: StoreResource,
    iteration_lease: IterationLeaseResource,
):
    """Policy k on the held-out set: accuracy, factuality, completeness, consistency, and the judge's win rate over the
    start policy."""
    s, key, cfg = store.store(), context.partition_key, settings.config()
    model, processor = load_policy(s.local_model_dir(policy_checkpoint), cfg.runtime())
    summary, scored = evaluate_policy(model, processor, eval_set, cfg.eval_max_new_tokens, progress=context.log.info)
    parts = _anatomy(model, processor, eval_set, scored, cfg, context)
    before = _start_policy_answers(context, s, cfg, start_policy, eval_set)
    judge = Judge.load(judge_checkpoint, cfg.runtime(), cfg.judge, s.local_model_dir)
    win = judge.win_rate(
        eval_set, scored["response"].to_list(), before["response"].to_list(), progress=context.log.info
    )
    yield Output(
        scored.with_columns(
            pl.lit(key).alias("iteration"),
            pl.lit(win).alias("judge_win_rate_vs_previous"),
            pl.lit(policy_checkpoint).alias("checkpoint"),
        ),
        metadata={
            **metric_values(summary),
            **anatomy_metadata(parts),
            "judge_win_rate_vs_previous": float(win),
            "checkpoint": MetadataValue.text(policy_checkpoint),
            "compared_with": MetadataValue.text(start_policy),
            "preview": table_preview(scored),
        },
        tags=store.tags(),
    )
    log_pipeline_metrics(cfg, s, iteration_number(key), tracked_metrics(summary), context.log)
    update_card(s, policy_checkpoint, cfg, f"SRC policy, iteration {key}")
    previous = summarize(before)
    # A metric that cannot be computed (null: e.g. consistency without a verifier) is skipped, not failed.
    drops = {m: previous[m] - summary[m] for m in ("accuracy", "consistency") if None not in (previous[m], summary[m])}
    yield AssetCheckResult(
        check_name="no_regression",
        severity=AssetCheckSeverity.WARN,
        passed=all(d <= cfg.regression_tolerance for d in drops.values()),
        metadata={
            **{f"{m}_drop": float(d) for m, d in drops.items()},
            "tolerance": cfg.regression_tolerance,
            "compared_with": MetadataValue.text(start_policy),
        },
    )
