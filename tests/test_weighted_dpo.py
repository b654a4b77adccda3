"""The weighted DPO trainer against TRL's own DPO loss, on the tiny VLM."""

import io

import pytest
import torch
from datasets import Dataset
from PIL import Image
from trl import DPOTrainer

from src_assets.models import load_policy
from src_assets.scenes import generate_examples
from src_assets.weighted_dpo import WeightedDPOConfig, WeightedDPOTrainer


def _rows(n, weights):
    rows = []
    for e, w in zip(generate_examples(n, seed=4, split="calibrate"), weights):
        r = e.row()
        rows.append(
            {
                "images": [Image.open(io.BytesIO(r["image"])).convert("RGB")],
                "prompt": [{"role": "user", "content": r["question"]}],
                "chosen": [{"role": "assistant", "content": r["response"]}],
                "rejected": [{"role": "assistant", "content": "there is a red circle at the top left.\nAnswer: no"}],
                "weight": w,
            }
        )
    return rows


def _trainer(tiny_dirs, tmp_path, rows, loss=None, **kwargs):
    model, processor = load_policy(str(tiny_dirs[0]))
    ref, _ = load_policy(str(tiny_dirs[0]))
    # Perturb the policy so that policy and reference log-probs differ and the loss is not log(2).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    # A live reference model, as TRL's own loss uses, so the two can be compared step for step.
    args = WeightedDPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(rows),
        report_to=[],
        use_cpu=True,
        max_steps=1,
        learning_rate=1e-3,
        save_strategy="no",
        beta=0.5,
        precompute_ref_log_probs=False,
        **(loss or {}),
    )
    dataset = Dataset.from_list(rows)
    return WeightedDPOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=dataset, processing_class=processor, **kwargs
    )


def _batch(trainer, rows):
    return trainer.data_collator([dict(r) for r in rows])


def test_all_weights_one_equals_trl_dpo_loss(tiny_dirs, tmp_path):
    rows = _rows(4, [1.0] * 4)
    trainer = _trainer(tiny_dirs, tmp_path, rows)
    batch = _batch(trainer, rows)
    assert batch["pair_weights"].tolist() == [1.0] * 4
    ours = trainer._compute_loss(trainer.model, dict(batch), False)
    trl_batch = {k: v for k, v in batch.items() if k != "pair_weights"}
    theirs = DPOTrainer._compute_loss(trainer, trainer.model, trl_batch, False)
    assert ours.item() != pytest.approx(0.6931, abs=1e-3)
    # Sequence log-probs here are sums of ~100 fp32 token log-probs (about -250); TRL's tiled LM head and ours
    # sum in different orders, which moves them by ~1e-3 and the loss by ~1e-4.
    torch.testing.assert_close(ours, theirs, atol=5e-4, rtol=1e-4)


def test_likelihood_anchor_equals_trl_sigmoid_plus_sft(tiny_dirs, tmp_path):
    """RPO as TRL spells it (loss_type ['sigmoid', 'sft'], loss_weights [1, alpha]) gives TRL's own loss."""
    rows = _rows(4, [1.0] * 4)
    trainer = _trainer(tiny_dirs, tmp_path, rows, loss=dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7]))
    batch = _batch(trainer, rows)
    ours = trainer._compute_loss(trainer.model, dict(batch), False)
    theirs = DPOTrainer._compute_loss(
        trainer, trainer.model, {k: v for k, v in batch.items() if k != "pair_weights"}, False
    )
    torch.testing.assert_close(ours, theirs, atol=5e-4, rtol=1e-4)
    trainer.nll_weight = 0.0
    dpo_only = trainer._compute_loss(trainer.model, dict(batch), False)
    assert ours.item() > dpo_only.item() + 0.1  # the anchor adds 0.7 x the chosen tokens' mean NLL


def test_weights_scale_each_pair(tiny_dirs, tmp_path):
    rows = _rows(3, [1.0, 1.0, 1.0])
    trainer = _trainer(tiny_dirs, tmp_path, rows)
    base = trainer._compute_loss(trainer.model, dict(_batch(trainer, rows)), False)
    doubled = trainer._compute_loss(trainer.model, dict(_batch(trainer, _rows(3, [2.0, 2.0, 2.0]))), False)
    torch.testing.assert_close(doubled, 2 * base)


def test_zero_weight_pair_contributes_no_gradient(tiny_dirs, tmp_path):
    rows = _rows(2, [0.0, 1.0])
    trainer = _trainer(tiny_dirs, tmp_path, rows)
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def grads(batch_rows):
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, dict(_batch(trainer, batch_rows)), False)
        return torch.autograd.grad(loss, params, allow_unused=True)

    first = grads(rows)
    changed = [dict(r) for r in rows]
    changed[0]["rejected"] = [
        {"role": "assistant", "content": "there is a blue square at the bottom right.\nAnswer: yes"}
    ]
    second = grads(changed)
    for a, b in zip(first, second):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert any(a is not None and a.abs().sum() > 0 for a in first)


