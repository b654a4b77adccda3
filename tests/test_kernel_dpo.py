"""The chunked weighted-DPO kernel against the eager PyTorch reference (CPU, TRITON_INTERPRET=1), in both head
modes, and its budget: matmul FLOPs counted against the floor's, peak live extra memory against the chunk size.
CUDA-only tests at real shapes run where a GPU is present."""

import weakref

import pytest
import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
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


def run(fn, hidden, weight, b, labels, ref, w, beta=0.1, **kwargs):
    loss, logps = fn(hidden, weight, labels, ref, w, beta, b, **kwargs)
    params = [t for t in (hidden, weight, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return loss, logps, grads


def assert_match(kernel, reference, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(kernel[0], reference[0], **tol)
    torch.testing.assert_close(kernel[1], reference[1], atol=tol["atol"] * 50, rtol=tol["rtol"])  # sums over T tokens
    for gk, gr in zip(kernel[2], reference[2]):
        assert gk.dtype == gr.dtype and gk.shape == gr.shape
        torch.testing.assert_close(gk.float(), gr.float(), **tol)


def frozen(inputs):
    """The same inputs with the LM head (and bias) frozen, as under LoRA."""
    hidden, weight, b, labels, ref = inputs
    return hidden, weight.detach(), b.detach() if b is not None else None, labels, ref


@pytest.mark.parametrize("head", ["trained", "frozen"])
@pytest.mark.parametrize("chunk_bytes", [None, 2048])  # one chunk, and many (a few rows each)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("P, T, H, V", [(3, 47, 31, 123), (1, 9, 16, 32), (2, 20, 40, 257), (4, 12, 17, 50)])
def test_matches_reference(P, T, H, V, dtype, chunk_bytes, head):
    inputs = make_inputs(P, T, H, V, dtype)
    if head == "frozen":
        inputs = frozen(inputs)
    w = torch.linspace(0, 1, P)
    kernel = run(weighted_dpo_loss, *inputs, w, chunk_bytes=chunk_bytes)
    assert len(kernel[2]) == (1 if head == "frozen" else 3)
    assert_match(kernel, run(weighted_dpo_loss_reference, *inputs, w), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dpo_positive_matches_the_reference_and_its_formula(dtype):
    """DPO-Positive: -log sigmoid(beta * (margin - lambda * max(0, ref_chosen - policy_chosen))), weighted."""
    from kernels.dpo import dpo_loss_from_logps

    inputs = make_inputs(3, 20, 16, 40, dtype)
    w = torch.tensor([1.0, 0.5, 0.0])
    kernel = run(weighted_dpo_loss, *inputs, w, dpop_lambda=5.0)
    assert_match(
        kernel,
        run(weighted_dpo_loss_reference, *inputs, w, dpop_lambda=5.0),
        torch.float32 if dtype == torch.float32 else dtype,
    )
    pc, pr = torch.tensor([-3.0, -1.0]), torch.tensor([-9.0, -2.0])
    rc, rr = torch.tensor([-2.0, -1.5]), torch.tensor([-8.0, -2.0])
    margin = torch.tensor([(-3 + 2) - (-9 + 8) - 5.0 * 1.0, (-1 + 1.5) - (-2 + 2) - 0.0])  # only pair 0 fell
    expected = (-torch.nn.functional.logsigmoid(0.1 * margin) * torch.tensor([1.0, 0.5])).mean()
    got = dpo_loss_from_logps(torch.cat([pc, pr]), torch.cat([rc, rr]), torch.tensor([1.0, 0.5]), 0.1, 5.0)
    torch.testing.assert_close(got, expected)
    plain = dpo_loss_from_logps(torch.cat([pc, pr]), torch.cat([rc, rr]), torch.tensor([1.0, 0.5]), 0.1)
    assert got > plain  # the fallen chosen response is penalised


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


@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_sequence_with_every_position_ignored(head):
    hidden, weight, b, labels, ref = make_inputs(2, 15, 16, 33, torch.float32, seed=3)
    labels[1] = -100
    inputs = (hidden, weight, b, labels, ref) if head == "trained" else frozen((hidden, weight, b, labels, ref))
    kernel = run(weighted_dpo_loss, *inputs, None)
    assert_match(kernel, run(weighted_dpo_loss_reference, *inputs, None), torch.float32)
    assert kernel[1][1].item() == 0.0
    assert (kernel[2][0][1] == 0).all()


@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_everything_ignored(head):
    inputs = make_inputs(2, 6, 16, 33, torch.float32)
    inputs[3][:] = -100
    loss, logps, grads = run(weighted_dpo_loss, *(inputs if head == "trained" else frozen(inputs)), None)
    assert (logps == 0).all() and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


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
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    model, ref_model = LlamaForCausalLM(config), LlamaForCausalLM(config)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    g = torch.Generator().manual_seed(1)
    words = lambda n: " ".join(f"w{i}" for i in torch.randint(3, 64, (n,), generator=g).tolist())
    rows = [{"prompt": words(9), "chosen": words(6), "rejected": words(4)} for _ in range(3)]
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, beta=0.3, precompute_ref_log_probs=False)
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
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


def test_the_benchmark_reports_a_row_for_every_method():
    """bench_dpo's rows on a tiny shape on the CPU (the interpreter; times here mean nothing): every method runs
    and reports, and each kernel row is set against its floor."""
    from kernels.bench_dpo import run_shape

    rows = run_shape(1, 12, 6, 16, 40, torch.float32, reps=1, dev="cpu", compile_baseline=False)
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) >= {
        "correctness",
        "kernel_trained_head",
        "kernel_frozen_head",
        "trl_full_logits",
        "completion_only_eager",
        "completion_only_eager_frozen_head",
        "three_gemms_floor",
        "two_gemms_floor",
    }
    assert all(isinstance(r["median_ms"], float) for m, r in by_method.items() if m != "correctness"), rows
    assert by_method["correctness"]["loss_abs_diff_vs_reference"] < 1e-5
    assert (
        "vs_three_gemms_floor" in by_method["kernel_trained_head"]
        and "vs_two_gemms_floor" in by_method["kernel_frozen_head"]
    )


def test_benchmark_baselines_compute_the_same_loss():
    from kernels.bench_dpo import trl_full_logits

    hidden, weight, b, labels, ref = make_inputs(2, 20, 16, 40, torch.float32, seed=7)
    w = torch.tensor([0.3, 1.0])
    full = run(trl_full_logits, hidden, weight, b, labels, ref, w)
    assert_match(full, run(weighted_dpo_loss_reference, hidden, weight, b, labels, ref, w), torch.float32)


# --- the budget ------------------------------------------------------------------------------------------------


def _matmul_flops(fn, *inputs):
    hidden, weight, b, labels, ref = inputs
    # PyTorch's counter knows addmm but not its in-place form, which the kernel uses to accumulate dW.
    in_place = {torch.ops.aten.addmm_: lambda c, a, b, out_shape=None, **kwargs: 2 * a[0] * a[1] * b[1]}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        loss, _ = fn(hidden, weight, labels, ref, None, 0.1, b)
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("chunk_bytes", [None, 4096])
def test_matmul_flops_are_the_floors_for_a_frozen_head_and_four_thirds_for_a_trained_one(chunk_bytes):
    P, T, H, V = 2, 24, 32, 96
    inputs = make_inputs(P, T, H, V, torch.float32, bias=False, seed=8)
    N = int((inputs[3] != -100).sum())
    gemm = 2 * N * H * V  # one [N, H] x [H, V] product
    kernel = lambda *a: weighted_dpo_loss(*a[:6], bias=a[6], chunk_bytes=chunk_bytes)
    assert _matmul_flops(kernel, *frozen(inputs)) == 2 * gemm  # logits, dH: the floor with a frozen head
    assert _matmul_flops(kernel, *inputs) == 4 * gemm  # logits twice, dH, dW: 4/3 of the floor's 3
    assert _matmul_flops(weighted_dpo_loss_reference, *inputs) == 3 * gemm  # the eager floor itself


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the mode and still referenced, sampled at every op: what a
    method allocates beyond the tensors that existed before it ran."""

    def __init__(self):
        super().__init__()
        self.storages, self.peak = {}, 0  # data_ptr -> (nbytes, [weakrefs of the tensors that use it])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or not t.untyped_storage().nbytes():
                continue
            key = t.untyped_storage().data_ptr()
            nbytes, refs = self.storages.get(key, (0, []))
            alive = any(r() is not None for r in refs)
            if key in given and not alive:
                continue  # a view of, or a write into, a tensor that existed before: nothing allocated
            if not alive:  # a new allocation (or memory reused after its tensors died)
                nbytes, refs = t.untyped_storage().nbytes(), []
            refs.append(weakref.ref(t))
            self.storages[key] = (nbytes, refs)
        live = sum(n for n, refs in self.storages.values() if any(r() is not None for r in refs))
        self.peak = max(self.peak, live)
        return out


def _peak_extra(fn, inputs):
    hidden, weight, b, labels, ref = inputs
    grads = sum(t.numel() * t.element_size() for t in (hidden, weight, b) if t is not None and t.requires_grad)
    with LiveBytes() as mode:
        loss, _ = fn(hidden, weight, labels, ref, None, 0.1, b)
        loss.backward()
        del loss
    return mode.peak - grads  # the gradients every method must produce are not workspace


def test_peak_workspace_is_bounded_by_the_chunk_where_eager_needs_more():
    P, T, H, V = 2, 40, 32, 2048
    chunk = 64 * 1024  # so that the shape needs several chunks
    inputs = make_inputs(P, T, H, V, torch.float32, bias=False, seed=9)
    N = int((inputs[3] != -100).sum())
    small = 64 * N * 4 + 64 * 1024  # per-token fp32 vectors (targets, lse, log-probs, scales, indices) and scalars
    eager = _peak_extra(weighted_dpo_loss_reference, inputs)
    trained = _peak_extra(lambda *a: weighted_dpo_loss(*a[:6], bias=a[6], chunk_bytes=chunk), inputs)
    head_frozen = _peak_extra(lambda *a: weighted_dpo_loss(*a[:6], bias=a[6], chunk_bytes=chunk), frozen(inputs))
    assert eager > 2 * N * V * 4  # it holds the [N, V] logits and their gradient
    assert trained <= chunk + small < eager
    assert head_frozen <= N * H * 4 + chunk + small < eager  # plus the [N, H] buffer


def test_sequence_logps_stays_within_one_chunk():
    inputs = make_inputs(2, 40, 32, 2048, torch.float32, bias=False, seed=10)
    hidden, weight, _, labels, _ = inputs
    with LiveBytes() as mode:
        sequence_logps(hidden, weight, labels, chunk_bytes=64 * 1024)
    assert mode.peak <= 64 * 1024 + 64 * 1024 + 64 * int((labels != -100).sum()) * 4


# --- real shapes, on a GPU ---------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU without the Triton interpreter",
)


@cuda
@pytest.mark.parametrize("head", ["trained", "frozen"])
@pytest.mark.parametrize("P, T, C, H, V", [(2, 2048, 256, 4096, 32000), (2, 2048, 256, 3584, 152064)])
def test_real_shapes_on_cuda_within_the_references_own_bf16_error(P, T, C, H, V, head):
    """As Cut Cross-Entropy's tests do: the kernel's bf16 error against an fp32 reference may be at most a
    small multiple of the bf16 reference's own error."""
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden32 = torch.randn(2 * P, T, H, device="cuda", generator=g)
    weight32 = torch.randn(V, H, device="cuda", generator=g) / H**0.5
    labels = torch.randint(0, V, (2 * P, T), device="cuda", generator=g)
    labels[:, : T - C] = -100
    ref = torch.randn(2 * P, device="cuda", generator=g) - 5.0 * C
    w = torch.rand(P, device="cuda", generator=g)

    def grads(fn, dtype):
        hidden = hidden32.to(dtype).requires_grad_()
        weight = weight32.to(dtype).requires_grad_(head == "trained")
        loss, logps = fn(hidden, weight, labels, ref, w, 0.1, None)
        out = torch.autograd.grad(loss, [hidden] + ([weight] if head == "trained" else []))
        return [loss.float(), logps.float()] + [o.float() for o in out]

    exact = grads(weighted_dpo_loss_reference, torch.float32)
    ref_bf16 = grads(weighted_dpo_loss_reference, torch.bfloat16)
    kernel = grads(weighted_dpo_loss, torch.bfloat16)
    for e, r, k in zip(exact, ref_bf16, kernel):
        rel = lambda x: ((x - e).norm() / e.norm().clamp(min=1e-12)).item()
        assert rel(k) <= 2 * rel(r) + 1e-3, (rel(k), rel(r))
