"""The SRC loop as assets: SFT and judge checkpoints, then one partition per iteration.

One iteration reads top to bottom (docs/method.md explains each stage):

    start_policy[k]         policy k-1, resolved once (k = 1: the SFT checkpoint) and recorded
    calibration_prompts[k]  iteration k's prompt rows (never the judge's)
    candidate_pool[k]       K responses per prompt from start_policy[k]
    pairwise_scores[k]      every ordered pair judged, debiased, aggregated
    preference_set[k]       confidence-weighted (chosen, rejected) pairs; a blocking check guards training
    policy_checkpoint[k]    weighted DPO from start_policy[k] (also the reference)
    iteration_eval[k]       policy k on the held-out set, and its win rate over start_policy[k]

Dagster cannot declare "iteration k depends on policy k-1" (a cycle at the asset-key level), so
``start_policy[k]`` looks policy k-1 up in the store at run time and fails with a clear message, writing
nothing, when it is missing; every later step takes it from there. Iterations run one at a time, in order
(``dagster.yaml``'s run queue), and one run at a time writes an iteration (``IterationLeaseResource``).

Every asset's ``code_version`` follows its code and the settings it reads (``versions.py``), so Dagster marks it
stale when either changes.
"""

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    DynamicOut,
    DynamicOutput,
    DynamicPartitionsDefinition,
    Failure,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    Out,
    Output,
    RetryPolicy,
    asset,
    asset_check,
    graph_asset,
    op,
)

from src_assets.base_stage import StopWhenPerceiving, evaluate_captions, probe_scenes, train_base_policy
from src_assets.candidate_search import sentence_beam_search
from src_assets.config import TINY
from src_assets.evaluation import (
    evaluate_policy,
    full_anatomy,
    preference_quality,
    score_responses,
    summarize,
    with_blank_images,
)
from src_assets.fingerprints import derive_seed, digest, table_digest
from src_assets.generation import generate_responses
from src_assets.judge import Judge, is_oracle, train_judge, verdict_fit
from src_assets.judge_corpus import judge_training_set
from src_assets.models import ModelLoadError, load_judge_model, load_model_config, load_policy, load_tokenizer
from src_assets.preference import curate_preferences, score_table
from src_assets.rationale_sft import train_rationale_sft
from src_assets.source_data import SourceDataError, iteration_prompt_rows, judge_prompt_rows
from src_assets.storage import StoreError, directory_digest
from src_assets.tiny_models import build_tiny_policy
from src_assets.weighted_dpo import train_gold_bound, train_weighted_dpo

from . import store_layout
from .assets import count_parameters
from .executors import shard_device, shard_threads
from .metadata import anatomy_metadata, counts_table, histogram_md, matrix_md, metric_values, table_preview
from .model_cards import write_model_card, write_training_report
from .resources import IterationLeaseResource, SettingsResource, StoreResource
from .tracking import log_pipeline_metrics, tracked
from .train_worker import run_training
from .training_log import DagsterLogCallback
from .versions import reads, reuse_digest

iteration_partitions = DynamicPartitionsDefinition(name="iteration")
GPU_POOL = "gpu"  # every asset that runs a model shares this concurrency pool
# On Kubernetes (SRC_EXECUTOR=k8s) each model step's pod asks for SRC_GPUS_PER_STEP GPUs (set it to
# train_processes for multi-process training); other executors ignore the tag.
GPU_STEP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": os.environ.get("SRC_GPUS_PER_STEP", "1")}}}
    }
}


def iteration_key(k: int) -> str:
    return f"{k:03d}"


def next_iteration(store) -> str:
    """The first iteration whose policy is not committed in the store: after a failed iteration it is that one
    again (retried, not skipped), and iterations stay in order."""
    k = 1
    while store.current_model(store_layout.policy_checkpoint(iteration_key(k))) is not None:
        k += 1
    return iteration_key(k)


def _offer_iteration(context, k: int) -> None:
    """Adds iteration k to the iteration partitions once the policy it starts from is committed (the SFT checkpoint
    offers 1, policy k offers k + 1), so the iteration job's Launchpad and the asset pages offer it: a dynamic
    partition exists only once added. Adding one that exists changes nothing."""
    context.instance.add_dynamic_partitions(iteration_partitions.name, [iteration_key(k)])


