"""Settings shared by the three trainings (rationale SFT, R-Scorer, weighted DPO), and their TRL plumbing."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field, replace

import polars as pl
import torch
from datasets import Dataset

from .generation import decode_image, user_turn
from .models import CPU_FLOAT32, Runtime, load_policy
from .processors import save_model_dir
from .progress import ProgressBar


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
        )

    def peft_config(self):
        if self.lora_r <= 0:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=2 * self.lora_r, target_modules="all-linear", lora_dropout=0.0)


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


class NonFiniteTraining(ValueError):
    """A training ended with a NaN or inf loss or weight: nothing is saved, so nothing non-finite is committed."""


def save_trained(trainer, processing_class, out_dir: str, stage: str, suspects: str, train_loss: float) -> None:
    """Saves a plain model directory: LoRA adapters are merged, so every checkpoint loads the same way. A model
    with a non-finite weight, or a non-finite loss, is refused first with the stage and the settings likely at fault."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad or not math.isfinite(train_loss):
        raise NonFiniteTraining(
            f"{stage}: training diverged (train loss {train_loss}; {len(bad)} of {len(model.state_dict())} weight "
            f"tensors hold NaN or inf{', e.g. ' + bad[0] if bad else ''}); nothing was saved. Lower {suspects}."
        )
    save_model_dir(model, processing_class, out_dir)


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
        args = (config_class or SFTConfig)(**settings.trl_kwargs(scratch), **config)
        trainer = (trainer_class or SFTTrainer)(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=processing_class,
            peft_config=settings.peft_config(),
            callbacks=list(callbacks),
        )
        result = quiet(trainer, f"{desc} (steps)").train()
    save_trained(trainer, processing_class, out_dir, desc, suspects, result.training_loss)
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