def test_train_step_runs_and_moves_the_policy(tiny_dirs, tmp_path):
    rows = _rows(4, [0.2, 0.9, 1.0, 0.0])
    trainer = _trainer(tiny_dirs, tmp_path, rows, use_fused_kernel=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert "pair_weight" in trainer.state.log_history[0] or trainer.state.global_step == 1


def test_other_loss_types_are_refused(tiny_dirs, tmp_path):
    model, processor = load_policy(str(tiny_dirs[0]))
    args = WeightedDPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, loss_type=["ipo"])
    with pytest.raises(ValueError, match="implements the sigmoid DPO loss"):
        WeightedDPOTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(_rows(2, [1.0, 1.0])), processing_class=processor
        )


def test_reference_log_probs_are_computed_once_without_a_second_model(tiny_dirs, tmp_path, monkeypatch):
    """Precomputed reference log-probs give the loss a live reference model gives, and TRL never loads a copy."""
    import trl.trainer.dpo_trainer as trl_dpo

    rows = _rows(4, [0.3, 1.0, 0.7, 1.0])
    live = _trainer(tiny_dirs, tmp_path / "live", rows)
    batch = _batch(live, rows)
    expected = live._compute_loss(live.model, dict(batch), False)

    def no_second_model(*args, **kwargs):
        raise AssertionError("TRL loaded a reference model")

    monkeypatch.setattr(trl_dpo, "create_model_from_path", no_second_model)
    args = WeightedDPOConfig(
        output_dir=str(tmp_path / "once"),
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        max_steps=1,
        beta=0.5,
        precompute_ref_log_probs=True,
    )
    # The policy starts from the live trainer's reference weights, perturbed as there, so both see the same pair.
    model, processor = load_policy(str(tiny_dirs[0]))
    model.load_state_dict(live.model.state_dict())
    reference = live.accelerator.unwrap_model(live.ref_model)
    trainer = WeightedDPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor
    )
    assert trainer.ref_model is None
    assert set(trainer.train_dataset.column_names) >= {"ref_chosen_logps", "ref_rejected_logps"}
    # Here the reference is the policy's own start, so precomputed log-probs equal the policy's.
    pre = _batch(trainer, [dict(r) for r in trainer.train_dataset])
    assert pre["ref_chosen_logps"].shape == (4,)
    loss = trainer._compute_loss(trainer.model, dict(pre), False)
    # Margin 0: mean_i c_i log 2. Precomputed in batches of 2, here scored in one batch of 4: the padding differs,
    # which moves ~100-token log-prob sums by ~1e-2 in fp32.
    torch.testing.assert_close(loss, torch.tensor(0.6931 * 0.75), atol=5e-3, rtol=0)
    # And with the live trainer's reference logps substituted, the loss is the live one.
    live_ref = live._reference_logps(
        batch,
        {k: v for k, v in batch.items() if k not in ("completion_mask", "pair_weights")},
        batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100),
    )
    assert reference is not None
    pre["ref_chosen_logps"], pre["ref_rejected_logps"] = live_ref.chunk(2)
    torch.testing.assert_close(trainer._compute_loss(trainer.model, dict(pre), False), expected, atol=1e-4, rtol=1e-4)


def _kernel_nodes(tensor):
    """The fused kernel's autograd nodes (its ctx) behind ``tensor``."""
    seen, stack, found = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "frozen"):
            found.append(node)
        stack += [n for n, _ in node.next_functions]
    return found


@pytest.mark.parametrize("lora", [True, False])
def test_the_fused_kernel_takes_the_frozen_head_path_under_lora(tiny_dirs, tmp_path, lora):
    from peft import LoraConfig

    rows = _rows(2, [1.0, 0.5])
    model, processor = load_policy(str(tiny_dirs[0]))
    args = WeightedDPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        max_steps=1,
        save_strategy="no",
        precompute_ref_log_probs=False,
    )
    peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None
    ref = None if lora else load_policy(str(tiny_dirs[0]))[0]
    trainer = WeightedDPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        peft_config=peft,
    )
    trainer._fused = lambda device: True  # the kernel runs on CUDA; here through Triton's interpreter
    loss = trainer._compute_loss(trainer.model, dict(_batch(trainer, rows)), False)
    (node,) = _kernel_nodes(loss)
    assert node.frozen is lora  # LoRA leaves the LM head frozen: only the 2 GEMMs of the floor run
    loss.backward()
    head = trainer._lm_head(trainer.accelerator.unwrap_model(trainer.model))[0]
    assert (head.grad is None) is lora