def iteration_number(key: str) -> int:
    if not key.isdigit() or int(key) < 1:
        raise Failure(f"iteration partition keys are zero-padded positive numbers like '001', got {key!r}")
    return int(key)


def _trained_before(context, store, key: str, fingerprint: str, cfg) -> dict | None:
    """The record (``uri`` and what the training reported) of the model a previous run trained from exactly these
    inputs, if the store still holds it intact. An unreadable record, or a model that fails its manifest check,
    counts as absent: the step trains again, and says why."""
    record = store_layout.trained_from(key, fingerprint)
    if not cfg.reuse_checkpoints or not store.exists(record):
        return None
    try:
        found = store.read_json(record)
        if not isinstance(found, dict) or not isinstance(found.get("uri"), str):
            raise StoreError(f"{store.uri(record)} names no model: {str(found)[:80]!r}")
        store.local_model_dir(found["uri"])
    except StoreError as e:
        context.log.warning(f"{key}: not reusing the model trained earlier from these inputs, training again: {e}")
        return None
    context.log.info(
        f"{key}: reusing {found['uri']}, trained earlier from the same inputs and settings "
        f"(reuse_checkpoints=false retrains)"
    )
    return found


_TRAININGS = {
    "rationale_sft": lambda model, rows, out, settings, callbacks, **_: train_rationale_sft(
        model, rows, out, settings, callbacks
    ),
    "judge": lambda model, rows, out, settings, callbacks, **_: train_judge(model, rows, out, settings, callbacks),
    "weighted_dpo": lambda model, rows, out, settings, callbacks, **options: train_weighted_dpo(
        model, rows, out, settings, callbacks=callbacks, **options
    ),
    "gold_bound": lambda model, rows, out, settings, callbacks, **_: train_gold_bound(
        model, rows, out, settings, callbacks
    ),
}


def _train(context, stage: str, model: str, rows: pl.DataFrame, out: str, settings, **options) -> dict:
    """A training here, or with ``train_processes`` > 1 in that many processes under ``accelerate launch`` (a
    Dagster Pipes subprocess that reports its log and metrics back to this step)."""
    if settings.processes > 1:
        return run_training(context, stage, model, rows, out, settings, **options)
    callbacks = [
        DagsterLogCallback(context.log, f"{stage} {context.partition_key if context.has_partition_key else ''}".strip())
    ]
    return _TRAININGS[stage](model, rows, out, settings, callbacks, **options)


def _remember_trained(store, key: str, fingerprint: str, uri: str, **reported) -> None:
    store.write_json(store_layout.trained_from(key, fingerprint), {"uri": uri, **reported})


def _model_recipe(ref: str) -> dict:
    """What a model reference is: a directory of yours is its content (weights changed in place are a new
    model); a store version or a hub id is its reference."""
    return {"ref": ref, **({"content": directory_digest(ref)} if Path(ref).is_dir() else {})}


def _tiny_recipe(cfg, architecture: str) -> dict:
    """A tiny model is rebuilt each run from its architecture, sizes and seed: those are what it is."""
    return {"ref": TINY, "tiny": asdict(cfg.tiny_spec()), "seed": cfg.seed, "architecture": architecture}


BASE_SCORES = ("caption_factuality", "caption_exact_listing", "direct_accuracy", "direct_accuracy_blank_images")


