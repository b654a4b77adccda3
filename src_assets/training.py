"""Settings shared by the three trainings (rationale SFT, judge, weighted DPO), and their TRL plumbing."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import polars as pl
import torch
from datasets import Dataset

from .generation import decode_image, user_turn
from .models import CPU_FLOAT32, Runtime, load_policy
from .processors import save_model_dir
from .progress import ProgressBar
from .setting import did_you_mean

# Each training's own config class, whose fields ``--set STAGE.FIELD=VALUE`` reaches (``SRCConfig.<stage>_args``).
TRAINER_CONFIGS = {
    "base": "trl:SFTConfig",
    "sft": "trl:SFTConfig",
    "judge": "trl:SFTConfig",
    "dpo": "src_assets.weighted_dpo:WeightedDPOConfig",
    "lora": "peft:LoraConfig",
}


@cache
def trainer_config_class(stage: str) -> type:
    import importlib

    module, name = TRAINER_CONFIGS[stage].split(":")
    return getattr(importlib.import_module(module), name)


def trainer_arg(stage: str, name: str, value):
    """``value`` (a command-line string or a JSON value) for field ``name`` of the stage's config class: JSON
    where it parses (numbers, booleans, lists, null), the text itself otherwise, or where the field is text."""
    cls = trainer_config_class(stage)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if name not in known:
        raise ValueError(
            f"unknown setting {stage}.{name}: {cls.__name__} has no field {name!r}{did_you_mean(name, known)}"
        )
    default = known[name].default
    parsed = value
    if isinstance(value, str) and not isinstance(default, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            pass
    number = isinstance(parsed, (int, float)) and not isinstance(parsed, bool)
    if (isinstance(default, bool) and not isinstance(parsed, bool)) or (
        isinstance(default, (int, float)) and not isinstance(default, bool) and not number
    ):
        raise ValueError(
            f"setting {stage}.{name}: {str(value)[:80]!r} is not a {type(default).__name__} "
            f"({cls.__name__}.{name} defaults to {default!r})"
        )
    return parsed


def check_trainer_args(stage: str):
    """A check for ``SRCConfig.<stage>_args``: a JSON object of the stage's config fields that makes a valid config
    (the config class validates the values: a scheduler or optimizer name, a LoRA rank...)."""

    def check(text: str) -> None:
        try:
            args = json.loads(text or "{}")
        except ValueError:
            raise ValueError(f"{text[:80]!r} is not a JSON object of {stage} config fields") from None
        if not isinstance(args, dict):
            raise ValueError(f"{text[:80]!r} is not a JSON object of {stage} config fields")
        if not args:
            return
        for name, value in args.items():
            trainer_arg(stage, name, value)
        cls = trainer_config_class(stage)
        try:
            if stage == "lora":
                cls(**args)
            else:  # checked as on a CPU: whether bf16 or a GPU is there is the training machine's to say
                hardware = {"use_cpu": True, "bf16": False, "fp16": False}
                cls(**{**args, "output_dir": tempfile.gettempdir(), **hardware})
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{cls.__name__} refuses {args}: {str(e).splitlines()[0][:200]}") from None

    return check


@dataclass(frozen=True)
class TrainSettings:
    epochs: float = 1.0
    learning_rate: float = 1e-3
    batch_size: int = 32
    lora_r: int = 0  # 0: full fine-tuning; > 0: LoRA adapters of this rank (merged into the saved checkpoint)
    seed: int = 0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_length: int = 0  # 0: no truncation; > 0: TRL truncates each example to this many tokens
    report_to: tuple[str, ...] = ()  # e.g. ("tensorboard",), ("wandb",), ("mlflow",): transformers' integrations
    runtime: Runtime = field(default=CPU_FLOAT32)
    lr_scheduler_type: str = "cosine"  # any of transformers' schedulers: "cosine", "constant_with_warmup", ...
    warmup_steps: int = 5
    trainer_args: tuple = ()  # (field, value) of the trainer's config class, over everything above
    lora_args: tuple = ()  # (field, value) of peft's LoraConfig
    keep_adapter: bool = False  # with LoRA: the adapter is saved too, in adapter/ beside the merged model
    log_dir: str = ""  # where trackers write (TensorBoard event files); "" for none of our own
    run_name: str = ""  # the trackers' run name (e.g. "policy_checkpoint/001")
    processes: int = 1  # > 1: the asset runs this training under `accelerate launch` with this many processes

    def weights_runtime(self) -> Runtime:
        """Where and in what dtype the trained model is loaded: the runtime's, except that float16 trains as
        mixed precision over float32 weights (gradients of float16 weights cannot be unscaled by the AMP scaler)."""
        if self.runtime.torch_dtype() == torch.float16:
            return replace(self.runtime, dtype="float32")
        return self.runtime

    def trl_kwargs(self, output_dir: str) -> dict:
        """The TrainingArguments every stage shares: no checkpoints of its own, precision from the runtime's dtype.

        The model is loaded in that dtype (``weights_runtime``) and trained in it, so the saved checkpoint keeps it."""
        dtype = self.runtime.torch_dtype()
        return dict(
            output_dir=output_dir,
            num_train_epochs=self.epochs,
            learning_rate=self.learning_rate,
            per_device_train_batch_size=self.batch_size,
            lr_scheduler_type=self.lr_scheduler_type,
            warmup_steps=self.warmup_steps,
            logging_steps=10,
            save_strategy="no",
            report_to=list(self.report_to),
            seed=self.seed,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            gradient_checkpointing=self.gradient_checkpointing,
            max_length=self.max_length or None,
            dataloader_num_workers=0,
            disable_tqdm=True,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_cpu=self.runtime.torch_device().type == "cpu",
            **({"run_name": self.run_name} if self.run_name else {}),
        )

    def peft_config(self):
        if self.lora_r <= 0:
            return None
        from peft import LoraConfig

        defaults = dict(r=self.lora_r, lora_alpha=2 * self.lora_r, target_modules="all-linear", lora_dropout=0.0)
        return LoraConfig(**{**defaults, **dict(self.lora_args)})

    def tracker_callbacks(self) -> list:
        """TensorBoard's callback writing under ``log_dir``: transformers' own would write under the trainer's
        output directory, a scratch folder deleted after training."""
        if "tensorboard" not in self.report_to or not self.log_dir:
            return []
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        return [TensorBoardCallback(SummaryWriter(log_dir=self.log_dir))]


def quiet(trainer, desc: str):
    """Keeps the trainer's log lines off stdout (which carries ``src-calibrate --json``); callbacks still get them.
    A progress bar of its steps goes to stderr instead of the trainer's own."""
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    class StepBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = ProgressBar(state.max_steps, desc)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(StepBar())
    return trainer


