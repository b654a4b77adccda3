"""Fused completion-only sequence log-probs and the confidence-weighted DPO loss.

DPO needs, per sequence, the sum of the log-probs of its completion tokens.
The usual path projects *every* position (image, prompt, padding) through the
LM head and takes a full ``[tokens x vocab]`` log-softmax. Here only the
positions whose label is not ``ignore_index`` are gathered, and the Triton
kernels stream the LM head over the vocabulary with an online log-sum-exp, so
no ``[tokens x V]`` tensor ever exists:

- forward: one pass over V per block of tokens gives each token's log-sum-exp
  and target logit (one GEMM's worth of work);
- backward: one program per (token block, vocab block) tile recomputes its
  logits, forms ``dlogits = g * (onehot - softmax)``, and adds
  ``dlogits @ W`` into the hidden-state gradient and ``dlogits^T @ h`` into
  the LM-head gradient (three GEMMs' worth), accumulating in fp32.

The DPO loss on top is a few ops on ``[P]`` tensors in plain PyTorch:
``loss = mean_i w_i * -logsigmoid(beta * ((pc_i - rc_i) - (pr_i - rr_i)))``.
With all weights 1 it is standard DPO (TRL's ``sigmoid`` loss).

Public: ``weighted_dpo_loss``, ``weighted_dpo_loss_reference`` (same math in
eager PyTorch), ``sequence_logps`` (no grad; reference-model log-probs) and the
``WeightedDPOLoss`` module. Imports only torch and triton.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def _gather_completion(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """Rows of ``hidden`` whose label counts, their targets, and the sequence each belongs to."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [rows, T, H] and labels [rows, T]; got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    rows, T, H = hidden.shape
    flat = (labels != ignore_index).reshape(-1).nonzero().squeeze(1)
    return hidden.reshape(-1, H).index_select(0, flat), labels.reshape(-1).index_select(0, flat), flat // T, flat


def dpo_loss_from_logps(policy_logps, ref_logps, pair_weights=None, beta: float = 0.1) -> torch.Tensor:
    """The confidence-weighted DPO loss from per-sequence log-probs (chosen rows first, then rejected)."""
    if policy_logps.shape[0] % 2:
        raise ValueError(f"expected 2P sequences (chosen then rejected), got {policy_logps.shape[0]}")
    if ref_logps.shape != policy_logps.shape:
        raise ValueError(f"ref_logps must have shape {tuple(policy_logps.shape)}, got {tuple(ref_logps.shape)}")
    pc, pr = policy_logps.float().chunk(2)
    rc, rr = ref_logps.float().chunk(2)
    losses = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    if pair_weights is not None:
        if pair_weights.shape != losses.shape:
            raise ValueError(f"pair_weights must have shape {tuple(losses.shape)}, got {tuple(pair_weights.shape)}")
        if (pair_weights < 0).any():
            raise ValueError("pair_weights must be non-negative")
        losses = losses * pair_weights.float()
    return losses.mean()


# --- reference -----------------------------------------------------------------------------------


def sequence_logps_reference(hidden, weight, labels, bias=None, ignore_index: int = -100) -> torch.Tensor:
    """Per-sequence sums of target log-probs, projecting only the counted positions (eager PyTorch)."""
    h, targets, seq, _ = _gather_completion(hidden, labels, ignore_index)
    logits = F.linear(h, weight, bias).float()
    token_logps = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    return torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, seq, token_logps)


def weighted_dpo_loss_reference(hidden, weight, labels, ref_logps, pair_weights=None, beta=0.1, bias=None, ignore_index=-100):
    policy_logps = sequence_logps_reference(hidden, weight, labels, bias, ignore_index)
    return dpo_loss_from_logps(policy_logps, ref_logps, pair_weights, beta), policy_logps


