"""Fused completion-only sequence log-probs and the confidence-weighted DPO loss.

DPO needs, per sequence, the sum of the log-probs of its completion tokens.
The usual path projects *every* position (image, prompt, padding) through the
LM head and takes a full ``[tokens x vocab]`` log-softmax. Here only the N
positions whose label is not ``ignore_index`` are projected, a chunk of rows at
a time, so no ``[N x V]`` tensor ever exists. Each chunk is cuBLAS GEMMs
(``torch.mm``) around one Triton kernel, ``_row_log_softmax`` (one program per
row, streaming over V: online log-sum-exp, target gather, and in place the
gradient ``scale * (onehot - softmax)``), as Liger's fused linear cross-entropy
does. Two paths, chosen by what needs a gradient:

- **frozen LM head** (``weight`` and ``bias`` need no grad, e.g. LoRA): the
  forward forms ``(onehot - softmax) @ W`` for every row into an ``[N, H]``
  buffer; the backward only scales its rows by each token's ``d loss / d logp``
  (known only after the loss, but a scalar per row). GEMMs: 2 (logits, dH), the
  floor's. Workspace: the ``[N, H]`` buffer plus one chunk.
- **trained LM head**: the forward keeps each token's log-sum-exp; the backward
  recomputes each chunk's logits and turns them into ``dlogits`` in place, then
  ``dH_chunk = dlogits @ W`` goes straight into the hidden gradient and
  ``dW += dlogits^T @ h_chunk`` (``addmm_``, in the weight's dtype). GEMMs: 4
  (logits, logits again, dH, dW) against the floor's 3. Workspace: one chunk.
  No V x H fp32 accumulator and no atomics, so the result is deterministic.

A chunk is ``rows x (V + 2H)`` elements of the hidden dtype (its logits, its
gathered hidden rows and its dH rows), at most ``chunk_bytes`` (default 64 MiB,
``SRC_DPO_CHUNK_BYTES``), whatever T and V are.

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


def _completion_rows(hidden, labels, ignore_index):
    """Flat indices of the counted positions, their targets, and the sequence each belongs to."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be [rows, T, H] and labels [rows, T]; got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    flat = (labels != ignore_index).reshape(-1).nonzero().squeeze(1)
    return flat, labels.reshape(-1).index_select(0, flat).contiguous(), flat // hidden.shape[1]


def dpo_loss_from_logps(
    policy_logps, ref_logps, pair_weights=None, beta: float = 0.1, dpop_lambda: float = 0.0
) -> torch.Tensor:
    """The confidence-weighted DPO loss from per-sequence log-probs (chosen rows first, then rejected).

    ``dpop_lambda`` > 0 is DPO-Positive (Pal et al. 2024): the margin loses ``dpop_lambda`` times how far the
    chosen response's log-prob has fallen below the reference's, so the loss cannot fall by pushing both
    responses down, which DPO does on pairs a few tokens apart."""
    if policy_logps.shape[0] % 2:
        raise ValueError(f"expected 2P sequences (chosen then rejected), got {policy_logps.shape[0]}")
    if ref_logps.shape != policy_logps.shape:
        raise ValueError(f"ref_logps must have shape {tuple(policy_logps.shape)}, got {tuple(ref_logps.shape)}")
    pc, pr = policy_logps.float().chunk(2)
    rc, rr = ref_logps.float().chunk(2)
    margin = (pc - rc) - (pr - rr)
    if dpop_lambda:
        margin = margin - dpop_lambda * (rc - pc).clamp(min=0)
    losses = -F.logsigmoid(beta * margin)
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
    flat, targets, seq = _completion_rows(hidden, labels, ignore_index)
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat), weight, bias).float()
    token_logps = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    return torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, seq, token_logps)


def weighted_dpo_loss_reference(
    hidden, weight, labels, ref_logps, pair_weights=None, beta=0.1, bias=None, ignore_index=-100, dpop_lambda=0.0
):
    policy_logps = sequence_logps_reference(hidden, weight, labels, bias, ignore_index)
    return dpo_loss_from_logps(policy_logps, ref_logps, pair_weights, beta, dpop_lambda), policy_logps