class DivergedTraining(ValueError):
    """A training ended with a NaN or inf weight, or a loss that is not finite or is past ``MAX_TRAIN_LOSS``:
    nothing is saved, so nothing broken is committed."""


# No loss these stages train with reaches this unless the weights are broken (a corrupted checkpoint, an update
# that blew up): cross-entropy of a uniform guess over a million tokens is 13.8, DPO's sigmoid loss starts at
# 0.69, and IPO's squared one at (1 / 2 beta)^2, 2,500 at beta = 0.01.
MAX_TRAIN_LOSS = 1e4


def save_trained(
    trainer, processing_class, out_dir: str, stage: str, suspects: str, train_loss: float, keep_adapter: bool = False
) -> None:
    """Saves a plain model directory: LoRA adapters are merged, so every checkpoint loads the same way (with
    ``keep_adapter``, the adapter is saved too, in ``adapter/``). A model with a non-finite weight, or a non-finite
    loss or one past ``MAX_TRAIN_LOSS``, is refused first with the stage and the settings likely at fault."""
    accelerator = trainer.accelerator
    if not accelerator.is_main_process:  # under several processes, the first one saves
        accelerator.wait_for_everyone()
        return
    model = accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        if keep_adapter and math.isfinite(train_loss):
            model.save_pretrained(Path(out_dir) / "adapter", safe_serialization=True)
        model = model.merge_and_unload()
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad or not math.isfinite(train_loss):
        raise DivergedTraining(
            f"{stage}: training diverged (train loss {train_loss}; {len(bad)} of {len(model.state_dict())} weight "
            f"tensors hold NaN or inf{', e.g. ' + bad[0] if bad else ''}); nothing was saved. Lower {suspects}."
        )
    if train_loss > MAX_TRAIN_LOSS:
        raise DivergedTraining(
            f"{stage}: training diverged (train loss {train_loss:.3g} is past {MAX_TRAIN_LOSS:g}, which no sane "
            f"training of these losses reaches: are the starting weights broken?); nothing was saved. Lower {suspects}."
        )
    save_model_dir(model, processing_class, out_dir)
    accelerator.wait_for_everyone()


