"""Run settings and the named profiles.

Everything the pipeline can be told lives in ``SRCConfig``; a profile is a set
of defaults. ``default`` is the embedded run the README's main command makes;
``smoke`` shrinks every size so that tests and quick checks finish in seconds.
Each choice this project made where the paper is silent is a setting (docs/method.md maps them to the method).

The stages' own settings types (``SearchConfig``, ``JudgeConfig``, ``AggregationConfig``, ``CurationConfig``) hold their defaults;
``SRCConfig`` holds one of each, and every setting has one flat name for ``--set`` (``k``, ``tau``,
``judge_template``...; see ``setting_names``).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, fields, replace

from .base_stage import ANSWER_FORMS
from .candidate_search import SearchConfig
from .models import Runtime
from .preference import AggregationConfig, CurationConfig
from .r_scorer import JUDGE_TEMPLATES, JudgeConfig
from .scenes import IMAGE_PIXELS
from .tiny_models import POLICY_ARCHITECTURES, SCORER_ARCHITECTURES, TinySpec
from .training import TrainSettings

TINY = "tiny"  # a model reference meaning "build the tiny local model"

# Settings every model stage reads (where and how models run), and those every training reads besides its own.
RUNTIME_SETTINGS = ("device", "dtype", "attn_implementation", "image_min_pixels", "image_max_pixels")
TRAINING_SETTINGS = (
    "lora_r",
    "seed",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "max_length",
    "report_to",
    *RUNTIME_SETTINGS,
)
SETTING_BUNDLES = {"runtime": RUNTIME_SETTINGS, "training": TRAINING_SETTINGS}


@dataclass(frozen=True)
class SRCConfig:
    seed: int = 0
    # Data: sizes of the synthetic splits (0 turns synthetic data off; Parquet
    # files under ``source_prefix`` in the store are added either way).
    n_sft: int = 2000
    n_calibrate: int = 2200  # the R-Scorer's prompts, then each iteration's
    n_eval: int = 500
    min_objects: int = 2
    max_objects: int = 5
    # A share of the sft rows' rationales misperceive one object while the answer stays gold, as a teacher
    # model's rationales do (scenes.teacher_response); 0: every rationale is true.
    teacher_error_rate: float = 0.2
    source_prefix: str = "source"
    judgements_prefix: str = "judgements"  # Parquet judgement tables here train the R-Scorer too (see README)
    max_source_file_bytes: int = 4 * 2**30  # a source file over this is refused before it is read
    max_image_pixels: int = 4096 * 4096  # an image over this area is refused before it is decoded
    max_text_chars: int = 65536  # a source text cell (question, answer, response, ...) longer than this is refused
    # Models: "tiny", a local model directory, or a hub id.
    policy_model: str = TINY
    scorer_model: str = TINY
    tiny_policy_architecture: str = "llava"  # the tiny policy's family: llava, qwen2_vl, qwen2_5_vl or idefics3
    tiny_scorer_architecture: str = "llama"  # the tiny judge's: llama (word-level tokenizer) or qwen2 (byte-level BPE)
    tiny_hidden_size: int = 128
    tiny_layers: int = 2
    # The tiny LLaVA's vision tower: 8-pixel patches (2x2 per grid cell) and position embeddings at scale 0.5.
    # With one 16-pixel patch per cell, shapes stayed at chance after 2,000 steps (docs/results.md).
    tiny_patch_size: int = 8
    tiny_position_embedding_std: float = 0.5
    lora_r: int = 0  # 0: full fine-tuning everywhere; > 0: LoRA of this rank (peft), merged on save
    reuse_checkpoints: bool = True  # an SFT checkpoint or R-Scorer trained earlier from the same inputs is reused
    # Hardware and precision, for every stage that runs a model
    device: str = "auto"  # CUDA when available, else CPU; or a torch device such as "cuda:1"
    dtype: str = "auto"  # bfloat16 on a GPU that supports it, else float32; models train and are saved in it
    attn_implementation: str = ""  # "" lets transformers choose; e.g. "sdpa" or "flash_attention_2"
    image_min_pixels: int = 0  # > 0: Qwen-family processors' smallest image area
    image_max_pixels: int = 0  # > 0: their largest, which bounds the image tokens per prompt
    # Training controls shared by the three trainings
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_length: int = 0  # > 0: examples are truncated to this many tokens (0: never)
    report_to: str = ""  # comma-separated transformers integrations: "tensorboard", "wandb", "mlflow"
    # 0. The base stage (tiny policy only; a hub model is already capable): captions and direct answers
    n_base: int = 16000  # perception corpus rows, scenes of their own
    base_caption_share: float = 0.7  # the rest are direct answers (no listing before them)
    base_answer_form: str = (
        "sentence"  # direct answers: "sentence" (a sentence on the asked subject, then the answer line) or "short"
    )
    base_epochs: float = 3.0  # at most: training stops once the probe captions reach base_stop_at_exact_listing
    base_stop_at_exact_listing: float = 0.9  # 0: never stop early
    base_check_every: int = 250  # steps between probe checks (100 probe scenes captioned each time)
    base_learning_rate: float = 1e-3
    base_batch_size: int = 32
    base_lr_scheduler: str = "constant_with_warmup"  # cosine decays before the plateau is crossed (docs/results.md)
    min_base_exact_listing: float = 0.8  # the base policy's captions must list the scene exactly this often (WARN)
    # 1. Rationale SFT: light, from a base policy that perceives
    sft_epochs: float = 3.0
    sft_learning_rate: float = 1e-3
    sft_batch_size: int = 32
    # 2. Candidate search: k, beams, samples_per_beam, temperature, max_sentences, include_greedy...
    prompts_per_iteration: int = 1024
    search: SearchConfig = field(default_factory=SearchConfig)
    # 3. R-Scorer (judging itself: judge_template, judge_batch_size, judge_tie_margin...)
    scorer_prompts: int = 128  # calibrate prompts whose candidates the verifier labels to train the judge
    scorer_max_pairs: int = 4000  # at most this many ordered pairs of the SFT policy's candidates
    # Pairs of gold responses against perturbed copies of themselves (the R-Scorer's prompts', then the sft rows'),
    # labelled by the verifier; 0: none. 768 is about what 128 prompts give (6 per prompt).
    scorer_contrast_pairs: int = 768
    scorer_epochs: float = 3.0
    scorer_learning_rate: float = 2e-3
    scorer_batch_size: int = 32
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    scoring: str = "pairwise"  # ablation: "independent" judges each candidate alone
    # 4. Aggregation: select_by, bt_iters, bt_tol, aggregation_backend
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    # 5. Curation: tau, pairs_per_prompt, require_correct_chosen...
    curation: CurationConfig = field(default_factory=CurationConfig)
    # 6. Weighted DPO
    dpo_epochs: float = 2.0
    dpo_learning_rate: float = 1e-4  # 5e-4 without the anchor collapsed a perceiving policy (0.52 -> 0.19 accuracy)
    dpo_batch_size: int = 16
    dpo_nll_weight: float = 1.0  # TRL's likelihood anchor on the chosen response (RPO's alpha); 0 turns it off
    beta: float = 0.1
    weighted_dpo: bool = True  # ablation: False trains plain DPO on the same pairs
    # "gold_sft": the gold-data bound, SFT on the kept prompts' gold responses for the same steps instead of DPO
    policy_update: str = "dpo"
    use_fused_dpo_kernel: bool = True  # the Triton DPO loss when training on CUDA; off: the eager reference
    # 8. Evaluation
    eval_max_new_tokens: int = 96
    anatomy_samples: int = 6  # K samples per held-out prompt: is any correct and consistent? (0: not measured)
    anatomy_temperature: float = 1.0
    regression_tolerance: float = 0.02  # an iteration may lose this much accuracy or consistency before a WARN
    min_blank_image_drop: float = 0.1  # the SFT policy must lose this much accuracy when its images are blanked

    def tiny_spec(self) -> TinySpec:
        return TinySpec(
            hidden_size=self.tiny_hidden_size,
            intermediate_size=2 * self.tiny_hidden_size,
            num_layers=self.tiny_layers,
            patch_size=self.tiny_patch_size,
            position_embedding_std=self.tiny_position_embedding_std,
        )

    def runtime(self) -> Runtime:
        return Runtime(**{name: getattr(self, name) for name in RUNTIME_SETTINGS})

    def _train(self, epochs: float, learning_rate: float, batch_size: int, **schedule) -> TrainSettings:
        return TrainSettings(
            epochs,
            learning_rate,
            batch_size,
            self.lora_r,
            self.seed,
            self.gradient_accumulation_steps,
            self.gradient_checkpointing,
            self.max_length,
            tuple(x.strip() for x in self.report_to.split(",") if x.strip()),
            self.runtime(),
            **schedule,
        )

    def base_settings(self) -> TrainSettings:
        # Full fine-tuning whatever lora_r says: the base stage trains a tiny model from random weights.
        return replace(
            self._train(
                self.base_epochs,
                self.base_learning_rate,
                self.base_batch_size,
                lr_scheduler_type=self.base_lr_scheduler,
                warmup_steps=20,
            ),
            lora_r=0,
        )

    def sft_settings(self) -> TrainSettings:
        return self._train(self.sft_epochs, self.sft_learning_rate, self.sft_batch_size)

    def scorer_settings(self) -> TrainSettings:
        return self._train(self.scorer_epochs, self.scorer_learning_rate, self.scorer_batch_size)

    def dpo_settings(self) -> TrainSettings:
        return self._train(self.dpo_epochs, self.dpo_learning_rate, self.dpo_batch_size)

    def setting(self, name: str):
        """A setting by its flat name (``k`` is ``self.search.k``)."""
        group, attr, _ = setting_names()[name]
        return getattr(getattr(self, group) if group else self, attr)


PROFILES: dict[str, SRCConfig] = {
    "default": SRCConfig(),
    "smoke": SRCConfig(
        n_sft=60,
        n_calibrate=16,
        n_eval=20,
        tiny_hidden_size=32,
        tiny_layers=1,
        sft_epochs=1.0,
        n_base=64,
        base_epochs=1.0,
        prompts_per_iteration=8,
        search=SearchConfig(k=3, beams=2, samples_per_beam=2, max_sentences=7),
        scorer_prompts=8,
        scorer_max_pairs=64,
        scorer_contrast_pairs=48,
        scorer_epochs=1.0,
        dpo_epochs=1.0,
        dpo_batch_size=4,
        # untrained smoke models never answer right; this profile checks plumbing
        curation=CurationConfig(
            tau=0.0, require_correct_chosen=False, require_consistent_chosen=False, require_factual_chosen=False
        ),
        min_blank_image_drop=-1.0,  # nor do they see: the blank-image check is reported, not required
        min_base_exact_listing=0.0,
        anatomy_samples=2,
    ),
}


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def coerce_setting(name: str, value, kind: str):
    """``value`` (a string from the command line, or a JSON value) as the setting's type; a clear error if it is not."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in (*_TRUE, *_FALSE):
            return str(value).strip().lower() in _TRUE
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
    elif kind == "float":
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is not None:
            if not math.isfinite(number):  # NaN passes every comparison of a range check
                raise ValueError(f"setting {name}: {str(value)[:80]!r} is not a finite number")
            return number
    elif kind == "str":
        return str(value)
    raise ValueError(f"setting {name}: {str(value)[:80]!r} is not a valid {kind}")