@asset(
    group_name="training",
    pool=GPU_POOL,
    op_tags=GPU_STEP_TAGS,
    check_specs=[
        AssetCheckSpec(
            "base_policy_lists_the_scene",
            asset="base_policy_checkpoint",
            description="The trained tiny base policy's held-out captions list the scene exactly "
            "at least min_base_exact_listing of the time (WARN).",
        )
    ],
)
@reads(
    "policy_model",
    "tiny_policy_architecture",
    "tiny",
    "base_epochs",
    "base_learning_rate",
    "base_batch_size",
    "base_lr_scheduler",
    "base_args",
    "training",
    "base_stop_at_exact_listing",
    "base_check_every",
    "min_objects",
    "max_objects",
    "eval_max_new_tokens",
    "min_base_exact_listing",
    stages=("base_stage", "tiny_models", "models", "processors", "training", "evaluation", "verifier", "fingerprints"),
)
def base_policy_checkpoint(
    context: AssetExecutionContext,
    perception_corpus: pl.DataFrame,
    eval_set: pl.DataFrame,
    settings: SettingsResource,
    store: StoreResource,
):
    """The policy before rationale SFT. With the tiny default, a VLM pretrained on the perception corpus (captions
    and direct answers: what a capable VLM brings), cached in the store by its inputs; its held-out caption scores
    and direct-answer accuracy (real and blank images) are its metadata. A real model is used as it is."""
    cfg, s = settings.config(), store.store()
    if cfg.policy_model != TINY:
        try:
            config = load_model_config(cfg.policy_model).to_dict()
        except ModelLoadError as e:
            raise Failure(str(e)) from e
        yield Output(
            cfg.policy_model,
            metadata={
                "model": MetadataValue.text(cfg.policy_model),
                "trained": False,
                "architecture": ",".join(config.get("architectures") or ["?"]),
            },
            tags=store.tags(),
        )
        yield AssetCheckResult(
            check_name="base_policy_lists_the_scene", passed=True, metadata={"skipped": "a real model: no base stage"}
        )
        return
    fingerprint = digest(
        _tiny_recipe(cfg, cfg.tiny_policy_architecture),
        reuse_digest("base_policy_checkpoint", cfg),
        table_digest(perception_corpus),
    )
    found = _trained_before(context, s, store_layout.BASE_POLICY_CHECKPOINT, fingerprint, cfg)
    if found is None:
        with tempfile.TemporaryDirectory() as tmp:
            build_tiny_policy(f"{tmp}/init", cfg.tiny_policy_architecture, cfg.tiny_spec(), seed=cfg.seed)
            stop = None
            if cfg.base_stop_at_exact_listing > 0:
                stop = StopWhenPerceiving(
                    probe_scenes(100, cfg.seed, cfg.min_objects, cfg.max_objects),
                    cfg.base_check_every,
                    cfg.base_stop_at_exact_listing,
                )
            result = train_base_policy(
                f"{tmp}/init",
                perception_corpus,
                f"{tmp}/base",
                tracked(cfg.base_settings(), cfg, s, "base_policy_checkpoint"),
                callbacks=[DagsterLogCallback(context.log, "base stage")],
                stop=stop,
            )
            uri = s.put_model(store_layout.BASE_POLICY_CHECKPOINT, f"{tmp}/base")
        model, processor = load_policy(s.local_model_dir(uri), cfg.runtime())
        captions, _ = evaluate_captions(model, processor, eval_set, cfg.eval_max_new_tokens, progress=context.log.info)
        direct, _ = evaluate_policy(model, processor, eval_set, cfg.eval_max_new_tokens, progress=context.log.info)
        blank, _ = evaluate_policy(model, processor, with_blank_images(eval_set), cfg.eval_max_new_tokens)
        scores = dict(
            zip(BASE_SCORES, (captions["factuality"], captions["exact_listing"], direct["accuracy"], blank["accuracy"]))
        )
        found = {
            "uri": uri,
            "train_loss": result["train_loss"],
            "steps": result["steps"],
            **scores,
            "loss_curve": [(h["step"], h["loss"]) for h in result["log"] if "loss" in h],
            "probe_checks": result["probe_checks"],
        }
        _remember_trained(s, store_layout.BASE_POLICY_CHECKPOINT, fingerprint, **found)
        reused = False
    else:
        reused = True
    scores = {k: found[k] for k in BASE_SCORES if found.get(k) is not None}
    model_dir = Path(s.local_model_dir(found["uri"]))
    architecture = ",".join(json.loads((model_dir / "config.json").read_text()).get("architectures") or ["?"])
    yield Output(
        found["uri"],
        metadata={
            "model": MetadataValue.text(found["uri"]),
            "trained": True,
            "reused": reused,
            "inputs_fingerprint": fingerprint,
            "architecture": architecture,
            "parameters": count_parameters(model_dir),
            "train_loss": float(found["train_loss"]),
            "steps": int(found["steps"]),
            **{k: float(v) for k, v in scores.items()},
            "loss_curve": MetadataValue.md(
                "| step | loss |\n|---|---|\n" + "\n".join(f"| {st} | {l:.4f} |" for st, l in found["loss_curve"])
            ),
            "probe_exact_listing": MetadataValue.md(
                "| step | probe captions listing the scene exactly |\n|---|---|\n"
                + "\n".join(f"| {st} | {e:.2f} |" for st, e in found.get("probe_checks", []))
            ),
        },
        tags=store.tags(),
    )
    exact = found.get("caption_exact_listing")
    if exact is None:  # not nan with no reason: a caption is checked against a scene, and these rows have none
        yield AssetCheckResult(
            check_name="base_policy_lists_the_scene",
            severity=AssetCheckSeverity.WARN,
            passed=True,
            metadata={"skipped": "the eval rows have no scenes to check a caption against"},
        )
        return
    yield AssetCheckResult(
        check_name="base_policy_lists_the_scene",
        severity=AssetCheckSeverity.WARN,
        passed=exact >= cfg.min_base_exact_listing,
        metadata={"caption_exact_listing": float(exact), "required": cfg.min_base_exact_listing},
    )


