"""The models before any training of the loop: the base policy (with the tiny default, a VLM pretrained here
on the perception corpus) and the judge's base LM.
"""

import json
import math
import tempfile
from pathlib import Path

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
from safetensors import safe_open

from src_assets.base_stage import pretrain_base_policy
from src_assets.config import TINY
from src_assets.fingerprints import digest, table_digest
from src_assets.judge import is_oracle
from src_assets.models import ModelLoadError, load_model_config
from src_assets.tiny_models import build_tiny_judge, build_tiny_policy

from .. import store_layout
from ..observe.metadata import base_policy_metadata
from ..observe.trackers import tracked
from ..observe.training_log import DagsterLogCallback
from ..resources import SettingsResource, StoreResource
from ..versions import reads, reuse_digest
from .partitions import GPU_POOL, GPU_STEP_TAGS
from .trained import remember_trained, tiny_recipe, trained_before


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
        metadata = {**_given_model(cfg.policy_model), "trained": False}
        yield Output(cfg.policy_model, metadata=metadata, tags=store.tags())
        yield AssetCheckResult(
            check_name="base_policy_lists_the_scene", passed=True, metadata={"skipped": "a real model: no base stage"}
        )
        return
    fingerprint = digest(
        tiny_recipe(cfg, cfg.tiny_policy_architecture),
        reuse_digest("base_policy_checkpoint", cfg),
        table_digest(perception_corpus),
    )
    found = trained_before(context, s, store_layout.BASE_POLICY_CHECKPOINT, fingerprint, cfg)
    reused = found is not None
    if not reused:
        with tempfile.TemporaryDirectory() as tmp:
            build_tiny_policy(f"{tmp}/init", cfg.tiny_policy_architecture, cfg.tiny_spec(), seed=cfg.seed)
            found = pretrain_base_policy(
                f"{tmp}/init",
                perception_corpus,
                f"{tmp}/base",
                eval_set,
                tracked(cfg.base_settings(), cfg, s, "base_policy_checkpoint"),
                seed=cfg.seed,
                min_objects=cfg.min_objects,
                max_objects=cfg.max_objects,
                check_every=cfg.base_check_every,
                stop_at_exact_listing=cfg.base_stop_at_exact_listing,
                max_new_tokens=cfg.eval_max_new_tokens,
                runtime=cfg.runtime(),
                callbacks=[DagsterLogCallback(context.log, "base stage")],
                progress=context.log.info,
            )
            found["uri"] = s.put_model(store_layout.BASE_POLICY_CHECKPOINT, f"{tmp}/base")
        remember_trained(s, store_layout.BASE_POLICY_CHECKPOINT, fingerprint, **found)
    model_dir = Path(s.local_model_dir(found["uri"]))
    meta = base_policy_metadata(found, model_dir, count_parameters(model_dir))
    yield Output(
        found["uri"], metadata={**meta, "reused": reused, "inputs_fingerprint": fingerprint}, tags=store.tags()
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


def base_model(ref: str, build, architecture: str, key: str, store: StoreResource, cfg) -> Output[str]:
    """The tiny model built and stored, or a real model reference validated; returns what to load."""
    if ref == TINY:
        with tempfile.TemporaryDirectory() as tmp:
            build(tmp, architecture, cfg.tiny_spec(), seed=cfg.seed)
            uri = store.store().put_model(key, tmp)
            config = json.loads(Path(tmp, "config.json").read_text())
            n_params = count_parameters(Path(tmp))
        meta = {
            "model": MetadataValue.text(uri),
            "architecture": MetadataValue.text(",".join(config.get("architectures") or ["?"])),
            "parameters": MetadataValue.int(n_params),
        }
    else:
        uri, meta = ref, _given_model(ref)
    return Output(uri, metadata=meta, tags=store.tags())


def _given_model(ref: str) -> dict:
    """A real model's reference checked (its config loads, no weights yet), as metadata."""
    try:
        config = load_model_config(ref).to_dict()
    except ModelLoadError as e:
        raise Failure(str(e)) from e
    return {
        "model": MetadataValue.text(ref),
        "architecture": MetadataValue.text(",".join(config.get("architectures") or ["?"])),
    }


def count_parameters(model_dir: Path) -> int:
    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


@asset(
    group_name="models",
)
@reads(
    "judge_model",
    "tiny_judge_architecture",
    "tiny",
    "seed",
    stages=("tiny_models", "models", "judge"),
)
def base_judge_checkpoint(
    context: AssetExecutionContext, settings: SettingsResource, store: StoreResource
) -> Output[str]:
    """The judge LM before training: the tiny local LM, or the configured real model."""
    cfg = settings.config()
    if is_oracle(cfg.judge_model):
        # the oracle judge has no model
        return Output(cfg.judge_model, metadata={"model": MetadataValue.text(cfg.judge_model)}, tags=store.tags())
    return base_model(
        cfg.judge_model,
        build_tiny_judge,
        cfg.tiny_judge_architecture,
        store_layout.BASE_JUDGE_CHECKPOINT,
        store,
        cfg,
    )