# Each numeric setting's allowed range: (lowest, lowest allowed?, highest). Zeros that mean something are allowed
# (n_sft=0 turns synthetic data off, scorer_epochs=0 uses a pretrained judge as it is, lora_r=0 is full fine-tuning).
# Upper bounds stop a typo from building data for days: a million synthetic scenes per split (about 2 GB of PNGs),
# 256 candidates per prompt, 1,000 epochs.
MAX_SCENES, MAX_CANDIDATES, MAX_EPOCHS = 1_000_000, 256, 1000
_RANGES = {
    **{name: (0, True, MAX_SCENES) for name in ("n_sft", "n_calibrate", "n_eval", "n_base")},
    **{name: (1, True, MAX_SCENES) for name in ("prompts_per_iteration", "scorer_prompts")},
    **{name: (1, True, MAX_CANDIDATES) for name in ("beams", "samples_per_beam")},
    "scorer_epochs": (0, True, MAX_EPOCHS),
    **{name: (0, False, MAX_EPOCHS) for name in ("sft_epochs", "base_epochs", "dpo_epochs")},
    **{
        name: (0, True, None)
        for name in (
            "lora_r",
            "scorer_max_pairs",
            "scorer_contrast_pairs",
            "dpo_nll_weight",
            "max_length",
            "image_min_pixels",
            "image_max_pixels",
            "regression_tolerance",
            "tiny_layers",
            "anatomy_samples",
        )
    },
    **{
        name: (1, True, None)
        for name in (
            "max_source_file_bytes",
            "max_image_pixels",
            "max_text_chars",
            "min_objects",
            "max_objects",
            "max_sentences",
            "sft_batch_size",
            "base_batch_size",
            "base_check_every",
            "scorer_batch_size",
            "dpo_batch_size",
            "judge_batch_size",
            "pairs_per_prompt",
            "gradient_accumulation_steps",
            "eval_max_new_tokens",
            "tiny_hidden_size",
        )
    },
    **{
        name: (0, False, None)
        for name in (
            "anatomy_temperature",
            "base_learning_rate",
            "beta",
            "temperature",
            "sft_learning_rate",
            "scorer_learning_rate",
            "dpo_learning_rate",
        )
    },
    "seed": (0, True, 2**32 - 1),  # numpy's and torch's seeds are unsigned 32-bit
    "k": (2, True, MAX_CANDIDATES),
    "tau": (0, True, 1),
    "bt_iters": (1, True, None),  # 0 leaves every strength equal: chosen = rejected, nothing to train
    "bt_tol": (0, False, None),
    "judge_tie_margin": (0, True, None),
    "teacher_error_rate": (0, True, 1),
    "base_caption_share": (0, True, 1),
    "min_base_exact_listing": (0, True, 1),
    "base_stop_at_exact_listing": (0, True, 1),
    "tiny_patch_size": (1, True, None),
    "tiny_position_embedding_std": (0, True, None),
    "min_blank_image_drop": (-1, True, 1),  # a difference of two accuracies
}


