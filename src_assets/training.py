"""Settings shared by the three trainings (rationale SFT, R-Scorer, weighted DPO), and their TRL plumbing."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch
from datasets import Dataset

from .generation import decode_image, user_turn


@dataclass(frozen=True)
class TrainSettings:
    epochs: float = 1.0
    learning_rate: float = 1e-3
    batch_size: int = 32
    lora_r: int = 0  # 0: full fine-tuning; > 0: LoRA adapters of this rank (merged into the saved checkpoint)
    seed: int = 0

    def trl_kwargs(self, output_dir: str) -> dict:
        """The TrainingArguments every stage shares: CPU-friendly, no checkpoints or reporting of its own."""
        return dict(
            output_dir=output_dir,
            num_train_epochs=self.epochs,
            learning_rate=self.learning_rate,
            per_device_train_batch_size=self.batch_size,
            lr_scheduler_type="cosine",
            warmup_steps=5,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            seed=self.seed,
            gradient_checkpointing=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
            # Mixed precision where a GPU supports it; fp32 on the CPU.
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        )

    def peft_config(self):
        if self.lora_r <= 0:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=2 * self.lora_r, target_modules="all-linear", lora_dropout=0.0)


def quiet(trainer):
    """Keeps the trainer's log lines off stdout (which carries ``src-calibrate --json``); callbacks still get them."""
    from transformers import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def save_trained(trainer, processing_class, out_dir: str) -> None:
    """Saves a plain model directory: LoRA adapters are merged, so every checkpoint loads the same way."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    processing_class.save_pretrained(out_dir)


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
