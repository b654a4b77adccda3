"""Benchmark: confidence-weighted DPO loss, forward + backward, kernel against the baselines, in one process.

    python -m kernels.bench_dpo [--out bench_dpo.json] [--reps 10] [--dtype bfloat16]

Needs a CUDA GPU, torch and triton; Liger-Kernel is timed too when importable.
Methods, trained LM head (each produces the loss and the gradients of hidden and LM head):

- ``kernel_trained_head``: ``kernels.dpo.weighted_dpo_loss`` (4 GEMMs, one chunk of workspace);
- ``trl_full_logits``: every position through the LM head, selective log-softmax, masked sum (TRL's classic path);
- ``liger_fused_linear_dpo``: ``LigerFusedLinearDPOLoss`` (chunked, all positions);
- ``completion_only_eager``: ``weighted_dpo_loss_reference``, and ``completion_only_compiled``, its ``torch.compile``;
- ``three_gemms_floor``: the three completion-only GEMMs alone (logits, dlogits @ W, dlogits^T @ h).

Frozen LM head (LoRA; only the hidden gradient): ``kernel_frozen_head``, ``completion_only_eager_frozen_head``
and ``two_gemms_floor`` (logits, dlogits @ W).

One JSON row per (shape, method): median ms of ``--reps`` (CUDA events) and the workspace, the peak allocated
beyond the inputs and the gradients every method must produce, from a clean baseline, in GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from .dpo import dpo_loss_from_logps, weighted_dpo_loss, weighted_dpo_loss_reference

# (pairs, T, completion tokens, H, V): 7B-class preference batches (LLaVA's vocabulary, then Qwen2.5-VL's).
SHAPES = (
    (2, 2048, 256, 4096, 32000),
    (2, 2048, 256, 3584, 152064),
    (4, 4096, 512, 3584, 152064),
)
BETA = 0.1


def trl_full_logits(hidden, weight, labels, ref_logps, pair_weights, beta, bias):
    logits = F.linear(hidden, weight, bias)  # [rows, T, V]: every position
    mask = labels != -100
    lse = torch.logsumexp(logits.float(), dim=-1)
    target = logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).float()
    logps = ((target - lse) * mask).sum(-1)
    return dpo_loss_from_logps(logps, ref_logps, pair_weights, beta), logps


def _liger():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError:
        return None
    return LigerFusedLinearDPOLoss(ignore_index=-100, beta=BETA, use_ref_model=True)


def _liger_step(loss_fn, hidden, weight, labels, ref_logps, bias):
    # Liger computes the reference log-probs itself from a reference input and head; giving it the same ones
    # charges it one extra no-grad forward, which is what it costs in training.
    out = loss_fn(
        weight,
        hidden,
        labels,
        bias,
        ref_input=hidden.detach(),
        ref_weight=weight.detach(),
        ref_bias=bias.detach() if bias is not None else None,
    )
    return out[0] if isinstance(out, tuple) else out


def _three_gemms(h_completion, weight, dlogits):
    logits = h_completion @ weight.t()
    dh = dlogits @ weight
    dw = dlogits.t() @ h_completion
    return logits, dh, dw


def _two_gemms(h_completion, weight, dlogits):
    return h_completion @ weight.t(), dlogits @ weight


def _time_and_memory(step, reps, grad_bytes, device="cuda"):
    """Median ms of ``reps`` calls, and peak GiB beyond the inputs and ``grad_bytes`` (CUDA only; None elsewhere)."""
    cuda = device == "cuda"
    step()  # warm-up: autotuning, compilation, allocator
    peak_extra = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak_extra = max(torch.cuda.max_memory_allocated() - base - grad_bytes, 0) / 2**30
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:  # only to check that every row is produced (CI, through Triton's interpreter): not a measurement
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), peak_extra


def run_shape(P, T, C, H, V, dtype, reps, dev="cuda", compile_baseline=True):
    """The rows of one shape: every method's median ms and workspace GiB, and the kernel's error on it."""
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(2 * P, T, H, device=dev, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(V, H, device=dev, generator=g) / H**0.5).to(dtype).requires_grad_()
    frozen_weight = weight.detach()
    bias = None
    labels = torch.randint(0, V, (2 * P, T), device=dev, generator=g)
    labels[:, : T - C] = -100  # prompt and image positions
    ref = torch.randn(2 * P, device=dev, generator=g) - 5.0 * C
    pair_weights = torch.rand(P, device=dev, generator=g)
    hidden_bytes = hidden.numel() * hidden.element_size()
    weight_bytes = weight.numel() * weight.element_size()

    def loss_step(fn, head):
        def step():
            hidden.grad = weight.grad = None
            loss, _ = fn(hidden, head, labels, ref, pair_weights, BETA, bias)
            loss.backward()

        return step

    compiled = torch.compile(weighted_dpo_loss_reference) if compile_baseline else None
    methods = {  # name -> (step, gradient bytes it must produce)
        "kernel_trained_head": (loss_step(weighted_dpo_loss, weight), hidden_bytes + weight_bytes),
        "kernel_frozen_head": (loss_step(weighted_dpo_loss, frozen_weight), hidden_bytes),
        "trl_full_logits": (loss_step(trl_full_logits, weight), hidden_bytes + weight_bytes),
        "completion_only_eager": (loss_step(weighted_dpo_loss_reference, weight), hidden_bytes + weight_bytes),
        "completion_only_eager_frozen_head": (loss_step(weighted_dpo_loss_reference, frozen_weight), hidden_bytes),
    }
    if compiled is not None:
        methods["completion_only_compiled"] = (loss_step(compiled, weight), hidden_bytes + weight_bytes)
    liger = _liger()
    if liger is not None:

        def liger_step():
            hidden.grad = weight.grad = None
            _liger_step(liger, hidden, weight, labels, ref, bias).backward()

        methods["liger_fused_linear_dpo"] = (liger_step, hidden_bytes + weight_bytes)
    h_c = hidden.detach()[:, T - C :].reshape(-1, H).contiguous()
    dlogits = torch.randn(h_c.shape[0], V, device=dev, dtype=dtype, generator=g)
    methods["three_gemms_floor"] = (lambda: _three_gemms(h_c, frozen_weight, dlogits), 0)
    methods["two_gemms_floor"] = (lambda: _two_gemms(h_c, frozen_weight, dlogits), 0)

    shape = {"pairs": P, "T": T, "completion": C, "H": H, "V": V, "dtype": str(dtype).replace("torch.", "")}
    lk, pk = weighted_dpo_loss(hidden, weight, labels, ref, pair_weights, BETA, bias)
    lr, pr = weighted_dpo_loss_reference(hidden, weight, labels, ref, pair_weights, BETA, bias)
    rows = [
        {
            **shape,
            "method": "correctness",
            "loss_abs_diff_vs_reference": float((lk - lr).abs()),
            "logps_max_abs_diff_vs_reference": float((pk - pr).abs().max()),
        }
    ]
    del lk, pk, lr, pr
    for name, (step, grad_bytes) in methods.items():
        row = {**shape, "method": name}
        try:
            row["median_ms"], row["workspace_GiB"] = _time_and_memory(step, reps, grad_bytes, dev)
        except torch.cuda.OutOfMemoryError:
            row["median_ms"] = row["workspace_GiB"] = "out of memory"
        except Exception as e:  # a baseline that breaks (e.g. a Liger API change) must not hide the others
            row["median_ms"] = f"error: {type(e).__name__}: {e}"[:300]
        hidden.grad = weight.grad = None
        if dev == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    ms = {r["method"]: r.get("median_ms") for r in rows}
    for r in rows:  # each kernel row against its floor and against TRL-style full logits
        floor = {"kernel_trained_head": "three_gemms_floor", "kernel_frozen_head": "two_gemms_floor"}.get(r["method"])
        if floor and isinstance(r.get("median_ms"), float):
            for base in (floor, "trl_full_logits", "completion_only_eager"):
                if isinstance(ms.get(base), float):
                    r[f"vs_{base}"] = r["median_ms"] / ms[base]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_dpo.json"))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="run the first N shapes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_dpo needs a CUDA GPU; the CPU tests (TRITON_INTERPRET=1) check correctness")
    dtype = getattr(torch, args.dtype)
    rows = []
    for shape in SHAPES[: args.shapes]:
        for row in run_shape(*shape, dtype, args.reps):
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {
        "benchmark": "weighted_dpo_loss",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": time.strftime("%Y-%m-%d"),
        "reps": args.reps,
        "results": rows,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