@asset(
    group_name="training",
    pool=GPU_POOL,
    op_tags=GPU_STEP_TAGS,
)
@reads(
    "sft_epochs",
    "sft_learning_rate",
    "sft_batch_size",
    "sft_args",
    "training",
    stages=("rationale_sft", "training", "models", "evaluation", "model_card", "fingerprints"),
)
def sft_checkpoint(
    context: AssetExecutionContext,
    rationale_sft_set: pl.DataFrame,
    base_policy_checkpoint: str,
    settings: SettingsResource,
    store: StoreResource,
) -> Output[str]:
    """Policy 0: the base VLM fine-tuned to write a rationale before its answer (TRL SFTTrainer)."""
    cfg, s = settings.config(), store.store()
    fingerprint = digest(
        _model_recipe(base_policy_checkpoint), reuse_digest("sft_checkpoint", cfg), table_digest(rationale_sft_set)
    )
    found = _trained_before(context, s, store_layout.SFT_CHECKPOINT, fingerprint, cfg)
    if found is not None:
        context.add_output_metadata(
            {"model": MetadataValue.text(found["uri"]), "reused": True, "inputs_fingerprint": fingerprint}
        )
        _offer_iteration(context, 1)
        return Output(found["uri"], tags=store.tags())
    with tempfile.TemporaryDirectory() as out:
        result = _train(
            context,
            "rationale_sft",
            s.local_model_dir(base_policy_checkpoint),
            rationale_sft_set,
            out,
            tracked(cfg.sft_settings(), cfg, s, "sft_checkpoint"),
        )
        write_training_report(
            out,
            cfg,
            0,
            base_policy_checkpoint,
            stage="rationale SFT",
            train_loss=result["train_loss"],
            steps=result["steps"],
        )
        uri = s.put_model(store_layout.SFT_CHECKPOINT, out)
    write_model_card(s, uri, cfg, "SFT checkpoint")
    _remember_trained(s, store_layout.SFT_CHECKPOINT, fingerprint, uri)
    context.add_output_metadata(
        {
            "model": MetadataValue.text(uri),
            "reused": False,
            "inputs_fingerprint": fingerprint,
            "train_loss": result["train_loss"],
            "steps": result["steps"],
        }
    )
    _offer_iteration(context, 1)
    return Output(uri, tags=store.tags())


