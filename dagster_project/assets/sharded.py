"""Candidate search and judging as graph assets, in shards."""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    DynamicOut,
    DynamicOutput,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    Out,
    Output,
    RetryPolicy,
    graph_asset,
    op,
)

from src_assets.candidate_search import sentence_beam_search
from src_assets.fingerprints import derive_seed
from src_assets.judge import Judge
from src_assets.models import load_policy
from src_assets.preference import score_table

from ..executors import shard_device, shard_threads
from ..observe.metadata import counts_table, histogram_md, matrix_md, table_preview
from ..observe.trackers import log_pipeline_metrics
from ..resources import IterationLeaseResource, SettingsResource, StoreResource
from ..versions import reads
from .partitions import GPU_POOL, GPU_STEP_TAGS, ITERATION, iteration_number

# --- Candidate search and judging, in shards -------------------------------------------------------------------
# Each is a graph: one step plans `shards` contiguous ranges of the iteration's prompts, one step per range does
# the work (retried alone if it fails; only a finished shard's output is stored, so a partial one is never read),
# and one step joins the shards in prompt order. With a multi-process, Kubernetes or Celery executor, the shards run
# in processes, pods or workers of their own. A prompt's random stream comes from its id and the iteration, not
# from its shard, so with one prompt per batch (search_batch_size and judge_batch_size small enough) any number of
# shards gives the same tables.

SHARD_RETRIES = RetryPolicy(max_retries=2, delay=1)


