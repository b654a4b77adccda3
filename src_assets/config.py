"""Run settings and the named profiles.

Everything the pipeline can be told lives in ``SRCConfig``; a profile is a set
of defaults. ``default`` is the embedded run the README's main command makes;
``smoke`` shrinks every size so that tests and quick checks finish in seconds.
Each choice this project made where the paper is silent is a setting (docs/method.md maps them to the method).

The stages' own settings types (``SearchConfig``, ``JudgeConfig``, ``AggregationConfig``,
``CurationConfig``) hold their defaults; ``SRCConfig`` holds one of each, and every setting has one flat name for
``--set`` (``k``, ``tau``, ``judge_template``...; see ``setting_names``). Each field declares its range or names
(``setting.setting``), and each type checks its own fields as it is made, so a settings object that exists is
valid.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field, fields, replace

from .base_stage import ANSWER_FORMS
from .candidate_search import SearchConfig
from .models import Runtime
from .preference import AggregationConfig, CurationConfig
from .r_scorer import JudgeConfig
from .scenes import IMAGE_PIXELS
from .setting import flat_name, setting, validate_fields
from .source_data import parse_source_columns, parse_split_fractions
from .tiny_models import POLICY_ARCHITECTURES, SCORER_ARCHITECTURES, TinySpec
from .training import TRAINER_CONFIGS, TrainSettings, check_trainer_args, trainer_arg

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
    "lora_args",
    "keep_adapter",
    "train_processes",
    *RUNTIME_SETTINGS,
)
# What a tiny model is made of besides its architecture and seed (``SRCConfig.tiny_spec``).
TINY_SETTINGS = ("tiny_hidden_size", "tiny_layers", "tiny_patch_size", "tiny_position_embedding_std")
SETTING_BUNDLES = {"runtime": RUNTIME_SETTINGS, "training": TRAINING_SETTINGS, "tiny": TINY_SETTINGS}

# Upper bounds stop a typo from building data for days: a million synthetic scenes per split (about 2 GB of PNGs),
# 256 candidates per prompt, 1,000 epochs. Zeros that mean something are allowed (n_sft=0 turns synthetic data
# off, scorer_epochs=0 uses a pretrained judge as it is, lora_r=0 is full fine-tuning).
MAX_SCENES, MAX_EPOCHS = 1_000_000, 1000
POLICY_UPDATES = ("dpo", "gold_sft")


def _trackers(report_to: str) -> list[str]:
    return [x.strip() for x in report_to.split(",") if x.strip()]


def _check_report_to(value: str) -> None:
    if not _trackers(value):
        return
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    known = ("none", "all", *sorted(INTEGRATION_TO_CALLBACK))
    if not set(_trackers(value)) <= set(known):
        raise ValueError(
            f"{sorted(set(_trackers(value)) - set(known))} are not transformers integrations; expected a "
            f"comma-separated list of {known}"
        )


@dataclass(frozen=True)
class SRCConfig:
    seed: int = setting(0, low=0, high=2**32 - 1)
    # Data: sizes of the synthetic splits (0 turns that split off). The synthetic rows are the source where you
    # bring none; see synthetic_rows.
    # 8,000 rows for 2 epochs (500 steps): with 2,000 rows for 3 epochs (189 steps) the local steps are not yet
    # learned (consistency 0.08), and an oracle iteration found a pair to keep for 47 of 1,024 prompts (519 at 500
    # steps; docs/results.md)
    n_sft: int = setting(8000, low=0, high=MAX_SCENES)
    n_calibrate: int = setting(2200, low=0, high=MAX_SCENES)  # the R-Scorer's prompts, then each iteration's
    n_eval: int = setting(500, low=0, high=MAX_SCENES)
    min_objects: int = setting(2, low=1)
    max_objects: int = setting(5, low=1)
    # A share of the sft rows' rationales misperceive one object while the answer stays gold, as a teacher
    # model's rationales do (scenes.teacher_response); 0: every rationale is true.
    teacher_error_rate: float = setting(0.2, low=0, high=1)
    # A share of the sft rows' rationales slip in one reasoning step (a wrong state, the steps after it following
    # from it) while the answer stays gold; 0: every step follows.
    teacher_slip_rate: float = setting(0.0, low=0, high=1)
    # "auto": the synthetic scenes are the source only where the store holds no source files and source_datasets
    # is empty, so your rows are never mixed with them unasked; "on": they join your rows; "off": never.
    synthetic_rows: str = setting("auto", choices=("auto", "on", "off"))
    source_prefix: str = "source"
    judgements_prefix: str = "judgements"  # Parquet judgement tables here train the R-Scorer too (see README)
    # Hugging Face hub datasets read besides the store's files, comma-separated ids (offline: from the local cache)
    source_datasets: str = ""
    # our column from theirs, e.g. "question:prompt,answer:label,image:img" (source_data.SourceOptions)
    source_columns: str = setting("", check=parse_source_columns)
    # rows with no split column are split by a hash of their id, e.g. "sft:0.5,calibrate:0.4,eval:0.1"
    split_fractions: str = setting("", check=parse_split_fractions)
    max_source_file_bytes: int = setting(4 * 2**30, low=1)  # a source file over this is refused before it is read
    max_image_pixels: int = setting(4096 * 4096, low=1)  # an image over this area is refused before it is decoded
    max_text_chars: int = setting(
        65536, low=1
    )  # a source text cell (question, answer, response, ...) longer than this is refused
    # Models: "tiny", a local model directory, or a hub id.
    policy_model: str = TINY
    scorer_model: str = TINY
    tiny_policy_architecture: str = setting(
        "llava", choices=POLICY_ARCHITECTURES
    )  # the tiny policy's family: llava, qwen2_vl, qwen2_5_vl or idefics3
    tiny_scorer_architecture: str = setting(
        "llama", choices=SCORER_ARCHITECTURES
    )  # the tiny judge's: llama (word-level tokenizer) or qwen2 (byte-level BPE)
    tiny_hidden_size: int = setting(128, low=1)
    tiny_layers: int = setting(2, low=0)
    # The tiny LLaVA's vision tower: 8-pixel patches (2x2 per grid cell) and position embeddings at scale 0.5.
    # With one 16-pixel patch per cell, shapes stayed at chance after 2,000 steps (docs/results.md).
    tiny_patch_size: int = setting(8, low=1)
    tiny_position_embedding_std: float = setting(0.5, low=0)
    lora_r: int = setting(0, low=0)  # 0: full fine-tuning everywhere; > 0: LoRA of this rank (peft), merged on save
    reuse_checkpoints: bool = True  # an SFT checkpoint or R-Scorer trained earlier from the same inputs is reused
    # Hardware and precision, for every stage that runs a model
    device: str = "auto"  # CUDA when available, else CPU; or a torch device such as "cuda:1"
    dtype: str = "auto"  # bfloat16 on a GPU that supports it, else float32; models train and are saved in it
    attn_implementation: str = ""  # "" lets transformers choose; e.g. "sdpa" or "flash_attention_2"
    image_min_pixels: int = setting(0, low=0)  # > 0: Qwen-family processors' smallest image area
    image_max_pixels: int = setting(0, low=0)  # > 0: their largest, which bounds the image tokens per prompt
    # Training controls shared by the three trainings
    gradient_accumulation_steps: int = setting(1, low=1)
    gradient_checkpointing: bool = False
    max_length: int = setting(0, low=0)  # > 0: examples are truncated to this many tokens (0: never)
    # comma-separated transformers integrations: "tensorboard", "wandb", "mlflow"
    report_to: str = setting("", check=_check_report_to)
    # where trackers write (TensorBoard event files): <logging_dir>/<asset>[/<iteration>]; "" is a logs/ folder
    # beside a local store (./logs for a remote one)
    logging_dir: str = ""
    # The trainers' own configs, as JSON objects of their fields (``--set sft.warmup_ratio=0.1`` writes sft_args):
    # TRL's SFTConfig for the base stage, rationale SFT and the R-Scorer, WeightedDPOConfig (a DPOConfig) for DPO,
    # peft's LoraConfig for LoRA. They win over the settings above.
    base_args: str = setting("{}", check=check_trainer_args("base"))
    sft_args: str = setting("{}", check=check_trainer_args("sft"))
    scorer_args: str = setting("{}", check=check_trainer_args("scorer"))
    dpo_args: str = setting("{}", check=check_trainer_args("dpo"))
    lora_args: str = setting("{}", check=check_trainer_args("lora"))
    # > 1: rationale SFT, the R-Scorer and DPO train in this many processes under `accelerate launch` (one per GPU;
    # gloo processes on the CPU), each batch split across them; 1: in the step's own process
    train_processes: int = setting(1, low=1, high=1024)
    keep_adapter: bool = False  # with lora_r > 0: keep each training's LoRA adapter in adapter/ beside the merged model
    # 0. The base stage (tiny policy only; a hub model is already capable): captions and direct answers
    n_base: int = setting(16000, low=0, high=MAX_SCENES)  # perception corpus rows, scenes of their own
    base_caption_share: float = setting(0.7, low=0, high=1)  # the rest are direct answers (no listing before them)
    # direct answers: "sentence" (a sentence on the asked subject, then the answer line) or "short"
    base_answer_form: str = setting("sentence", choices=ANSWER_FORMS)
    base_epochs: float = setting(
        3.0, above=0, high=MAX_EPOCHS
    )  # at most: training stops once the probe captions reach base_stop_at_exact_listing
    base_stop_at_exact_listing: float = setting(0.9, low=0, high=1)  # 0: never stop early
    base_check_every: int = setting(250, low=1)  # steps between probe checks (100 probe scenes captioned each time)
    base_learning_rate: float = setting(1e-3, above=0)
    base_batch_size: int = setting(32, low=1)
    base_lr_scheduler: str = "constant_with_warmup"  # cosine decays before the plateau is crossed (docs/results.md)
    min_base_exact_listing: float = setting(
        0.8, low=0, high=1
    )  # the base policy's captions must list the scene exactly this often (WARN)
    # 1. Rationale SFT: light, from a base policy that perceives
    sft_epochs: float = setting(2.0, above=0, high=MAX_EPOCHS)
    sft_learning_rate: float = setting(1e-3, above=0)
    sft_batch_size: int = setting(32, low=1)
    # 2. Candidate search: k, beams, samples_per_beam, temperature, max_sentences, include_greedy...
    prompts_per_iteration: int = setting(1024, low=1, high=MAX_SCENES)
    # Candidate search and judging run as this many steps over contiguous ranges of the prompts (one per process,
    # pod or worker with a multi-process executor); 1: one step each
    shards: int = setting(1, low=1, high=4096)
    search: SearchConfig = field(default_factory=SearchConfig)
    # 3. R-Scorer (judging itself: judge_template, judge_batch_size, judge_tie_margin...)
    scorer_prompts: int = setting(
        128, low=1, high=MAX_SCENES
    )  # calibrate prompts whose candidates the verifier labels to train the judge
    # At most this many ordered pairs of the SFT policy's candidates. With the contrast pairs the judge trains on
    # 4,000 pairs, as many as when the two were capped together.
    scorer_max_pairs: int = setting(3232, low=0)
    # Pairs of gold responses against perturbed copies of themselves (the R-Scorer's prompts', then the sft rows'),
    # labelled by the verifier; 0: none. 768 is about what 128 prompts give (6 per prompt).
    scorer_contrast_pairs: int = setting(768, low=0)
    scorer_epochs: float = setting(3.0, low=0, high=MAX_EPOCHS)
    scorer_learning_rate: float = setting(2e-3, above=0)
    scorer_batch_size: int = setting(32, low=1)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    scoring: str = setting(
        "pairwise", choices=("pairwise", "independent")
    )  # ablation: "independent" judges each candidate alone
    # 4. Aggregation: select_by, bt_iters, bt_tol, aggregation_backend
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    # 5. Curation: tau, pairs_per_prompt, require_correct_chosen...
    curation: CurationConfig = field(default_factory=CurationConfig)
    # 6. Weighted DPO
    dpo_epochs: float = setting(2.0, above=0, high=MAX_EPOCHS)
    dpo_learning_rate: float = setting(
        1e-4, above=0
    )  # 5e-4 without the anchor collapsed a perceiving policy (0.52 -> 0.19 accuracy)
    dpo_batch_size: int = setting(16, low=1)
    dpo_nll_weight: float = setting(
        1.0, low=0
    )  # TRL's likelihood anchor on the chosen response (RPO's alpha); 0 turns it off
    # > 0: DPO-Positive's penalty (Pal et al. 2024) on a chosen response whose log-prob falls below the reference's
    # 50: on an oracle preference set, plain weighted DPO fell from 0.708 to 0.546 accuracy and lowered the chosen
    # responses' log-prob (-1.14 to -1.97); with 50, 0.688 and -0.88 (docs/results.md)
    dpo_positive_lambda: float = setting(50.0, low=0)
    beta: float = setting(0.1, above=0)
    weighted_dpo: bool = True  # ablation: False trains plain DPO on the same pairs
    # "gold_sft": the gold-data bound, SFT on the kept prompts' gold responses for the same steps instead of DPO
    policy_update: str = setting("dpo", choices=POLICY_UPDATES)
    use_fused_dpo_kernel: bool = True  # the Triton DPO loss when training on CUDA; off: the eager reference
    # 8. Evaluation
    eval_max_new_tokens: int = setting(128, low=1)  # the longest gold response is 105 tokens
    anatomy_samples: int = setting(
        6, low=0
    )  # K samples per held-out prompt: is any correct and consistent? (0: not measured)
    anatomy_temperature: float = setting(1.0, above=0)
    regression_tolerance: float = setting(
        0.02, low=0
    )  # an iteration may lose this much accuracy or consistency before a WARN
    min_blank_image_drop: float = setting(
        0.1, low=-1, high=1
    )  # the SFT policy must lose this much accuracy when its images are blanked

    def __post_init__(self):
        validate_fields(self)
        if self.min_objects > self.max_objects:
            raise ValueError(
                f"settings min_objects ({self.min_objects}) and max_objects ({self.max_objects}): min is above max"
            )
        if self.tiny_hidden_size % 16:
            raise ValueError(
                f"setting tiny_hidden_size: {self.tiny_hidden_size} must be a multiple of 16 (4 heads with even halves)"
            )
        if IMAGE_PIXELS % self.tiny_patch_size:
            raise ValueError(
                f"setting tiny_patch_size: {self.tiny_patch_size} must divide the scenes' {IMAGE_PIXELS}-pixel side"
            )
        self.runtime().torch_dtype()  # validates dtype and device
        if self.scorer_model == TINY and self.scorer_epochs == 0:
            raise ValueError(
                "setting scorer_epochs: 0 uses a pretrained judge as it is, and scorer_model=tiny is built untrained: "
                "give scorer_model=<dir or hub id> of an instruction-tuned LM (with judge_template=instruct), or "
                "train the tiny judge (scorer_epochs > 0)"
            )
        if self.lora_r == 0 and self.lora_args not in ("", "{}"):
            raise ValueError(f"settings lora.*: {self.lora_args} apply to LoRA training; set lora_r > 0")

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

    def _train(self, epochs: float, learning_rate: float, batch_size: int, stage: str, **schedule) -> TrainSettings:
        return TrainSettings(
            epochs,
            learning_rate,
            batch_size,
            self.lora_r,
            self.seed,
            self.gradient_accumulation_steps,
            self.gradient_checkpointing,
            self.max_length,
            tuple(_trackers(self.report_to)),
            self.runtime(),
            trainer_args=tuple(sorted(json.loads(getattr(self, f"{stage}_args") or "{}").items())),
            lora_args=tuple(sorted(json.loads(self.lora_args or "{}").items())),
            keep_adapter=self.keep_adapter,
            processes=self.train_processes,
            **schedule,
        )

    def base_settings(self) -> TrainSettings:
        # Full fine-tuning whatever lora_r says: the base stage trains a tiny model from random weights.
        return replace(
            self._train(
                self.base_epochs,
                self.base_learning_rate,
                self.base_batch_size,
                "base",
                lr_scheduler_type=self.base_lr_scheduler,
                warmup_steps=20,
            ),
            lora_r=0,
            processes=1,  # its probe callback stops training early: it trains in the step's process
        )

    def sft_settings(self) -> TrainSettings:
        return self._train(self.sft_epochs, self.sft_learning_rate, self.sft_batch_size, "sft")

    def scorer_settings(self) -> TrainSettings:
        return self._train(self.scorer_epochs, self.scorer_learning_rate, self.scorer_batch_size, "scorer")

    def dpo_settings(self) -> TrainSettings:
        return self._train(self.dpo_epochs, self.dpo_learning_rate, self.dpo_batch_size, "dpo")

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


# The nested settings groups; each field's flat name is its own, or the ``name`` its declaration gives.
SETTING_GROUPS = ("search", "judge", "aggregation", "curation")


@functools.cache
def setting_names() -> dict[str, tuple[str | None, str, str]]:
    """Every setting's flat name -> (nested group or None, its field there, its type name)."""
    out = {f.name: (None, f.name, f.type) for f in fields(SRCConfig) if f.name not in SETTING_GROUPS}
    for group in SETTING_GROUPS:
        for f in fields(getattr(SRCConfig(), group)):
            name = flat_name(f)
            if name in out:
                raise RuntimeError(f"setting name {name!r} is taken twice; give one a name= in its declaration")
            out[name] = (group, f.name, f.type)
    return out