# --- Triton kernel and the chunked autograd Function -------------------------------------------

CHUNK_BYTES = int(os.environ.get("SRC_DPO_CHUNK_BYTES", 64 * 2**20))


def _block_v(V: int) -> int:
    # One program streams its row in blocks; wide blocks keep loads coalesced on a GPU, narrow ones keep the
    # CPU interpreter's per-block arrays small.
    return min(triton.next_power_of_2(V), 128 if _interpreting() else 4096)


@triton.heuristics(
    {
        "BLOCK_V": lambda args: _block_v(args["V"]),
        "num_warps": lambda args: 1 if _interpreting() else min(16, max(4, _block_v(args["V"]) // 256)),
    }
)
@triton.jit
def _row_log_softmax(
    logits_ptr,
    stride,
    tgt_ptr,
    lse_ptr,
    logp_ptr,
    scale_ptr,
    V,
    BLOCK_V: tl.constexpr,
    HAS_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """One row of a logits chunk: its log-sum-exp and target log-prob (unless ``HAS_LSE``: read them), then,
    with ``WRITE_GRAD``, the row overwritten in place by ``scale * (onehot(target) - softmax)``.

    Launch: one program per row of the chunk; two streaming passes over V at most, fp32 arithmetic."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    target = tl.load(tgt_ptr + row)
    if HAS_LSE:
        lse = tl.load(lse_ptr + row)
    else:
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        tl.store(lse_ptr + row, lse)
        tl.store(logp_ptr + row, tl.load(base + target).to(tl.float32) - lse)
    if WRITE_GRAD:
        scale = tl.load(scale_ptr + row) if HAS_SCALE else 1.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = scale * ((cols == target).to(tl.float32) - tl.exp(x - lse))
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < V)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(hidden, weight, bias):
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def _chunks(N: int, V: int, H: int, element_size: int, chunk_bytes: int):
    """Row ranges whose logits, gathered hidden rows and dH rows fit in ``chunk_bytes`` together."""
    rows = max(1, chunk_bytes // ((V + 2 * H) * element_size))
    return [(n0, min(n0 + rows, N)) for n0 in range(0, N, rows)]


def _logits(h_chunk, weight, bias):
    """[rows, V] logits in the hidden dtype (cuBLAS accumulates in fp32)."""
    return torch.addmm(bias, h_chunk, weight.t()) if bias is not None else torch.mm(h_chunk, weight.t())


def _launch(logits, targets, lse, logp, scale=None, *, has_lse: bool, write_grad: bool):
    _row_log_softmax[(logits.shape[0],)](
        logits,
        logits.stride(0),
        targets,
        lse,
        logp,
        scale if scale is not None else lse,
        logits.shape[1],
        HAS_LSE=has_lse,
        WRITE_GRAD=write_grad,
        HAS_SCALE=scale is not None,
    )


class _ChunkedSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk_bytes):
        _check(hidden, weight, bias)
        flat, targets, seq = _completion_rows(hidden, labels, ignore_index)
        N, (V, H) = flat.numel(), weight.shape
        rows = hidden.reshape(-1, H)
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        train_head = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        frozen_grad = ctx.needs_input_grad[0] and not train_head
        # Frozen head: (onehot - softmax) @ W of every row, scaled by d loss / d logp in the backward.
        unscaled_dh = torch.empty((N, H), dtype=hidden.dtype, device=hidden.device) if frozen_grad else None
        for n0, n1 in _chunks(N, V, H, hidden.element_size(), chunk_bytes):
            h_chunk = rows.index_select(0, flat[n0:n1])
            logits = _logits(h_chunk, weight, bias)
            _launch(logits, targets[n0:n1], lse[n0:n1], logp[n0:n1], has_lse=False, write_grad=frozen_grad)
            if frozen_grad:
                torch.mm(logits, weight, out=unscaled_dh[n0:n1])
            del h_chunk, logits
        logps = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, seq, logp)
        ctx.frozen, ctx.chunk_bytes, ctx.hidden_shape = frozen_grad, chunk_bytes, hidden.shape
        if frozen_grad:
            ctx.save_for_backward(unscaled_dh, flat, seq)
        else:
            ctx.save_for_backward(hidden, weight, bias, flat, targets, seq, lse)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        if ctx.frozen:
            unscaled_dh, flat, seq = ctx.saved_tensors
            H = unscaled_dh.shape[1]
            grad_hidden = torch.zeros(ctx.hidden_shape, dtype=unscaled_dh.dtype, device=unscaled_dh.device)
            scale = grad_logps.float().index_select(0, seq)[:, None]
            grad_hidden.view(-1, H).index_copy_(0, flat, (unscaled_dh * scale).to(unscaled_dh.dtype))
            return grad_hidden, None, None, None, None, None
        hidden, weight, bias, flat, targets, seq, lse = ctx.saved_tensors
        N, (V, H) = flat.numel(), weight.shape
        rows = hidden.reshape(-1, H)
        scale = grad_logps.float().index_select(0, seq).contiguous()  # d loss / d token log-prob
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.zeros(ctx.hidden_shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_weight = torch.zeros_like(weight) if need_w else None
        grad_bias = torch.zeros(V, dtype=torch.float32, device=hidden.device) if need_b else None
        for n0, n1 in _chunks(N, V, H, hidden.element_size(), ctx.chunk_bytes):
            h_chunk = rows.index_select(0, flat[n0:n1])
            dlogits = _logits(h_chunk, weight, bias)  # recomputed: never stored between forward and backward
            _launch(dlogits, targets[n0:n1], lse[n0:n1], lse[n0:n1], scale[n0:n1], has_lse=True, write_grad=True)
            if need_h:
                grad_hidden.view(-1, H).index_copy_(0, flat[n0:n1], torch.mm(dlogits, weight))
            if need_w:
                grad_weight.addmm_(dlogits.t(), h_chunk)
            if need_b:
                grad_bias += dlogits.float().sum(0)
            del h_chunk, dlogits
        return grad_hidden, grad_weight, grad_bias.to(bias.dtype) if need_b else None, None, None, None


def weighted_dpo_loss(
    hidden,
    weight,
    labels,
    ref_logps,
    pair_weights=None,
    beta=0.1,
    bias=None,
    ignore_index=-100,
    dpop_lambda: float = 0.0,
    chunk_bytes: int | None = None,
):
    """(loss, policy_logps) through the chunked kernel; same contract as the reference. The frozen-head path
    is taken when neither ``weight`` nor ``bias`` needs a gradient."""
    policy_logps = _ChunkedSequenceLogps.apply(hidden, weight, bias, labels, ignore_index, chunk_bytes or CHUNK_BYTES)
    return dpo_loss_from_logps(policy_logps, ref_logps, pair_weights, beta, dpop_lambda), policy_logps


@torch.no_grad()
def sequence_logps(
    hidden, weight, labels, bias=None, ignore_index: int = -100, chunk_bytes: int | None = None
) -> torch.Tensor:
    """[rows] fp32 per-sequence sums of target log-probs, chunked, without gradients (reference-model log-probs).
    One GEMM (the logits) and one chunk of workspace."""
    return _ChunkedSequenceLogps.apply(hidden, weight, bias, labels, ignore_index, chunk_bytes or CHUNK_BYTES)


class WeightedDPOLoss(torch.nn.Module):
    """``weighted_dpo_loss`` as a module; ``fused=False`` selects the eager reference."""

    def __init__(self, beta: float = 0.1, ignore_index: int = -100, fused: bool = True):
        super().__init__()
        self.beta, self.ignore_index, self.fused = beta, ignore_index, fused

    def forward(self, hidden, weight, labels, ref_logps, pair_weights=None, bias=None):
        fn = weighted_dpo_loss if self.fused else weighted_dpo_loss_reference
        return fn(hidden, weight, labels, ref_logps, pair_weights, self.beta, bias, self.ignore_index)