# The nested settings and the prefix of their flat names, and the names that would be unclear alone.
_GROUPS = {"search": "", "judge": "judge_", "aggregation": "", "curation": ""}
SETTING_GROUPS = tuple(_GROUPS)
_RENAMED = {("search", "batch_size"): "search_batch_size", ("aggregation", "backend"): "aggregation_backend"}


@functools.cache
def setting_names() -> dict[str, tuple[str | None, str, str]]:
    """Every setting's flat name -> (nested group or None, its field there, its type name)."""
    types = {"search": SearchConfig, "judge": JudgeConfig, "aggregation": AggregationConfig, "curation": CurationConfig}
    out = {f.name: (None, f.name, f.type) for f in fields(SRCConfig) if f.name not in _GROUPS}
    for group, prefix in _GROUPS.items():
        for f in fields(types[group]):
            name = _RENAMED.get((group, f.name), f"{prefix}{f.name}")
            if name in out:
                raise RuntimeError(f"setting name {name!r} is taken twice; add it to _RENAMED")
            out[name] = (group, f.name, f.type)
    return out


# The settings whose value is one of a few names, and those names.
POLICY_UPDATES = ("dpo", "gold_sft")
_CHOICES = {
    "policy_update": POLICY_UPDATES,
    "judge_template": JUDGE_TEMPLATES,
    "base_answer_form": ANSWER_FORMS,
    "scoring": ("pairwise", "independent"),
}