def shard_ranges(n: int, shards: int, whole: int = 1) -> list[tuple[int, int]]:
    """``shards`` contiguous, nearly equal ranges of ``n`` prompts (no empty one), cut only between blocks of
    ``whole`` prompts."""
    blocks = -(-n // whole)
    bounds = [min(n, round(i * blocks / shards) * whole) for i in range(shards + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


@op(out=DynamicOut(list))
def plan_shards(context: OpExecutionContext, calibration_prompts: pl.DataFrame, settings: SettingsResource):
    """The shards of the iteration's prompts: [first, end, shard index] of each.

    Shards cut between blocks of the candidate search's generate batch (judging keeps to the same blocks), so that a
    prompt's batches, and with them its samples and scores, are the same for any number of shards at any batch
    size."""
    cfg = settings.config()
    ranges = shard_ranges(calibration_prompts.height, cfg.shards, cfg.search.prompts_per_batch)
    context.log.info(f"{calibration_prompts.height} prompts in {len(ranges)} shard(s): {ranges}")
    for i, (a, b) in enumerate(ranges):
        yield DynamicOutput([a, b, i], mapping_key=f"prompts_{a}_{b}")


def _in_prompt_order(parts: list[pl.DataFrame], prompts: pl.DataFrame) -> pl.DataFrame:
    order = {pid: i for i, pid in enumerate(prompts["id"].to_list())}
    joined = pl.concat(parts, how="vertical")
    return joined.sort(pl.col("prompt_id").replace_strict(order, return_dtype=pl.Int64), maintain_order=True)


def _place_shard(context: OpExecutionContext, shard: list) -> None:
    """Shards that run side by side on one machine share its cores, and its GPUs one each."""
    import torch

    threads = shard_threads(context, GPU_POOL)
    if threads is not None:
        torch.set_num_threads(threads)
        context.log.info(
            f"{threads} torch thread(s) for this shard: the steps the gpu pool lets run beside it share the cores"
        )
    device = shard_device(context, shard[2])
    if device is not None:
        torch.cuda.set_device(device)  # "cuda" (the runtime's "auto") now means this device
        context.log.info(f"this shard runs on cuda:{device}")


@op(retry_policy=SHARD_RETRIES, pool=GPU_POOL, tags=GPU_STEP_TAGS)
def search_shard(
    context: OpExecutionContext,
    calibration_prompts: pl.DataFrame,
    start_policy: str,
    shard: list,
    settings: SettingsResource,
    store: StoreResource,
    iteration_lease: IterationLeaseResource,
) -> pl.DataFrame:
    """Sentence-level beam search over one shard's prompts."""
    cfg, key = settings.config(), context.partition_key
    prompts = calibration_prompts.slice(shard[0], shard[1] - shard[0])
    context.log.info(f"iteration {key}: sampling prompts {shard[0]}-{shard[1] - 1} from {start_policy}")
    _place_shard(context, shard)
    model_dir = store.store().local_model_dir(start_policy)
    seed = derive_seed(cfg.seed, "candidate_pool", key)  # per prompt id below it: not the shard's
    if cfg.search.backend == "vllm":
        from src_assets.processors import load_processor
        from src_assets.vllm_search import load_vllm, vllm_beam_search

        return vllm_beam_search(
            load_vllm(model_dir, cfg.runtime()), load_processor(model_dir), prompts, cfg.search, seed
        )
    model, processor = load_policy(model_dir, cfg.runtime())
    return sentence_beam_search(model, processor, prompts, cfg.search, seed=seed, progress=context.log.info)


@op(
    out={
        "result": Out(pl.DataFrame),
        "candidate_pool_most_prompts_have_two_distinct_candidates": Out(Nothing, is_required=False),
    }
)
def join_candidates(
    context: OpExecutionContext,
    shards: list,
    calibration_prompts: pl.DataFrame,
    start_policy: str,
    store: StoreResource,
):
    pool = _in_prompt_order(shards, calibration_prompts)
    per_prompt = pool.group_by("prompt_id").len()["len"]
    with_two = int((per_prompt >= 2).sum())
    yield Output(
        pool,
        "result",
        metadata={
            "policy": MetadataValue.text(start_policy),
            "prompts": calibration_prompts.height,
            "shards": len(shards),
            "candidates": pool.height,
            "mean_candidates_per_prompt": float(per_prompt.mean() or 0),
            "candidates_per_prompt": counts_table(
                dict(sorted(pl.DataFrame({"k": per_prompt}).group_by("k").len().iter_rows())), "candidates"
            ),
            "preview": table_preview(pool.drop("params")),
        },
        tags=store.tags(),
    )
    yield AssetCheckResult(
        asset_key="candidate_pool",
        check_name="most_prompts_have_two_distinct_candidates",
        passed=with_two >= 0.8 * calibration_prompts.height,
        severity=AssetCheckSeverity.WARN,
        metadata={"prompts_with_two_or_more": with_two, "prompts": calibration_prompts.height},
    )


@graph_asset(
    **ITERATION,
    check_specs=[
        AssetCheckSpec(
            "most_prompts_have_two_distinct_candidates",
            asset="candidate_pool",
            description="At least 80% of prompts have 2 or more distinct complete candidates (WARN).",
        )
    ],
)
@reads(
    "search",
    "runtime",
    "seed",
    "shards",
    stages=("candidate_search", "vllm_search", "generation", "models", "processors"),
)
def candidate_pool(calibration_prompts: pl.DataFrame, start_policy: str):
    """K distinct complete responses per prompt from the start policy, by sentence-level beam search, in shards."""
    shards = plan_shards(calibration_prompts).map(lambda shard: search_shard(calibration_prompts, start_policy, shard))
    pool, check = join_candidates(shards.collect(), calibration_prompts, start_policy)
    return {"result": pool, "candidate_pool_most_prompts_have_two_distinct_candidates": check}


@op(retry_policy=SHARD_RETRIES, pool=GPU_POOL, tags=GPU_STEP_TAGS)
def judge_shard(
    context: OpExecutionContext,
    candidate_pool: pl.DataFrame,
    calibration_prompts: pl.DataFrame,
    judge_checkpoint: str,
    shard: list,
    settings: SettingsResource,
    store: StoreResource,
    iteration_lease: IterationLeaseResource,
) -> pl.DataFrame:
    """Every ordered pair of one shard's prompts' candidates judged; their debiased matrices and scores."""
    cfg = settings.config()
    prompts = calibration_prompts.slice(shard[0], shard[1] - shard[0])
    candidates = candidate_pool.filter(pl.col("prompt_id").is_in(prompts["id"].implode()))
    _place_shard(context, shard)
    judge = Judge.load(judge_checkpoint, cfg.runtime(), cfg.judge, store.store().local_model_dir)
    # in the shards' blocks, so that any number of shards judges each prompt in the same batch
    ids, matrices = judge.matrices(
        candidates, prompts, cfg.scoring, progress=context.log.info, block=cfg.search.prompts_per_batch
    )
    return score_table(ids, matrices, cfg.aggregation)


NO_AGREEMENT = "none: no pair the verifier calls clear (rows without scenes, or every pair a tie)"


@op
def join_scores(
    context: OpExecutionContext,
    shards: list,
    candidate_pool: pl.DataFrame,
    calibration_prompts: pl.DataFrame,
    judge_checkpoint: str,
    settings: SettingsResource,
    store: StoreResource,
) -> Output[pl.DataFrame]:
    cfg = settings.config()
    scores = _in_prompt_order(shards, calibration_prompts)
    # Held out: the judge never trained on calibration prompts. The verifier's side needs no model.
    judge = Judge(cfg.judge)
    agreement = judge.agreement(
        scores["prompt_id"].to_list(), scores["q"].to_list(), candidate_pool, calibration_prompts
    )
    context.log.info(
        f"judge agreement with the verifier on {agreement['clear_pairs']} clear pairs: "
        f"{agreement['judge_agreement']:.3f} (answer-only judge: {agreement['answer_only_agreement']:.3f})"
    )
    sample = scores.filter(pl.col("n_candidates") >= 2).head(1)
    meta = {
        "prompts": scores.height,
        "shards": len(shards),
        "scoring": cfg.scoring,
        "judge": MetadataValue.text(judge_checkpoint),
        # A NaN agreement is no number to show: with no clear pair, a note says why there is none.
        **{k: v if isinstance(v, int) else float(v) for k, v in agreement.items() if v == v},
        **({} if agreement["clear_pairs"] else {"judge_agreement_note": MetadataValue.text(NO_AGREEMENT)}),
        "mean_confidence": float(scores["confidence"].mean() or 0),
        "confidence_histogram": histogram_md(scores["confidence"].to_list(), "confidence"),
    }
    if sample.height:
        row = sample.row(0, named=True)
        texts = candidate_pool.filter(pl.col("prompt_id") == row["prompt_id"]).sort("candidate")["text"].to_list()
        meta["sample_prompt"] = MetadataValue.text(row["prompt_id"])
        meta["sample_matrix_q"] = matrix_md(row["q"], row["win_rate"], row["strength"], texts)
    step = iteration_number(context.partition_key)
    log_pipeline_metrics(cfg, store.store(), step, {"judge_agreement": agreement["judge_agreement"]}, context.log)
    return Output(scores, metadata=meta, tags=store.tags())


@graph_asset(**ITERATION)
@reads(
    "judge",
    "aggregation",
    "runtime",
    "scoring",
    "shards",
    # the search's generate blocks: shards cut between them, and judge batches keep to them
    *("search_batch_size", "beams", "samples_per_beam"),
    stages=("judge", "preference", "verifier"),
)
def pairwise_scores(candidate_pool: pl.DataFrame, calibration_prompts: pl.DataFrame, judge_checkpoint: str):
    """Every ordered pair of each prompt's candidates judged by the judge, in shards; debiased matrices and
    per-candidate scores."""
    shards = plan_shards(calibration_prompts).map(
        lambda shard: judge_shard(candidate_pool, calibration_prompts, judge_checkpoint, shard)
    )
    return join_scores(shards.collect(), candidate_pool, calibration_prompts, judge_checkpoint)