def vision_dataset(df: pl.DataFrame, columns: dict[str, str]) -> Dataset:
    """A TRL vision dataset: ``images`` and ``prompt`` from the image/question columns, plus conversational turns.

    ``columns`` maps a TRL column (``completion``, ``chosen``, ``rejected``) to the table column holding its text;
    ``weight`` maps to a number column as it is.
    """
    data = {
        "images": [[decode_image(b)] for b in df["image"]],
        "prompt": [user_turn(q) for q in df["question"]],
    }
    for trl_column, column in columns.items():
        if trl_column == "weight":
            data["weight"] = df[column].cast(pl.Float64).to_list()
        else:
            data[trl_column] = [[{"role": "assistant", "content": t}] for t in df[column]]
    return Dataset.from_dict(data)


def train(
    load,
    dataset,
    out_dir: str,
    settings: TrainSettings,
    desc: str,
    suspects: str,
    trainer_class=None,
    config_class=None,
    callbacks=(),
    **config,
) -> dict:
    """The one training skeleton: load, config, trainer, train, save. ``load(runtime)`` returns the model and its
    processing class; ``dataset`` is a TRL dataset; ``trainer_class`` and ``config_class`` default to TRL's
    ``SFTTrainer`` and ``SFTConfig``, and ``config`` adds their fields to the settings' shared ones. The model is
    saved to ``out_dir`` (refused if non-finite: ``save_trained``, naming ``suspects``). Returns the metrics."""
    from trl import SFTConfig, SFTTrainer

    model, processing_class = load(settings.weights_runtime())
    with tempfile.TemporaryDirectory() as scratch:
        # The trainer's own fields given by the user (``--set sft.X=...``) win over the stage's.
        args = (config_class or SFTConfig)(**{**settings.trl_kwargs(scratch), **config, **dict(settings.trainer_args)})
        trainer = (trainer_class or SFTTrainer)(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=processing_class,
            peft_config=settings.peft_config(),
            callbacks=list(callbacks),
        )
        for tracker in settings.tracker_callbacks():
            trainer.remove_callback(type(tracker))  # the default one, writing into the scratch folder
            trainer.add_callback(tracker)
        result = quiet(trainer, f"{desc} (steps)").train()
    save_trained(trainer, processing_class, out_dir, desc, suspects, result.training_loss, settings.keep_adapter)
    return {"train_loss": result.training_loss, "steps": result.global_step, "log": trainer.state.log_history}


def train_vision_sft(
    model_ref: str,
    rows: pl.DataFrame,
    out_dir: str,
    settings: TrainSettings,
    desc: str,
    callbacks=(),
    suspects: str = "the learning rate",
) -> dict:
    """Supervised fine-tuning of a VLM on (question, completion, image) rows with TRL's ``SFTTrainer``, loss on the
    completion only (TRL's default for prompt-completion data); saves the model to ``out_dir``. The base stage,
    rationale SFT and the gold-data bound train this way. Returns the training metrics."""
    dataset = vision_dataset(rows, {"completion": "completion"})
    return train(
        lambda runtime: load_policy(model_ref, runtime), dataset, out_dir, settings, desc, suspects, callbacks=callbacks
    )