def _report_to_choices() -> tuple[str, ...]:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return ("none", "all", *sorted(INTEGRATION_TO_CALLBACK))


def _check_ranges(cfg: "SRCConfig") -> None:
    for name, choices in _CHOICES.items():
        if cfg.setting(name) not in choices:
            raise ValueError(f"setting {name}: {cfg.setting(name)!r} is not one of {choices}")
    trackers = [x.strip() for x in cfg.setting("report_to").split(",") if x.strip()]
    if trackers and not set(trackers) <= set(_report_to_choices()):
        raise ValueError(
            f"setting report_to: {sorted(set(trackers) - set(_report_to_choices()))} are not "
            f"transformers integrations; expected a comma-separated list of {_report_to_choices()}"
        )
    for name, (low, inclusive, high) in _RANGES.items():
        value = cfg.setting(name)
        if (value < low if inclusive else value <= low) or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f"{'>=' if inclusive else '>'} {low}"
            raise ValueError(f"setting {name}: {value!r} is out of range; it must be {bound}")
    low, high, hidden = cfg.setting("min_objects"), cfg.setting("max_objects"), cfg.setting("tiny_hidden_size")
    if low > high:
        raise ValueError(f"settings min_objects ({low}) and max_objects ({high}): min is above max")
    if hidden % 16:
        raise ValueError(f"setting tiny_hidden_size: {hidden} must be a multiple of 16 (4 heads with even halves)")
    patch = cfg.setting("tiny_patch_size")
    if IMAGE_PIXELS % patch:
        raise ValueError(f"setting tiny_patch_size: {patch} must divide the scenes' {IMAGE_PIXELS}-pixel side")


class _Unchecked:
    """A flat view of a profile with overrides, to check ranges before the stage types validate themselves."""

    def __init__(self, base: SRCConfig, typed: dict):
        self.base, self.typed = base, typed

    def setting(self, name: str):
        return self.typed[name] if name in self.typed else self.base.setting(name)


def profile(name: str, **overrides) -> SRCConfig:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; expected one of {sorted(PROFILES)}")
    known = setting_names()
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; the settings are {sorted(known)}")
    typed = {k: coerce_setting(k, v, known[k][2]) for k, v in overrides.items()}
    _check_ranges(_Unchecked(PROFILES[name], typed))
    top = {k: v for k, v in typed.items() if known[k][0] is None}
    nested = {
        g: replace(getattr(PROFILES[name], g), **{known[k][1]: v for k, v in typed.items() if known[k][0] == g})
        for g in _GROUPS
    }  # each stage type validates its own fields (select_by, backend...)
    cfg = replace(PROFILES[name], **top, **nested)
    if cfg.tiny_policy_architecture not in POLICY_ARCHITECTURES:
        raise ValueError(
            f"tiny_policy_architecture must be one of {POLICY_ARCHITECTURES}, got {cfg.tiny_policy_architecture!r}"
        )
    if cfg.tiny_scorer_architecture not in SCORER_ARCHITECTURES:
        raise ValueError(
            f"tiny_scorer_architecture must be one of {SCORER_ARCHITECTURES}, got {cfg.tiny_scorer_architecture!r}"
        )
    cfg.runtime().torch_dtype()  # validates dtype and device
    return cfg
