"""The fused weighted-DPO Triton kernels against the eager PyTorch reference (CPU, TRITON_INTERPRET=1)."""

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

from kernels.dpo import (
    WeightedDPOLoss,
    sequence_logps,
    sequence_logps_reference,
    weighted_dpo_loss,
    weighted_dpo_loss_reference,
)

# fp32: the kernel accumulates in fp32 in another order than the reference.
# bf16: inputs and the gradient GEMM operands are bf16 (8 mantissa bits), accumulation fp32.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make_inputs(P, T, H, V, dtype, bias=True, seed=0, prompt=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * P, T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    prompt = T // 3 if prompt is None else prompt
    labels[:, :prompt] = -100  # prompt and image positions
    labels[:, -2:] = -100  # padding
    ref = torch.randn(2 * P, generator=g) * 5 - 20 * T / 3
    return hidden, weight, b, labels, ref


def run(fn, hidden, weight, b, labels, ref, w, beta=0.1):
    loss, logps = fn(hidden, weight, labels, ref, w, beta, b)
    params = [t for t in (hidden, weight, b) if t is not None]
    grads = torch.autograd.grad(loss, params)
    return loss, logps, grads


def assert_match(kernel, reference, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(kernel[0], reference[0], **tol)
    torch.testing.assert_close(kernel[1], reference[1], atol=tol["atol"] * 50, rtol=tol["rtol"])  # sums over T tokens
    for gk, gr in zip(kernel[2], reference[2]):
        assert gk.dtype == gr.dtype and gk.shape == gr.shape
        torch.testing.assert_close(gk.float(), gr.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("P, T, H, V", [(3, 47, 31, 123), (1, 9, 16, 32), (2, 20, 40, 257), (4, 12, 17, 50)])
def test_matches_reference(P, T, H, V, dtype):
    inputs = make_inputs(P, T, H, V, dtype)
    w = torch.linspace(0, 1, P)
    assert_match(run(weighted_dpo_loss, *inputs, w), run(weighted_dpo_loss_reference, *inputs, w), dtype)


@pytest.mark.parametrize("weights", ["ones", "zeros", "mixed", "none"])
def test_pair_weights(weights):
    P = 3
    w = {"ones": torch.ones(P), "zeros": torch.zeros(P), "mixed": torch.tensor([0.0, 1.0, 0.37]), "none": None}[weights]
    inputs = make_inputs(P, 47, 31, 123, torch.float32, seed=1)
    kernel = run(weighted_dpo_loss, *inputs, w)
    assert_match(kernel, run(weighted_dpo_loss_reference, *inputs, w), torch.float32)
    if weights == "zeros":
        assert kernel[0].item() == 0 and all((g == 0).all() for g in kernel[2])
    if weights == "none":
        assert_match(kernel, run(weighted_dpo_loss, *inputs, torch.ones(P)), torch.float32)


def test_zero_weight_pair_leaves_its_sequences_without_gradient():
    P = 3
    hidden, weight, b, labels, ref = make_inputs(P, 20, 16, 40, torch.float32, seed=2)
    _, _, (g_hidden, _, _) = run(weighted_dpo_loss, hidden, weight, b, labels, ref, torch.tensor([1.0, 0.0, 1.0]))
    assert (g_hidden[1] == 0).all() and (g_hidden[P + 1] == 0).all()
    assert (g_hidden[0] != 0).any()


def test_sequence_with_every_position_ignored():
    hidden, weight, b, labels, ref = make_inputs(2, 15, 16, 33, torch.float32, seed=3)
    labels[1] = -100
    kernel = run(weighted_dpo_loss, hidden, weight, b, labels, ref, None)
    assert_match(kernel, run(weighted_dpo_loss_reference, hidden, weight, b, labels, ref, None), torch.float32)
    assert kernel[1][1].item() == 0.0
    assert (kernel[2][0][1] == 0).all()


def test_everything_ignored():
    hidden, weight, b, labels, ref = make_inputs(2, 6, 16, 33, torch.float32)
    labels[:] = -100
    loss, logps, grads = run(weighted_dpo_loss, hidden, weight, b, labels, ref, None)
    assert (logps == 0).all() and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads)


def test_without_bias():
    inputs = make_inputs(2, 30, 24, 70, torch.float32, bias=False, seed=4)
    assert_match(run(weighted_dpo_loss, *inputs, None), run(weighted_dpo_loss_reference, *inputs, None), torch.float32)


def test_cost_follows_counted_positions_not_sequence_length():
    # A full sequence with its prompt masked gives exactly the completion-only result.
    P, H, V = 2, 16, 40
    hidden, weight, b, labels, ref = make_inputs(P, 50, H, V, torch.float32, seed=5, prompt=41)
    short_h = hidden[:, 41:48].detach().clone().requires_grad_()
    full = sequence_logps(hidden, weight, labels, b)
    short = sequence_logps(short_h, weight, labels[:, 41:48], b)
    torch.testing.assert_close(full, short)


def test_sequence_logps_matches_reference_without_grad():
    hidden, weight, b, labels, _ = make_inputs(3, 47, 31, 123, torch.float32)
    out = sequence_logps(hidden, weight, labels, b)
    assert not out.requires_grad and out.dtype == torch.float32
    torch.testing.assert_close(out, sequence_logps_reference(hidden, weight, labels, b), atol=5e-4, rtol=1e-5)


def test_module_wrapper_and_input_checks():
    inputs = make_inputs(2, 10, 16, 32, torch.float32)
    hidden, weight, b, labels, ref = inputs
    fused = WeightedDPOLoss(beta=0.2)(hidden, weight, labels, ref, None, b)
    eager = WeightedDPOLoss(beta=0.2, fused=False)(hidden, weight, labels, ref, None, b)
    torch.testing.assert_close(fused[0], eager[0])
    with pytest.raises(ValueError, match="share a dtype"):
        weighted_dpo_loss(hidden, weight.detach().to(torch.bfloat16), labels, ref)
    with pytest.raises(ValueError, match="pair_weights must be non-negative"):
        weighted_dpo_loss(hidden, weight, labels, ref, torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match=r"expected 2P sequences"):
        weighted_dpo_loss(hidden[:3], weight, labels[:3], ref[:3])


def test_unit_weights_equal_trls_dpo_sigmoid_loss(tmp_path):
    """TRL's own DPOTrainer loss on a batch equals the kernel's loss on the same model's log-probs."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model, ref_model = LlamaForCausalLM(config), LlamaForCausalLM(config)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    g = torch.Generator().manual_seed(1)
    words = lambda n: " ".join(f"w{i}" for i in torch.randint(3, 64, (n,), generator=g).tolist())
    rows = [{"prompt": words(9), "chosen": words(6), "rejected": words(4)} for _ in range(3)]
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, beta=0.3, precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    trl_loss = trainer._compute_loss(trainer.model, dict(batch), False)

    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    labels = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
    hidden = trainer.model(**kwargs).hidden_states[-1][:, :-1]
    with torch.no_grad():
        ref_hidden = trainer.ref_model(**kwargs).hidden_states[-1][:, :-1]
    ref_logps = sequence_logps(ref_hidden, trainer.ref_model.lm_head.weight, labels)
    loss, _ = weighted_dpo_loss(hidden, trainer.model.lm_head.weight, labels, ref_logps, torch.ones(3), beta=0.3)
    # TRL scores tokens with its own chunked LM head: the same fp32 math summed in another order.
    torch.testing.assert_close(loss, trl_loss, atol=1e-4, rtol=1e-4)


def test_benchmark_baselines_compute_the_same_loss():
    from kernels.bench_dpo import trl_full_logits

    hidden, weight, b, labels, ref = make_inputs(2, 20, 16, 40, torch.float32, seed=7)
    w = torch.tensor([0.3, 1.0])
    full = run(trl_full_logits, hidden, weight, b, labels, ref, w)
    assert_match(full, run(weighted_dpo_loss_reference, hidden, weight, b, labels, ref, w), torch.float32)
