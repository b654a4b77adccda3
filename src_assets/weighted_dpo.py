"""Stage 6: confidence-weighted DPO, as a subclass of TRL's ``DPOTrainer``.

TRL prepares the batches (its own vision or text preference collators) and
runs the training loop; this subclass changes only the loss:

- each pair's loss is multiplied by the ``weight`` column of the preference
  table (``c_i`` in ``mean_i c_i * -log sigmoid(beta * margin_i)``); with all
  weights 1 it equals TRL's own ``sigmoid`` DPO loss;
- TRL's likelihood anchor (``loss_type=["sigmoid", "sft"]`` with
  ``loss_weights=[1, alpha]``, RPO) is kept: ``alpha`` times the chosen
  responses' per-token negative log-likelihood, each pair's tokens weighted by
  its ``c_i`` too (all weights 1: TRL's own ``sft`` term);
- the reference log-probs are computed once per preference set, before
  training, through the same fused path (TRL's ``precompute_ref_log_probs``), so no
  second model is held while the policy trains;
- the model runs its backbone once (``logits_to_keep=1``, so no full-sequence
  logits), and only completion positions go through the LM head: the fused
  Triton kernel from ``kernels.dpo`` on CUDA, its eager PyTorch reference
  elsewhere or when ``use_fused_kernel=False``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from kernels.dpo import sequence_logps, sequence_logps_reference, weighted_dpo_loss, weighted_dpo_loss_reference

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
_NON_MODEL_KEYS = {"completion_mask", *REFERENCE_COLUMNS, "pair_weights"}


@dataclass
class WeightedDPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` plus what the weighted loss needs."""

    weight_column: str = field(default="weight", metadata={"help": "Column of per-pair confidence weights c_i."})
    use_fused_kernel: bool = field(default=True, metadata={"help": "Triton loss on CUDA; off: the eager reference."})
    dpop_lambda: float = field(
        default=0.0,
        metadata={
            "help": "DPO-Positive (Pal et al. 2024): the margin loses this times the fall of the chosen response's "
            "log-prob below the reference's; 0: plain DPO."
        },
    )
    # TRL's own field, on by default here; TRL refuses it for vision datasets, so this trainer computes the
    # reference log-probs itself, through the same fused path as the loss.
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "Compute the reference log-probs once before training, so no reference model is held while training."
        },
    )


class WeightedPreferenceCollator:
    """Wraps TRL's preference collator: the weight of each example becomes ``pair_weights`` [P], and precomputed
    reference log-probs (which TRL's vision collator does not carry) pass through."""

    def __init__(self, base, weight_column: str = "weight"):
        self.base, self.weight_column = base, weight_column

    def __call__(self, examples):
        weights = [float(e.pop(self.weight_column, 1.0)) for e in examples]
        reference = {c: [e.pop(c) for e in examples] for c in REFERENCE_COLUMNS if c in examples[0]}
        batch = self.base(examples)
        batch["pair_weights"] = torch.tensor(weights, dtype=torch.float32)
        for column, values in reference.items():
            batch[column] = torch.tensor(values, dtype=torch.float32)
        return batch


