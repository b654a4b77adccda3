"""One SRC iteration: one partition per iteration, after the SFT and judge checkpoints (``models.py``).

One iteration reads top to bottom (docs/method.md explains each stage):

    start_policy[k]         policy k-1, resolved once (k = 1: the SFT checkpoint) and recorded
    calibration_prompts[k]  iteration k's prompt rows (never the judge's)
    candidate_pool[k]       K responses per prompt from start_policy[k]
    pairwise_scores[k]      every ordered pair judged, debiased, aggregated
    preference_set[k]       confidence-weighted (chosen, rejected) pairs; a blocking check guards training
    policy_checkpoint[k]    weighted DPO from start_policy[k] (also the reference)
    iteration_eval[k]       policy k on the held-out set, and its win rate over start_policy[k]

candidate_pool and pairwise_scores run in shards (``sharded.py``); iteration_eval is in ``evaluation.py``.

Dagster cannot declare "iteration k depends on policy k-1" (a cycle at the asset-key level), so
``start_policy[k]`` looks policy k-1 up in the store at run time and fails with a clear message, writing
nothing, when it is missing; every later step takes it from there. Iterations run one at a time, in order
(``deploy/dagster.yaml``'s run queue), and one run at a time writes an iteration (``IterationLeaseResource``).

Every asset's ``code_version`` follows its code and the settings it reads (``versions.py``), so Dagster marks it
stale when either changes.
"""

import shutil
import tempfile

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Failure,
    MetadataValue,
    Output,
    asset,
)

from src_assets.evaluation import preference_quality
from src_assets.preference import curate_preferences
from src_assets.source_data import SourceDataError, iteration_prompt_rows

from .. import store_layout
from ..observe.metadata import counts_table, histogram_md, table_preview
from ..observe.policy_cards import write_model_card, write_training_report
from ..observe.trackers import log_pipeline_metrics, tracked
from ..resources import IterationLeaseResource, SettingsResource, StoreResource
from ..versions import reads
from .partitions import GPU_POOL, GPU_STEP_TAGS, ITERATION, iteration_key, iteration_number, offer_iteration
from .trained import train


@asset(
    **ITERATION,
)
@reads()
def start_policy(
    context: AssetExecutionContext, sft_checkpoint: str, store: StoreResource, iteration_lease: IterationLeaseResource
) -> Output[str]:
    """The policy iteration k starts from: policy k-1 (the SFT checkpoint for k = 1), resolved once from the store.
    Every later step of the iteration uses this URI."""
    s, key = store.store(), context.partition_key
    k = iteration_number(key)
    if k == 1:
        uri = sft_checkpoint
    else:
        prev = iteration_key(k - 1)
        uri = s.current_model(store_layout.policy_checkpoint(prev))
        if uri is None:
            raise Failure(
                f"iteration {key} needs the policy of iteration {prev}, but policy_checkpoint[{prev}] is not in the store "
                f"({s.uri(store_layout.policy_checkpoint(prev))}); materialize iteration {prev} first (iterations run in order)",
                metadata={"missing_predecessor": MetadataValue.text(prev)},
            )
    return Output(uri, metadata={"policy": MetadataValue.text(uri)}, tags=store.tags())


@asset(
    **ITERATION,
    deps=[start_policy],  # after it: an iteration whose predecessor is missing writes nothing
)
@reads("prompts_per_iteration", "judge_prompts", stages=("source_data",))
def calibration_prompts(
    context: AssetExecutionContext,
    vqa_source: pl.DataFrame,
    settings: SettingsResource,
    store: StoreResource,
    iteration_lease: IterationLeaseResource,
) -> Output[pl.DataFrame]:
    """Iteration k's prompt rows: the k-th slice of the calibrate rows after the judge's own."""
    cfg = settings.config()
    try:
        rows = iteration_prompt_rows(
            vqa_source, iteration_number(context.partition_key), cfg.prompts_per_iteration, cfg.judge_prompts
        )
    except SourceDataError as e:
        raise Failure(str(e)) from e
    metadata = {
        "prompts": rows.height,
        "first_id": rows["id"][0],
        "last_id": rows["id"][-1],
        "kinds": counts_table(dict(rows.group_by("kind").len().sort("kind").iter_rows()), "kind"),
    }
    return Output(rows, metadata=metadata, tags=store.tags())