@asset(
    group_name="training",
    pool=GPU_POOL,
    op_tags=GPU_STEP_TAGS,
)
@reads(
    "judge_model",
    "tiny_judge_architecture",
    "tiny",
    "judge_prompts",
    "judge_max_pairs",
    "judge_contrast_pairs",
    "judge_epochs",
    "judge_learning_rate",
    "judge_train_batch_size",
    "judge_args",
    "judgements_prefix",
    "training",
    "judge",
    "search",
    stages=("judge", "judge_corpus", "source_data", "candidate_search", "generation", "training", "verifier"),
)
def judge_checkpoint(
    context: AssetExecutionContext,
    sft_checkpoint: str,
    base_judge_checkpoint: str,
    vqa_source: pl.DataFrame,
    judgement_tables: pl.DataFrame,
    settings: SettingsResource,
    store: StoreResource,
) -> Output[str]:
    """The judge: an LM trained on verifier-labelled pairs of SFT candidates, or a pretrained judge used
    zero-shot."""
    cfg, s = settings.config(), store.store()
    if is_oracle(cfg.judge_model):
        context.add_output_metadata({"model": MetadataValue.text(cfg.judge_model), "trained": False})
        return Output(cfg.judge_model, tags=store.tags())  # the oracle: the domain verifier judges every pair
    if cfg.judge_model != "tiny" and cfg.judge_epochs == 0:
        context.add_output_metadata({"model": MetadataValue.text(base_judge_checkpoint), "trained": False})
        return Output(base_judge_checkpoint, tags=store.tags())  # a pretrained judge, used zero-shot
    prompts = judge_prompt_rows(vqa_source, cfg.judge_prompts)
    base_judge = (
        _tiny_recipe(cfg, cfg.tiny_judge_architecture) if cfg.judge_model == TINY else _model_recipe(cfg.judge_model)
    )
    fingerprint = digest(
        sft_checkpoint,
        base_judge,
        reuse_digest("judge_checkpoint", cfg),
        table_digest(prompts),
        table_digest(vqa_source.filter(pl.col("split") == "sft")),
        table_digest(judgement_tables),
    )
    found = _trained_before(context, s, store_layout.JUDGE_CHECKPOINT, fingerprint, cfg)
    if found is not None:
        context.add_output_metadata(
            {"model": MetadataValue.text(found["uri"]), "reused": True, "inputs_fingerprint": fingerprint}
        )
        return Output(found["uri"], tags=store.tags())
    base_dir = s.local_model_dir(base_judge_checkpoint)
    judgements, sources = judge_training_set(
        load_tokenizer(base_dir),
        cfg.judge,
        policy_dir=s.local_model_dir(sft_checkpoint),
        runtime=cfg.runtime(),
        search=cfg.search,
        prompts=prompts,
        contrast_rows=vqa_source.filter(pl.col("split") == "sft"),
        user_table=judgement_tables,
        max_pairs=cfg.judge_max_pairs,
        contrast_pairs=cfg.judge_contrast_pairs,
        seed=cfg.seed,
        progress=context.log.info,
    )
    if judgements.is_empty():
        raise Failure(
            f"nothing to train the judge on: the calibrate rows have no scene for the verifier to label, and "
            f"{s.uri(cfg.judgements_prefix)} holds no judgement table: add one (README: A judge for your data), or "
            f"give a pretrained judge (judge_model=<dir or hub id>) with judge_epochs=0"
        )
    with tempfile.TemporaryDirectory() as out:
        result = _train(
            context,
            "judge",
            base_dir,
            judgements,
            out,
            tracked(cfg.judge_settings(), cfg, s, "judge_checkpoint"),
        )
        fit = verdict_fit(*load_judge_model(out, cfg.runtime()), judgements, seed=cfg.seed)
        uri = s.put_model(store_layout.JUDGE_CHECKPOINT, out)
    _remember_trained(s, store_layout.JUDGE_CHECKPOINT, fingerprint, uri)
    if fit and fit["fit"] < fit["prior_fit"] + 0.05:
        context.log.warning(
            f"the judge reads back {fit['fit']:.3f} of its own training verdicts, where always saying the "
            f"commonest one gets {fit['prior_fit']:.3f} (verdict spread {fit['verdict_spread']:.3f}): it has learned "
            f"the label prior, not what its prompts say"
        )
    verdicts = dict(judgements.group_by("verdict").len().iter_rows())
    context.add_output_metadata(
        {
            "model": MetadataValue.text(uri),
            "reused": False,
            "inputs_fingerprint": fingerprint,
            "training_pairs": judgements.height,
            **sources,
            "user_judgements": judgement_tables.height,
            "verdicts": counts_table(verdicts, "verdict"),
            "train_loss": result["train_loss"],
            **{f"training_rows_{k}": v for k, v in fit.items()},
        }
    )
    return Output(uri, tags=store.tags())


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
    log_pipeline_metrics(cfg, store.store(), 0, _tracked_metrics(summary), context.log)
    yield Output(
        scored.with_columns(pl.lit(sft_checkpoint).alias("checkpoint")),
        metadata={**metric_values(summary), **anatomy_metadata(parts), "preview": table_preview(scored)},
        tags=store.tags(),
    )
    _update_card(store.store(), sft_checkpoint, cfg, "SFT checkpoint")