def _peft_free(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shares_weights(model):
    """A second module object over the same parameters: what TRL takes as the reference model when the reference
    log-probs are precomputed from the policy's starting weights, so that TRL loads no copy of its own."""
    return copy.copy(model)


class WeightedDPOTrainer(DPOTrainer):
    def __init__(
        self,
        model,
        ref_model=None,
        args: WeightedDPOConfig | None = None,
        *rest,
        use_fused_kernel: bool | None = None,
        **kwargs,
    ):
        if args is not None and not isinstance(args, WeightedDPOConfig):
            raise TypeError(f"WeightedDPOTrainer takes a WeightedDPOConfig, got {type(args).__name__}")
        peft = kwargs.get("peft_config") is not None or hasattr(model, "peft_config")
        precompute = args is not None and args.precompute_ref_log_probs
        if ref_model is None and precompute and not peft:
            ref_model = shares_weights(model)
        if precompute:
            args.precompute_ref_log_probs = False  # TRL's check refuses it for vision datasets; done below instead
        super().__init__(model, ref_model, args, *rest, **kwargs)
        if precompute:
            self.args.precompute_ref_log_probs = True
        if (
            list(self.loss_types) not in (["sigmoid"], ["sigmoid", "sft"])
            or self.f_divergence_type != "reverse_kl"
            or self.ld_alpha is not None
        ):
            raise ValueError(
                "WeightedDPOTrainer implements the sigmoid DPO loss, optionally with TRL's 'sft' likelihood anchor "
                "(loss_type=['sigmoid'] or ['sigmoid', 'sft'], reverse KL, no ld_alpha)"
            )
        weights = list(self.args.loss_weights or [1.0] * len(self.loss_types))
        self.nll_weight = weights[1] / weights[0] if len(weights) > 1 else 0.0
        self.dpo_loss_weight = weights[0]
        self.use_fused_kernel = self.args.use_fused_kernel if use_fused_kernel is None else use_fused_kernel
        self.data_collator = WeightedPreferenceCollator(self.data_collator, self.args.weight_column)
        if precompute:
            self.train_dataset = self._with_reference_logps(self.train_dataset)
            self.precompute_ref_logps = True
            self.ref_model = None  # the shared-weights view would follow the policy as it trains

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [c for c in (self.args.weight_column, *REFERENCE_COLUMNS) if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    @torch.no_grad()
    def _with_reference_logps(self, dataset):
        """``dataset`` with each pair's reference log-probs, computed once with the model at its starting weights."""
        device = self.accelerator.device
        loader = DataLoader(
            dataset,
            batch_size=self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size,
            shuffle=False,
            collate_fn=self.data_collator,
        )
        self.model.to(device)
        chosen, rejected = [], []
        for batch in tqdm(loader, desc="reference log-probs", disable=self.args.disable_tqdm):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            model_kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
            labels = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
            with self.accelerator.autocast():
                c, r = self._reference_logps(batch, model_kwargs, labels).chunk(2)
            chosen += c.float().cpu().tolist()
            rejected += r.float().cpu().tolist()
        return dataset.add_column(REFERENCE_COLUMNS[0], chosen).add_column(REFERENCE_COLUMNS[1], rejected)

    def _fused(self, device: torch.device) -> bool:
        return self.use_fused_kernel and device.type == "cuda"

    def _completion_hidden(self, model, model_kwargs):
        """Final hidden states of every position; the LM head runs on the last position only."""
        outputs = model(**model_kwargs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        return outputs.hidden_states[-1][:, :-1]

    @staticmethod
    def _lm_head(model):
        head = _peft_free(model).get_output_embeddings()
        return head.weight, head.bias

    def _reference_logps(self, inputs, model_kwargs, labels):
        if self.precompute_ref_logps:
            return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float().to(labels.device)
        ref_model, adapter = self.ref_model, contextlib.nullcontext()
        if ref_model is None:  # a PEFT policy: the reference is the model with its adapter switched off
            ref_model = self.model
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter,
        ):
            hidden = self._completion_hidden(ref_model, model_kwargs)
            weight, bias = self._lm_head(self.accelerator.unwrap_model(ref_model))
            logps_fn = sequence_logps if self._fused(hidden.device) else sequence_logps_reference
            return logps_fn(hidden, weight, labels, bias)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        # labels[:, t] is the target of hidden[:, t]: the next token, counted only inside the completion.
        labels = inputs["input_ids"][:, 1:].masked_fill(inputs["completion_mask"][:, 1:] == 0, -100)
        hidden = self._completion_hidden(model, model_kwargs)
        weight, bias = self._lm_head(self.accelerator.unwrap_model(model))
        ref_logps = self._reference_logps(inputs, model_kwargs, labels)
        pair_weights = inputs.get("pair_weights")
        loss_fn = weighted_dpo_loss if self._fused(hidden.device) else weighted_dpo_loss_reference
        loss, policy_logps = loss_fn(
            hidden, weight, labels, ref_logps, pair_weights, self.beta, bias, dpop_lambda=self.args.dpop_lambda
        )
        loss = loss * self.dpo_loss_weight
        if self.nll_weight:
            chosen_tokens = (labels != -100).sum(1).chunk(2)[0].float()
            w = pair_weights.to(loss.device) if pair_weights is not None else torch.ones_like(chosen_tokens)
            nll = -(w * policy_logps.chunk(2)[0]).sum() / (w * chosen_tokens).sum().clamp(min=1.0)
            loss = loss + self.dpo_loss_weight * self.nll_weight * nll
            self._metrics[mode]["nll/chosen"].append(self.accelerator.gather(nll.detach()).mean().item())

        with torch.no_grad():
            chosen_logps, rejected_logps = policy_logps.chunk(2)
            ref_chosen, ref_rejected = ref_logps.chunk(2)
            chosen_rewards = self.beta * (chosen_logps - ref_chosen)
            rejected_rewards = self.beta * (rejected_logps - ref_rejected)
            gather = self.accelerator.gather
            self._metrics[mode]["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            self._metrics[mode]["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            self._metrics[mode]["rewards/accuracies"].append(
                gather((chosen_rewards > rejected_rewards).float()).mean().item()
            )
            self._metrics[mode]["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
            self._metrics[mode]["logps/chosen"].append(gather(chosen_logps).mean().item())
            self._metrics[mode]["logps/rejected"].append(gather(rejected_logps).mean().item())
            if pair_weights is not None:
                self._metrics[mode]["pair_weight"].append(gather(pair_weights.to(loss.device)).mean().item())
        return (loss, None) if return_outputs else loss


def train_weighted_dpo(
    policy_model: str,
    preference_set,
    out_dir: str,
    settings,
    beta: float = 0.1,
    use_fused_kernel: bool = True,
    weighted: bool = True,
    nll_weight: float = 0.0,
    callbacks=(),
    dpop_lambda: float = 0.0,
) -> dict:
    """One SRC iteration's preference fine-tuning: the policy trained on the kept pairs, reference = its start.

    ``weighted=False`` trains on the same pairs with every weight 1 (plain DPO), the ablation of confidence weighting.
    ``nll_weight`` > 0 adds TRL's likelihood anchor on the chosen responses (RPO's ``alpha``); ``dpop_lambda`` > 0
    adds DPO-Positive's penalty on a chosen response whose log-prob falls below the reference's.
    """
    import polars as pl

    from .models import load_policy
    from .training import train, vision_dataset

    kept = preference_set.filter(pl.col("kept"))
    if kept.is_empty():
        raise ValueError("the preference set keeps no pair: nothing to train on (lower tau, or check the judge)")
    if not weighted:
        kept = kept.with_columns(pl.lit(1.0).alias("weight"))
    dataset = vision_dataset(kept, {"chosen": "chosen", "rejected": "rejected", "weight": "weight"})
    anchor = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, nll_weight]) if nll_weight > 0 else {}
    # The reference log-probs are computed once from the starting weights (with LoRA: the adapter switched off).
    result = train(
        lambda runtime: load_policy(policy_model, runtime),
        dataset,
        out_dir,
        settings,
        "weighted DPO",
        "dpo_learning_rate or beta",
        WeightedDPOTrainer,
        WeightedDPOConfig,
        callbacks,
        beta=beta,
        use_fused_kernel=use_fused_kernel,
        dpop_lambda=dpop_lambda,
        **anchor,
    )
    return {**result, "pairs": kept.height}


def train_gold_bound(policy_model: str, preference_set, out_dir: str, settings, callbacks=()) -> dict:
    """The gold-data bound of an iteration: instead of DPO on the kept pairs, SFT of the same start policy on the
    same prompts' gold responses, one row per kept pair, with the same settings (epochs, batch size, learning rate)
    and so the same number of steps. What plain supervision of those prompts gives."""
    import polars as pl

    from .training import train_vision_sft

    kept = preference_set.filter(pl.col("kept"))
    if kept.is_empty():
        raise ValueError("the preference set keeps no pair: the gold-data bound has no prompt to train on")
    missing = kept.filter(pl.col("gold_response").is_null())
    if not missing.is_empty():
        raise ValueError(
            f"policy_update=gold_sft needs each kept prompt's gold response; prompt "
            f"{missing['prompt_id'][0]!r} has none (no scene, no 'response' in the source)"
        )
    rows = kept.select("question", "image", pl.col("gold_response").alias("completion"))
    result = train_vision_sft(policy_model, rows, out_dir, settings, "gold-data bound", callbacks, "dpo_learning_rate")
    return {**result, "pairs": kept.height}