def profile(name: str, **overrides) -> SRCConfig:
    """The named profile with ``overrides`` (flat names, values as strings or JSON values). It only composes: each
    settings type checks its own fields as it is made, with one-line errors that name the setting."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; expected one of {sorted(PROFILES)}")
    known = setting_names()
    overrides = _with_trainer_args(overrides)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; the settings are {sorted(known)}")
    typed = {k: coerce_setting(k, v, known[k][2]) for k, v in overrides.items()}
    base = PROFILES[name]
    nested = {
        group: replace(getattr(base, group), **{known[k][1]: v for k, v in typed.items() if known[k][0] == group})
        for group in SETTING_GROUPS
    }
    return replace(base, **{k: v for k, v in typed.items() if known[k][0] is None}, **nested)


def _with_trainer_args(overrides: dict) -> dict:
    """``sft.warmup_ratio=0.1`` and the like folded into their stage's ``sft_args`` JSON (over any given whole)."""
    out, dotted = {}, {}
    for name, value in overrides.items():
        stage, sep, field_name = name.partition(".")
        if not sep:
            out[name] = value
            continue
        if stage not in TRAINER_CONFIGS:
            raise ValueError(f"unknown setting {name!r}; dotted settings are {sorted(TRAINER_CONFIGS)}.FIELD")
        dotted.setdefault(stage, {})[field_name] = trainer_arg(stage, field_name, value)
    for stage, args in dotted.items():
        given = out.get(f"{stage}_args") or "{}"
        try:
            whole = json.loads(given) if isinstance(given, str) else dict(given)
        except (ValueError, TypeError):
            raise ValueError(f"setting {stage}_args: {str(given)[:80]!r} is not a JSON object") from None
        out[f"{stage}_args"] = json.dumps({**whole, **args}, sort_keys=True)
    return out
