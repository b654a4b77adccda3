"""Every run setting, in ``SRCConfig``; the named profiles and ``--set`` are in ``profiles.py``.

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
from dataclasses import dataclass, field, fields, replace

from .base_stage import ANSWER_FORMS
from .candidate_search import SearchConfig
from .judge import JudgeConfig
from .models import Runtime
from .preference import AggregationConfig, CurationConfig
from .scenes import IMAGE_PIXELS
from .setting import allowed_values, flat_name, setting, validate_fields
from .source_data import parse_source_columns, parse_split_fractions
from .tiny_models import JUDGE_ARCHITECTURES, POLICY_ARCHITECTURES, TinySpec
from .training import TrainSettings, check_trainer_args

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
# off, judge_epochs=0 uses a pretrained judge as it is, lora_r=0 is full fine-tuning).
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
    seed: int = setting(0, low=0, high=2**32 - 1, help="Seeds the synthetic data, the tiny models and every training.")
    # --- Data ---
    # 8,000 rows for 2 epochs (500 steps): with 2,000 rows for 3 epochs (189 steps) the local steps are not yet
    # learned (consistency 0.08), and an oracle iteration found a pair to keep for 47 of 1,024 prompts (519 at 500
    # steps; docs/results.md)
    n_sft: int = setting(8000, low=0, high=MAX_SCENES, help="Synthetic rationale-SFT rows (0: none).")
    n_calibrate: int = setting(
        2200, low=0, high=MAX_SCENES, help="Synthetic calibrate rows: the judge's prompts, then each iteration's."
    )
    n_eval: int = setting(500, low=0, high=MAX_SCENES, help="Synthetic held-out rows.")
    min_objects: int = setting(2, low=1, help="Fewest objects in a synthetic scene.")
    max_objects: int = setting(5, low=1, help="Most objects in a synthetic scene.")
    teacher_error_rate: float = setting(
        0.2,
        low=0,
        high=1,
        help="Share of SFT rationales that misperceive one object while the answer stays gold, as a teacher's do.",
    )
    teacher_slip_rate: float = setting(
        0.0, low=0, high=1, help="Share of SFT rationales with one wrong reasoning step while the answer stays gold."
    )
    synthetic_rows: str = setting(
        "auto",
        choices=("auto", "on", "off"),
        help="auto: synthetic scenes only when you bring no rows (no source files, no source_datasets); "
        "on: they join your rows; off: never.",
    )
    source_prefix: str = setting("source", help="Store folder whose Parquet, JSON and datasets files are your rows.")
    judgements_prefix: str = setting(
        "judgements", help="Store folder whose Parquet judgement tables train the judge too."
    )
    source_datasets: str = setting(
        "", help="Hugging Face hub datasets read besides the store's files, comma-separated (offline: the cache)."
    )
    source_columns: str = setting(
        "",
        check=parse_source_columns,
        help="Your column names for ours, e.g. question:prompt,answer:label,image:img.",
    )
    split_fractions: str = setting(
        "",
        check=parse_split_fractions,
        help="Rows without a split column are split by a hash of their id, e.g. sft:0.5,calibrate:0.4,eval:0.1.",
    )
    max_source_file_bytes: int = setting(4 * 2**30, low=1, help="A source file over this is refused before reading.")
    max_image_pixels: int = setting(4096 * 4096, low=1, help="An image over this area is refused before decoding.")
    max_text_chars: int = setting(65536, low=1, help="A source text cell longer than this is refused.")
    # --- Models ---
    policy_model: str = setting(TINY, help="The policy VLM: tiny (built here), a local model directory, or a hub id.")
    judge_model: str = setting(
        TINY, help="The judge: tiny (built and trained here), verifier (the oracle), a local directory, or a hub id."
    )
    tiny_policy_architecture: str = setting(
        "llava", choices=POLICY_ARCHITECTURES, help="The tiny policy's model family."
    )
    tiny_judge_architecture: str = setting(
        "llama",
        choices=JUDGE_ARCHITECTURES,
        help="The tiny judge's family: llama (word-level tokenizer) or qwen2 (byte-level BPE).",
    )
    tiny_hidden_size: int = setting(128, low=1, help="Hidden size of the tiny models (a multiple of 16).")
    tiny_layers: int = setting(2, low=0, help="Decoder layers of the tiny models.")
    # With one 16-pixel patch per grid cell, shapes stayed at chance after 2,000 steps (docs/results.md).
    tiny_patch_size: int = setting(8, low=1, help="Pixels per side of the tiny vision tower's patches.")
    tiny_position_embedding_std: float = setting(
        0.5, low=0, help="Initial scale of the tiny vision tower's position embeddings."
    )
    lora_r: int = setting(0, low=0, help="0: full fine-tuning; > 0: LoRA of this rank (peft), merged on save.")
    reuse_checkpoints: bool = setting(True, help="Reuse a model trained earlier from exactly the same inputs.")
    # --- Hardware and precision, for every stage that runs a model ---
    device: str = setting("auto", help="auto: CUDA when available, else CPU; or a torch device such as cuda:1.")
    dtype: str = setting(
        "auto", help="auto: bfloat16 on a GPU that supports it, else float32; models train and are saved in it."
    )
    attn_implementation: str = setting("", help="Empty lets transformers choose; or e.g. sdpa, flash_attention_2.")
    image_min_pixels: int = setting(0, low=0, help="> 0: Qwen-family processors' smallest image area.")
    image_max_pixels: int = setting(
        0, low=0, help="> 0: Qwen-family processors' largest image area (bounds image tokens per prompt)."
    )
    # --- Training, shared by every training ---
    gradient_accumulation_steps: int = setting(1, low=1, help="Batches accumulated per optimizer step.")
    gradient_checkpointing: bool = setting(False, help="Recompute activations in backward to save memory.")
    max_length: int = setting(0, low=0, help="> 0: training examples are truncated to this many tokens.")
    report_to: str = setting(
        "", check=_check_report_to, help="Comma-separated transformers trackers: tensorboard, wandb, mlflow."
    )
    logging_dir: str = setting(
        "", help="Where trackers write, per asset and iteration; empty: logs/ beside a local store (./logs else)."
    )
    # The trainers' own configs win over the settings above (``--set sft.warmup_ratio=0.1`` writes sft_args).
    base_args: str = setting(
        "{}", check=check_trainer_args("base"), help="TRL SFTConfig fields for the base stage, as JSON."
    )
    sft_args: str = setting("{}", check=check_trainer_args("sft"), help="TRL SFTConfig fields for rationale SFT.")
    judge_args: str = setting(
        "{}", check=check_trainer_args("judge"), help="TRL SFTConfig fields for the judge's training, as JSON."
    )
    dpo_args: str = setting(
        "{}", check=check_trainer_args("dpo"), help="WeightedDPOConfig (a TRL DPOConfig) fields, as JSON."
    )
    lora_args: str = setting("{}", check=check_trainer_args("lora"), help="peft LoraConfig fields, as JSON.")
    train_processes: int = setting(
        1,
        low=1,
        high=1024,
        help="> 1: SFT, the judge and DPO train in this many processes under accelerate launch (one per GPU).",
    )
    keep_adapter: bool = setting(False, help="With lora_r > 0: keep each LoRA adapter beside the merged model.")
    # --- 0. The base stage (tiny policy only; a hub model is already capable) ---
    n_base: int = setting(16000, low=0, high=MAX_SCENES, help="Perception corpus rows, on scenes of their own.")
    base_caption_share: float = setting(0.7, low=0, high=1, help="Share of captions; the rest are direct answers.")
    base_answer_form: str = setting(
        "sentence",
        choices=ANSWER_FORMS,
        help="Direct answers: sentence (a sentence on the asked subject, then the answer) or short.",
    )
    base_epochs: float = setting(
        3.0, above=0, high=MAX_EPOCHS, help="Epochs at most: training stops once captions reach the listing goal."
    )
    base_stop_at_exact_listing: float = setting(
        0.9, low=0, high=1, help="Stop once probe captions list their scene exactly this often (0: never early)."
    )
    base_check_every: int = setting(250, low=1, help="Steps between probe checks (100 probe scenes each).")
    base_learning_rate: float = setting(1e-3, above=0, help="Base stage learning rate.")
    base_batch_size: int = setting(32, low=1, help="Base stage batch size.")
    # cosine decays before the plateau is crossed (docs/results.md)
    base_lr_scheduler: str = setting("constant_with_warmup", help="Base stage learning-rate schedule (transformers).")
    min_base_exact_listing: float = setting(
        0.8, low=0, high=1, help="The base policy's captions must list the scene exactly this often (WARN)."
    )
    # --- 1. Rationale SFT: light, from a base policy that perceives ---
    sft_epochs: float = setting(2.0, above=0, high=MAX_EPOCHS, help="Rationale SFT epochs.")
    sft_learning_rate: float = setting(1e-3, above=0, help="Rationale SFT learning rate.")
    sft_batch_size: int = setting(32, low=1, help="Rationale SFT batch size.")
    # --- 2. Candidate search (k, beams, samples_per_beam, temperature...: SearchConfig) ---
    prompts_per_iteration: int = setting(1024, low=1, high=MAX_SCENES, help="Calibrate prompts per iteration.")
    shards: int = setting(
        1, low=1, high=4096, help="Candidate search and judging run as this many steps over ranges of the prompts."
    )
    search: SearchConfig = field(default_factory=SearchConfig)
    # --- 3. The judge (judge_template, judge_batch_size, judge_tie_margin...: JudgeConfig) ---
    judge_prompts: int = setting(
        128, low=1, high=MAX_SCENES, help="Calibrate prompts whose candidates the verifier labels to train the judge."
    )
    # With the contrast pairs the judge trains on 4,000 pairs, as many as when the two were capped together.
    judge_max_pairs: int = setting(3232, low=0, help="Ordered pairs of the SFT policy's candidates at most.")
    # 768 is about what 128 prompts give (6 per prompt).
    judge_contrast_pairs: int = setting(
        768, low=0, help="Gold responses against perturbed copies of themselves, labelled by the verifier (0: none)."
    )
    judge_epochs: float = setting(
        3.0, low=0, high=MAX_EPOCHS, help="The judge's training epochs; 0 uses a pretrained judge_model as it is."
    )
    judge_learning_rate: float = setting(2e-3, above=0, help="The judge's learning rate.")
    judge_train_batch_size: int = setting(32, low=1, help="The judge's batch size.")
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    scoring: str = setting(
        "pairwise",
        choices=("pairwise", "independent"),
        help="pairwise (the method), or independent: each candidate judged alone (an ablation).",
    )
    # --- 4. Aggregation (select_by, bt_iters, bt_tol, aggregation_backend: AggregationConfig) ---
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    # --- 5. Curation (tau, pairs_per_prompt, require_correct_chosen...: CurationConfig) ---
    curation: CurationConfig = field(default_factory=CurationConfig)
    # --- 6. Weighted DPO ---
    dpo_epochs: float = setting(2.0, above=0, high=MAX_EPOCHS, help="DPO epochs.")
    # 5e-4 without the anchor collapsed a perceiving policy (0.52 -> 0.19 accuracy)
    dpo_learning_rate: float = setting(1e-4, above=0, help="DPO learning rate.")
    dpo_batch_size: int = setting(16, low=1, help="DPO batch size (pairs).")
    dpo_nll_weight: float = setting(
        1.0, low=0, help="TRL's likelihood anchor on the chosen response (RPO's alpha); 0 turns it off."
    )
    # 50: on an oracle preference set, plain weighted DPO fell from 0.708 to 0.546 accuracy and lowered the chosen
    # responses' log-prob (-1.14 to -1.97); with 50, 0.688 and -0.88 (docs/results.md)
    dpo_positive_lambda: float = setting(
        50.0, low=0, help="> 0: DPO-Positive's penalty when a chosen response's log-prob falls below the reference's."
    )
    beta: float = setting(0.1, above=0, help="DPO's beta: how far the policy may move from its reference.")
    weighted_dpo: bool = setting(True, help="Weight each pair's loss by its confidence; false: plain DPO (ablation).")
    policy_update: str = setting(
        "dpo",
        choices=POLICY_UPDATES,
        help="dpo, or gold_sft: the gold-data bound, SFT on the kept prompts' gold responses for the same steps.",
    )
    use_fused_dpo_kernel: bool = setting(
        True, help="The Triton DPO loss when training on CUDA; false: the PyTorch reference."
    )
    # --- 7. Evaluation ---
    eval_max_new_tokens: int = setting(
        128, low=1, help="Tokens at most per held-out response (the longest gold response is 105)."
    )
    anatomy_samples: int = setting(
        6, low=0, help="Samples per held-out prompt: is any correct and consistent? (0: not measured)."
    )
    anatomy_temperature: float = setting(1.0, above=0, help="Sampling temperature of the anatomy samples.")
    regression_tolerance: float = setting(
        0.02, low=0, help="An iteration may lose this much accuracy or consistency before a WARN."
    )
    min_blank_image_drop: float = setting(
        0.1, low=-1, high=1, help="The SFT policy must lose this much accuracy when its images are blanked."
    )

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
        if self.judge_model == TINY and self.judge_epochs == 0:
            raise ValueError(
                "setting judge_epochs: 0 uses a pretrained judge as it is, and judge_model=tiny is built untrained: "
                "give judge_model=<dir or hub id> of an instruction-tuned LM (with judge_template=instruct), or "
                "train the tiny judge (judge_epochs > 0)"
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

    def _training_settings(
        self, epochs: float, learning_rate: float, batch_size: int, stage: str, **schedule
    ) -> TrainSettings:
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
            self._training_settings(
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
        return self._training_settings(self.sft_epochs, self.sft_learning_rate, self.sft_batch_size, "sft")

    def judge_settings(self) -> TrainSettings:
        return self._training_settings(
            self.judge_epochs, self.judge_learning_rate, self.judge_train_batch_size, "judge"
        )

    def dpo_settings(self) -> TrainSettings:
        return self._training_settings(self.dpo_epochs, self.dpo_learning_rate, self.dpo_batch_size, "dpo")

    def setting(self, name: str):
        """A setting by its flat name (``k`` is ``self.search.k``)."""
        group, attr, _ = setting_names()[name]
        return getattr(getattr(self, group) if group else self, attr)


# Every setting under the heading ``src-calibrate settings`` lists it with (a test checks that each is in one).
SETTING_SECTIONS: dict[str, tuple[str, ...]] = {
    "Data": (
        "seed",
        "n_sft",
        "n_calibrate",
        "n_eval",
        "min_objects",
        "max_objects",
        "teacher_error_rate",
        "teacher_slip_rate",
        "synthetic_rows",
        "source_prefix",
        "judgements_prefix",
        "source_datasets",
        "source_columns",
        "split_fractions",
        "max_source_file_bytes",
        "max_image_pixels",
        "max_text_chars",
    ),
    "Models": (
        "policy_model",
        "judge_model",
        "tiny_policy_architecture",
        "tiny_judge_architecture",
        "tiny_hidden_size",
        "tiny_layers",
        "tiny_patch_size",
        "tiny_position_embedding_std",
        "lora_r",
        "reuse_checkpoints",
    ),
    "Hardware and precision": RUNTIME_SETTINGS,
    "Training (every training)": (
        "gradient_accumulation_steps",
        "gradient_checkpointing",
        "max_length",
        "report_to",
        "logging_dir",
        "base_args",
        "sft_args",
        "judge_args",
        "dpo_args",
        "lora_args",
        "train_processes",
        "keep_adapter",
    ),
    "0. Base stage (tiny policy)": (
        "n_base",
        "base_caption_share",
        "base_answer_form",
        "base_epochs",
        "base_stop_at_exact_listing",
        "base_check_every",
        "base_learning_rate",
        "base_batch_size",
        "base_lr_scheduler",
        "min_base_exact_listing",
    ),
    "1. Rationale SFT": ("sft_epochs", "sft_learning_rate", "sft_batch_size"),
    "2. Candidate search": (
        "prompts_per_iteration",
        "shards",
        "k",
        "beams",
        "samples_per_beam",
        "temperature",
        "max_sentences",
        "max_sentence_tokens",
        "search_batch_size",
        "sentence_delimiter",
        "include_greedy",
        "search_backend",
    ),
    "3. The judge": (
        "judge_prompts",
        "judge_max_pairs",
        "judge_contrast_pairs",
        "judge_epochs",
        "judge_learning_rate",
        "judge_train_batch_size",
        "judge_template",
        "judge_batch_size",
        "judge_quality_weights",
        "judge_tie_margin",
        "scoring",
    ),
    "4. Aggregation": ("select_by", "bt_iters", "bt_tol", "aggregation_backend"),
    "5. Curation": (
        "tau",
        "pairs_per_prompt",
        "require_correct_chosen",
        "require_consistent_chosen",
        "require_factual_chosen",
    ),
    "6. Weighted DPO": (
        "dpo_epochs",
        "dpo_learning_rate",
        "dpo_batch_size",
        "dpo_nll_weight",
        "dpo_positive_lambda",
        "beta",
        "weighted_dpo",
        "policy_update",
        "use_fused_dpo_kernel",
    ),
    "7. Evaluation": (
        "eval_max_new_tokens",
        "anatomy_samples",
        "anatomy_temperature",
        "regression_tolerance",
        "min_blank_image_drop",
    ),
}


def setting_reference(cfg: SRCConfig) -> list[dict]:
    """Every setting as ``src-calibrate settings`` shows it: section, flat name, type, value in ``cfg`` (a
    profile's defaults), allowed values or range, and help."""
    rows = []
    for section, names in SETTING_SECTIONS.items():
        for name in names:
            group, attr, kind = setting_names()[name]
            owner = getattr(cfg, group) if group else cfg
            declared = next(f for f in fields(owner) if f.name == attr)
            rows.append(
                {
                    "section": section,
                    "name": name,
                    "type": kind.split("[")[0],
                    "value": getattr(owner, attr),
                    "allowed": allowed_values(declared),
                    "help": declared.metadata.get("help", ""),
                }
            )
    return rows


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
