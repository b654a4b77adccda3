"""Code versions that follow both the code and the settings behind each asset.

Dagster marks an asset stale when its definition's ``code_version`` differs from the one recorded at its last
materialization (and, once it is materialized again, what depends on it). Here each asset's version is
``code-<digest of the code it runs>.settings-<digest of the settings it reads>``, so changing a stage's module,
or a setting such as ``tau``, marks exactly the assets that read it stale, and nothing else.

The Definitions carry the versions of the settings in the environment (``SRC_PROFILE``, what ``dagster dev``
materializes with); ``src-calibrate run`` stamps its own settings on the assets it runs.
"""

import hashlib
import inspect
import json
from dataclasses import asdict
from pathlib import Path

from src_assets.config import SRCConfig

_SRC = Path(__file__).resolve().parents[1] / "src_assets"


def _fields(*names):
    return lambda cfg: {name: getattr(cfg, name) for name in names}


def _runtime(cfg: SRCConfig) -> dict:
    return asdict(cfg.runtime())


# Each asset: the src_assets modules whose code produces it, and the settings it reads.
_INPUTS = {
    "vqa_source": (("source_data", "scenes"), _fields("seed", "n_sft", "n_calibrate", "n_eval", "min_objects", "max_objects",
                                                     "source_prefix", "max_source_file_bytes", "max_image_pixels", "max_text_chars",
                                                     "scorer_prompts", "teacher_error_rate")),
    "judgement_tables": (("source_data",), _fields("judgements_prefix", "max_text_chars")),
    "rationale_sft_set": (("rationale_sft", "scenes"), _fields()),
    "eval_set": ((), _fields()),
    "perception_corpus": (("base_stage", "scenes"), _fields("policy_model", "n_base", "seed", "base_caption_share",
                                                           "min_objects", "max_objects", "base_answer_form")),
    "base_policy_model": (("base_stage", "tiny_models", "models", "processors", "training", "evaluation", "verifier"),
                          lambda cfg: {**asdict(cfg.base_settings()), **asdict(cfg.tiny_spec()),
                                       **_fields("policy_model", "tiny_policy_architecture", "seed", "eval_max_new_tokens",
                                                 "min_base_exact_listing", "base_stop_at_exact_listing",
                                                 "base_check_every")(cfg)}),
    "base_r_scorer_model": (("tiny_models", "models"),
                            _fields("scorer_model", "tiny_scorer_architecture", "tiny_hidden_size", "tiny_layers", "seed")),
    "sft_checkpoint": (("rationale_sft", "training", "models"), lambda cfg: asdict(cfg.sft_settings())),
    "r_scorer_checkpoint": (("r_scorer", "candidate_search", "generation", "training", "verifier"), lambda cfg: {
        **asdict(cfg.scorer_settings()), **asdict(cfg.judge), **asdict(cfg.search),
        **_fields("scorer_model", "scorer_prompts", "scorer_max_pairs", "scorer_contrast_pairs", "seed")(cfg)}),
    "sft_eval": (("evaluation", "generation", "verifier"), lambda cfg: {
        **_runtime(cfg), **_fields("eval_max_new_tokens", "anatomy_samples", "anatomy_temperature", "seed")(cfg)}),
    "start_policy": ((), _fields()),
    "calibration_prompts": (("source_data",), _fields("prompts_per_iteration", "scorer_prompts")),
    "candidate_pool": (("candidate_search", "generation"), lambda cfg: {**asdict(cfg.search), **_runtime(cfg), "seed": cfg.seed}),
    "pairwise_scores": (("r_scorer", "preference", "verifier"), lambda cfg: {
        **asdict(cfg.judge), **asdict(cfg.curation), **_runtime(cfg), "scoring": cfg.scoring}),
    "preference_set": (("preference", "verifier"), lambda cfg: asdict(cfg.curation)),
    "policy_checkpoint": (("weighted_dpo", "training"), lambda cfg: {
        **asdict(cfg.dpo_settings()), **_fields("beta", "use_fused_dpo_kernel", "weighted_dpo", "dpo_nll_weight", "policy_update")(cfg)}),
    "iteration_eval": (("evaluation", "generation", "r_scorer", "verifier"), lambda cfg: {
        **_runtime(cfg), **asdict(cfg.judge), **_fields("eval_max_new_tokens", "regression_tolerance", "anatomy_samples",
                                                               "anatomy_temperature", "seed")(cfg)}),
}


def digest(*parts) -> str:
    """A short, stable digest of JSON-able parts (settings, recipes, table digests)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def code_version(asset, cfg: SRCConfig) -> str:
    """``asset``'s version under ``cfg``: its own function's source and its stage modules', then its settings."""
    name = asset.key.to_user_string()
    if name not in _INPUTS:
        raise KeyError(f"dagster_project/versions.py names no code or settings for asset {name!r}; add it to _INPUTS")
    modules, settings = _INPUTS[name]
    sources = [inspect.getsource(asset.op.compute_fn.decorated_fn)] + [(_SRC / f"{m}.py").read_text() for m in modules]
    return f"code-{digest(*sources)[:8]}.settings-{digest(settings(cfg))[:8]}"


def with_code_versions(assets: list, cfg: SRCConfig) -> list:
    """The asset definitions, each carrying its code version under ``cfg``."""
    return [a.map_asset_specs(lambda spec, a=a: spec.replace_attributes(code_version=code_version(a, cfg))) for a in assets]