def _update_card(s, uri: str, cfg, name: str) -> None:
    """The policy's model card again, now with the evaluation just stored (a model outside the store has none)."""
    if uri.startswith(s.base_uri + "/"):
        write_model_card(s, uri, cfg, name)


def _tracked_metrics(summary: dict) -> dict:
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


ITERATION = dict(group_name="iteration", partitions_def=iteration_partitions)


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
    if not preference_set["kept"].any():
        # Nothing to learn from: policy k is policy k-1, stored as its own version so iteration k+1 can start.
        context.log.warning(f"iteration {key}: the preference set keeps no pair; policy {key} is policy k-1 unchanged")
        with tempfile.TemporaryDirectory() as out:
            shutil.copytree(s.local_model_dir(start_policy), out, dirs_exist_ok=True)
            write_training_report(
                out, cfg, iteration_number(key), start_policy, stage="not trained: no pair kept", pairs=0
            )
            uri = s.put_model(store_layout.policy_checkpoint(key), out)
        write_model_card(s, uri, cfg, f"SRC policy, iteration {key}")
        context.add_output_metadata(
            {
                "model": MetadataValue.text(uri),
                "started_from": MetadataValue.text(start_policy),
                "trained": False,
                "pairs": 0,
            }
        )
        _offer_iteration(context, iteration_number(key) + 1)
        return Output(uri, tags=store.tags())
    with tempfile.TemporaryDirectory() as out:
        if cfg.policy_update == "gold_sft":
            result = _train(
                context,
                "gold_bound",
                s.local_model_dir(start_policy),
                preference_set,
                out,
                tracked(cfg.dpo_settings(), cfg, s, "policy_checkpoint", key),
            )
        else:
            result = _train(
                context,
                "weighted_dpo",
                s.local_model_dir(start_policy),
                preference_set,
                out,
                tracked(cfg.dpo_settings(), cfg, s, "policy_checkpoint", key),
                beta=cfg.beta,
                use_fused_kernel=cfg.use_fused_dpo_kernel,
                weighted=cfg.weighted_dpo,
                nll_weight=cfg.dpo_nll_weight,
                dpop_lambda=cfg.dpo_positive_lambda,
            )
        write_training_report(
            out,
            cfg,
            iteration_number(key),
            start_policy,
            stage=cfg.policy_update,
            train_loss=result["train_loss"],
            steps=result["steps"],
            pairs=result["pairs"],
        )
        uri = s.put_model(store_layout.policy_checkpoint(key), out)
    write_model_card(s, uri, cfg, f"SRC policy, iteration {key}")
    context.add_output_metadata(
        {
            "model": MetadataValue.text(uri),
            "started_from": MetadataValue.text(start_policy),
            "trained": True,
            "policy_update": cfg.policy_update,
            "train_loss": result["train_loss"],
            "pairs": result["pairs"],
            "steps": result["steps"],
        }
    )
    _offer_iteration(context, iteration_number(key) + 1)
    return Output(uri, tags=store.tags())


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
    before = _start_policy_evaluation(s, key, start_policy, eval_set)
    if before is None:  # e.g. the held-out set changed since: the start policy answers it again
        previous, prev_processor = load_policy(s.local_model_dir(start_policy), cfg.runtime())
        before = score_responses(
            eval_set,
            generate_responses(
                previous,
                prev_processor,
                eval_set["question"].to_list(),
                eval_set["image"].to_list(),
                cfg.eval_max_new_tokens,
                progress=context.log.info,
            ),
        )
    old = before["response"].to_list()
    judge = Judge.load(judge_checkpoint, cfg.runtime(), cfg.judge, s.local_model_dir)
    win = judge.win_rate(eval_set, scored["response"].to_list(), old, progress=context.log.info)
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
    log_pipeline_metrics(cfg, s, iteration_number(key), _tracked_metrics(summary), context.log)
    _update_card(s, policy_checkpoint, cfg, f"SRC policy, iteration {key}")
    previous = summarize(before)
    # A metric that cannot be computed (null: e.g. consistency without a verifier) is skipped, not failed.
    drops = {
        m: previous[m] - summary[m]
        for m in ("accuracy", "consistency")
        if previous[m] is not None and summary[m] is not None
    }
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