# --- Triton kernels ------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr):
    # fp32 operands must not silently drop to TF32; and the CPU interpreter's bf16 dot is wrong, so there the
    # (already bf16-rounded) operands are widened to fp32, which gives the same products.
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_in, col_in, H,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr):
    """logits[rows, cols] = h[rows] @ W[cols]^T (+ b[cols]), accumulated in fp32."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        k = h0 + tl.arange(0, BLOCK_H)
        k_in = k < H
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * H + k[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * H + k[:, None], mask=col_in[None, :] & k_in[:, None], other=0.0)
        acc = _dot(a, w, acc, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _forward_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, tlogit_ptr, N, V, H,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    target = tl.load(tgt_ptr + rows, mask=row_in, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_in = cols < V
        logits = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_in, col_in, H, BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, DOT_FP32)
        logits = tl.where(col_in[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
        target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), axis=1)
    tl.store(lse_ptr + rows, m + tl.log(s), mask=row_in)
    tl.store(tlogit_ptr + rows, target_logit, mask=row_in)


@triton.jit
def _backward_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr, N, V, H,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_in = rows < N
    col_in = cols < V
    target = tl.load(tgt_ptr + rows, mask=row_in, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_in, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_in, other=0.0)
    logits = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_in, col_in, H, BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, DOT_FP32)
    prob = tl.exp(logits - lse[:, None])
    onehot = (cols[None, :] == target[:, None]).to(tl.float32)
    dlogits = tl.where(row_in[:, None] & col_in[None, :], g[:, None] * (onehot - prob), 0.0)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(dlogits, axis=0), mask=col_in)
    dlogits_in = dlogits.to(h_ptr.dtype.element_ty)
    for h0 in range(0, H, BLOCK_H):
        k = h0 + tl.arange(0, BLOCK_H)
        k_in = k < H
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * H + k[None, :], mask=col_in[:, None] & k_in[None, :], other=0.0)
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * H + k[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
        dh = _dot(dlogits_in, w, tl.zeros((BLOCK_N, BLOCK_H), tl.float32), DOT_FP32)
        dw = _dot(tl.trans(dlogits_in), a, tl.zeros((BLOCK_V, BLOCK_H), tl.float32), DOT_FP32)
        tl.atomic_add(dh_ptr + rows[:, None].to(tl.int64) * H + k[None, :], dh, mask=row_in[:, None] & k_in[None, :])
        tl.atomic_add(dw_ptr + cols[:, None].to(tl.int64) * H + k[None, :], dw, mask=col_in[:, None] & k_in[None, :])


def _blocks():
    # 16 is tl.dot's smallest tile. On a GPU the larger tiles keep the tensor cores busy.
    if torch.cuda.is_available() and not _interpreting():
        return 64, 128, 64, 8
    return 16, 32, 16, 1


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or _interpreting()


def _check(hidden, weight, bias):
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def _token_lse(h, weight, bias, targets):
    N, H = h.shape
    V = weight.shape[0]
    lse = torch.empty(N, dtype=torch.float32, device=h.device)
    target_logit = torch.empty(N, dtype=torch.float32, device=h.device)
    if N:
        BN, BV, BH, warps = _blocks()
        _forward_kernel[(triton.cdiv(N, BN),)](
            h, weight, bias if bias is not None else h, targets, lse, target_logit, N, V, H,
            BLOCK_N=BN, BLOCK_V=BV, BLOCK_H=BH, HAS_BIAS=bias is not None, DOT_FP32=_dot_fp32(h.dtype), num_warps=warps,
        )
    return lse, target_logit


class _FusedSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index):
        _check(hidden, weight, bias)
        h, targets, seq, flat = _gather_completion(hidden, labels, ignore_index)
        h, weight_c = h.contiguous(), weight.contiguous()
        lse, target_logit = _token_lse(h, weight_c, bias, targets)
        logps = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, seq, target_logit - lse)
        ctx.save_for_backward(h, weight_c, bias, targets, seq, flat, lse)
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        h, weight, bias, targets, seq, flat, lse = ctx.saved_tensors
        N, H = h.shape
        V = weight.shape[0]
        g = grad_logps.float().index_select(0, seq).contiguous()  # d loss / d token log-prob
        dh = torch.zeros((N, H), dtype=torch.float32, device=h.device)
        dw = torch.zeros((V, H), dtype=torch.float32, device=h.device)
        db = torch.zeros(V, dtype=torch.float32, device=h.device) if bias is not None else dh
        if N:
            BN, BV, BH, warps = _blocks()
            _backward_kernel[(triton.cdiv(N, BN), triton.cdiv(V, BV))](
                h, weight, bias if bias is not None else h, targets, lse, g, dh, dw, db, N, V, H,
                BLOCK_N=BN, BLOCK_V=BV, BLOCK_H=BH, HAS_BIAS=bias is not None, DOT_FP32=_dot_fp32(h.dtype), num_warps=warps,
            )
        grad_hidden = torch.zeros(ctx.hidden_shape, dtype=ctx.hidden_dtype, device=h.device)
        grad_hidden.view(-1, H).index_copy_(0, flat, dh.to(ctx.hidden_dtype))
        grad_bias = db.to(bias.dtype) if bias is not None else None
        return grad_hidden, dw.to(weight.dtype), grad_bias, None, None


def weighted_dpo_loss(hidden, weight, labels, ref_logps, pair_weights=None, beta=0.1, bias=None, ignore_index=-100):
    """(loss, policy_logps) through the fused Triton kernels; same contract as the reference."""
    policy_logps = _FusedSequenceLogps.apply(hidden, weight, bias, labels, ignore_index)
    return dpo_loss_from_logps(policy_logps, ref_logps, pair_weights, beta), policy_logps


@torch.no_grad()
def sequence_logps(hidden, weight, labels, bias=None, ignore_index: int = -100) -> torch.Tensor:
    """[rows] fp32 per-sequence sums of target log-probs, fused, without gradients (reference-model log-probs)."""
    _check(hidden, weight, bias)
    h, targets, seq, _ = _gather_completion(hidden, labels, ignore_index)
    lse, target_logit = _token_lse(h.contiguous(), weight.contiguous(), bias, targets)
    return torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, seq, target_logit - lse)


class WeightedDPOLoss(torch.nn.Module):
    """``weighted_dpo_loss`` as a module; ``fused=False`` selects the eager reference."""

    def __init__(self, beta: float = 0.1, ignore_index: int = -100, fused: bool = True):
        super().__init__()
        self.beta, self.ignore_index, self.fused = beta, ignore_index, fused

    def forward(self, hidden, weight, labels, ref_logps, pair_weights=None, bias=None):
        fn = weighted_dpo_loss if self.fused else weighted_dpo_loss_reference
        return fn(hidden, weight, labels, ref_logps, pair_weights, self.beta, bias, self.ignore_index)
