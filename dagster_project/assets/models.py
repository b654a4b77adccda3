"""The models the loop starts from: the rationale SFT checkpoint (policy 0) and the judge."""

import tempfile

import polars as pl
from dagster import (
    AssetExecutionContext,
    Failure,
    MetadataValue,
    Output,
    asset,
)

from src_assets.config import TINY
from src_assets.fingerprints import digest, table_digest
from src_assets.judge import is_oracle, verdict_fit
from src_assets.judge_corpus import judge_training_set
from src_assets.models import load_judge_model, load_tokenizer
from src_assets.source_data import judge_prompt_rows

from .. import store_layout
from ..observe.metadata import counts_table
from ..observe.policy_cards import write_model_card, write_training_report
from ..observe.trackers import tracked
from ..resources import SettingsResource, StoreResource
from ..versions import reads, reuse_digest
from .partitions import GPU_POOL, GPU_STEP_TAGS, offer_iteration
from .trained import model_recipe, remember_trained, tiny_recipe, train, trained_before


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
        model_recipe(base_policy_checkpoint), reuse_digest("sft_checkpoint", cfg), table_digest(rationale_sft_set)
    )
    found = trained_before(context, s, store_layout.SFT_CHECKPOINT, fingerprint, cfg)
    if found is not None:
        context.add_output_metadata(
            {"model": MetadataValue.text(found["uri"]), "reused": True, "inputs_fingerprint": fingerprint}
        )
        offer_iteration(context, 1)
        return Output(found["uri"], tags=store.tags())
    with tempfile.TemporaryDirectory() as out:
        result = train(
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
    remember_trained(s, store_layout.SFT_CHECKPOINT, fingerprint, uri)
    context.add_output_metadata(
        {
            "model": MetadataValue.text(uri),
            "reused": False,
            "inputs_fingerprint": fingerprint,
            "train_loss": result["train_loss"],
            "steps": result["steps"],
        }
    )
    offer_iteration(context, 1)
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
    # The oracle (the domain verifier judges every pair), or a pretrained judge used zero-shot: nothing to train.
    untrained = cfg.judge_model if is_oracle(cfg.judge_model) else base_judge_checkpoint
    if is_oracle(cfg.judge_model) or (cfg.judge_model != TINY and cfg.judge_epochs == 0):
        return Output(untrained, metadata={"model": MetadataValue.text(untrained), "trained": False}, tags=store.tags())
    prompts = judge_prompt_rows(vqa_source, cfg.judge_prompts)
    base_judge = (
        tiny_recipe(cfg, cfg.tiny_judge_architecture) if cfg.judge_model == TINY else model_recipe(cfg.judge_model)
    )
    sft_rows = vqa_source.filter(pl.col("split") == "sft")
    inputs = (table_digest(prompts), table_digest(sft_rows), table_digest(judgement_tables))
    fingerprint = digest(sft_checkpoint, base_judge, reuse_digest("judge_checkpoint", cfg), *inputs)
    found = trained_before(context, s, store_layout.JUDGE_CHECKPOINT, fingerprint, cfg)
    if found is not None:
        metadata = {"model": MetadataValue.text(found["uri"]), "reused": True, "inputs_fingerprint": fingerprint}
        return Output(found["uri"], metadata=metadata, tags=store.tags())
    base_dir = s.local_model_dir(base_judge_checkpoint)
    judgements, sources = _judge_training_rows(
        context, cfg, s, base_dir, sft_checkpoint, prompts, vqa_source, judgement_tables
    )
    with tempfile.TemporaryDirectory() as out:
        result = train(
            context,
            "judge",
            base_dir,
            judgements,
            out,
            tracked(cfg.judge_settings(), cfg, s, "judge_checkpoint"),
        )
        fit = verdict_fit(*load_judge_model(out, cfg.runtime()), judgements, seed=cfg.seed)
        uri = s.put_model(store_layout.JUDGE_CHECKPOINT, out)
    remember_trained(s, store_layout.JUDGE_CHECKPOINT, fingerprint, uri)
    if fit and fit["fit"] < fit["prior_fit"] + 0.05:
        context.log.warning(
            f"the judge reads back {fit['fit']:.3f} of its own training verdicts, where always saying the "
            f"commonest one gets {fit['prior_fit']:.3f} (verdict spread {fit['verdict_spread']:.3f}): it has learned "
            f"the label prior, not what its prompts say"
        )
    verdicts = dict(judgements.group_by("verdict").len().iter_rows())
    metadata = {
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
    return Output(uri, metadata=metadata, tags=store.tags())


def _judge_training_rows(context, cfg, s, base_dir, sft_checkpoint, prompts, vqa_source, judgement_tables):
    """The judge's training pairs and where they came from; a Failure saying what to add when there are none."""
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
    return judgements, sources