@asset(
    **ITERATION,
    check_specs=[
        AssetCheckSpec(
            "weights_in_unit_interval",
            asset="preference_set",
            blocking=True,
            description="Every pair weight is in [0, 1]; blocks training otherwise.",
        ),
        AssetCheckSpec(
            "no_wrong_chosen_answer",
            asset="preference_set",
            blocking=True,
            description="No kept pair's chosen response has a wrong answer where the gold answer is known; "
            "blocks training otherwise (a WARN that blocks nothing with require_correct_chosen=false).",
        ),
        AssetCheckSpec(
            "keeps_pairs",
            asset="preference_set",
            description="At least one pair is kept; otherwise this iteration trains nothing (WARN).",
        ),
    ],
)
@reads("curation", "select_by", stages=("preference", "verifier", "evaluation"))
def preference_set(
    context: AssetExecutionContext,
    pairwise_scores: pl.DataFrame,
    candidate_pool: pl.DataFrame,
    calibration_prompts: pl.DataFrame,
    settings: SettingsResource,
    store: StoreResource,
    iteration_lease: IterationLeaseResource,
):
    """Confidence-weighted (chosen, rejected) pairs, with the reason each dropped pair was dropped."""
    cfg = settings.config()
    prefs = curate_preferences(
        candidate_pool, pairwise_scores, calibration_prompts, cfg.curation, cfg.aggregation.select_by
    )
    kept = prefs.filter("kept")
    reasons = prefs.filter(~pl.col("kept")).with_columns(
        pl.col("drop_reason").str.replace(r"\d+\.\d+", "x").str.replace(r"'.*'", "...")
    )
    quality = preference_quality(prefs, calibration_prompts)
    mean_weight = float(kept["weight"].mean()) if kept.height else 0.0
    step = iteration_number(context.partition_key)
    log_pipeline_metrics(cfg, store.store(), step, {"pairs_kept": kept.height, "mean_weight": mean_weight}, context.log)
    yield Output(
        prefs,
        metadata={
            "pairs_considered": prefs.height,
            "pairs_kept": kept.height,
            "mean_weight": mean_weight,
            **{f"kept/{k}": float(v) for k, v in quality.items()},
            "weight_histogram": histogram_md(kept["weight"].to_list(), "weight"),
            "drop_reasons": counts_table(dict(reasons.group_by("drop_reason").len().iter_rows()), "reason"),
            "preview": table_preview(prefs),
        },
        tags=store.tags(),
    )
    outside = prefs.filter((pl.col("weight") < 0) | (pl.col("weight") > 1)).height
    yield AssetCheckResult(
        check_name="weights_in_unit_interval", passed=outside == 0, metadata={"outside_0_1": outside}
    )
    wrong = kept.filter(pl.col("chosen_correct").eq(False)).height  # the same normalize_answer that curation uses
    # An error unless the run chose to keep such pairs (require_correct_chosen=false): then it is reported only.
    reported_only = (
        {}
        if cfg.curation.require_correct_chosen
        else {
            "warns_only_because": "require_correct_chosen=false, as in the smoke profile, whose untrained models "
            "answer wrong: their pairs are kept so that DPO still runs"
        }
    )
    yield AssetCheckResult(
        check_name="no_wrong_chosen_answer",
        passed=wrong == 0,
        metadata={"kept_with_wrong_chosen": wrong, **reported_only},
        severity=AssetCheckSeverity.ERROR if cfg.curation.require_correct_chosen else AssetCheckSeverity.WARN,
    )
    yield AssetCheckResult(
        check_name="keeps_pairs",
        passed=kept.height > 0,
        severity=AssetCheckSeverity.WARN,
        metadata={"pairs_kept": kept.height, "pairs_considered": prefs.height},
    )


@asset(
    **ITERATION,
    pool=GPU_POOL,
    op_tags=GPU_STEP_TAGS,
)
@reads(
    "dpo_epochs",
    "dpo_learning_rate",
    "dpo_batch_size",
    "dpo_args",
    "training",
    "beta",
    "dpo_nll_weight",
    "dpo_positive_lambda",
    "weighted_dpo",
    "use_fused_dpo_kernel",
    "policy_update",
    stages=("weighted_dpo", "training", "evaluation", "model_card"),
)
def policy_checkpoint(
    context: AssetExecutionContext,
    preference_set: pl.DataFrame,
    start_policy: str,
    settings: SettingsResource,
    store: StoreResource,
    iteration_lease: IterationLeaseResource,
) -> Output[str]:
    """Policy k: the start policy trained with confidence-weighted DPO on the kept pairs (and its reference)."""
    cfg, s, key = settings.config(), store.store(), context.partition_key
    trained = bool(preference_set["kept"].any())
    if not trained:  # nothing to learn from: policy k is policy k-1, stored as its own version so k+1 can start
        context.log.warning(f"iteration {key}: the preference set keeps no pair; policy {key} is policy k-1 unchanged")
    with tempfile.TemporaryDirectory() as out:
        if trained:
            result = train(
                context,
                TRAINING_OF[cfg.policy_update],
                s.local_model_dir(start_policy),
                preference_set,
                out,
                tracked(cfg.dpo_settings(), cfg, s, "policy_checkpoint", key),
                **(_dpo_options(cfg) if cfg.policy_update == "dpo" else {}),
            )
            report = {"stage": cfg.policy_update, **{k: result[k] for k in ("train_loss", "steps", "pairs")}}
        else:
            shutil.copytree(s.local_model_dir(start_policy), out, dirs_exist_ok=True)
            report = {"stage": "not trained: no pair kept", "pairs": 0}
        write_training_report(out, cfg, iteration_number(key), start_policy, **report)
        uri = s.put_model(store_layout.policy_checkpoint(key), out)
    write_model_card(s, uri, cfg, f"SRC policy, iteration {key}")
    offer_iteration(context, iteration_number(key) + 1)
    metadata = {
        "model": MetadataValue.text(uri),
        "started_from": MetadataValue.text(start_policy),
        "trained": trained,
        **({"policy_update": cfg.policy_update} if trained else {}),
        **{k: v for k, v in report.items() if k != "stage"},
    }
    return Output(uri, metadata=metadata, tags=store.tags())


# Each policy_update setting's training, in the table of trainings (trained.py).
TRAINING_OF = {"dpo": "weighted_dpo", "gold_sft": "gold_bound"}


def _dpo_options(cfg) -> dict:
    return dict(
        beta=cfg.beta,
        use_fused_kernel=cfg.use_fused_dpo_kernel,
        weighted=cfg.weighted_dpo,
        nll_weight=cfg.dpo_nll_weight,
        dpop_lambda=cfg.dpo_positive_lambda,
    )
