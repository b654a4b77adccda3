"""Batched pairwise-judgement aggregation: debiasing, win rates, Bradley-Terry, chosen/rejected, confidence.

SRC judges every ordered pair of a prompt's K candidates, giving ``p[b, i, j]``:
the judged probability that candidate i, shown first, beats candidate j,
shown second. Per prompt this module computes

- ``q_ij = (p_ij + 1 - p_ji) / 2``: both presentation orders averaged, so ``q_ij + q_ji = 1``;
- ``win_rate_i``: the mean of ``q_ij`` over the valid j != i;
- Bradley-Terry strengths by MM (Zermelo) iterations,
  ``s_i <- (sum_j q_ij) / sum_j 1 / (s_i + s_j)``, all candidates at once, then
  renormalised to mean 1 over the valid candidates, from all ones until the
  largest change is below ``bt_tol`` or after ``bt_iters`` iterations;
- ``chosen``/``rejected``: the highest/lowest strength (ties to the lowest index);
- ``agreement = 1 - |p_cr + p_rc - 1|`` (1 when both orders agree) and
  ``confidence = clip(2 q_cr - 1, 0, 1) * agreement``.

Prompts with fewer than two valid candidates get ``chosen = rejected = -1`` and
confidence and agreement 0; so do prompts whose candidates all tie
(``chosen == rejected``). ``q`` is 0 on the diagonal and wherever i or j is
invalid.

``aggregate_pairwise`` is one Triton kernel: a program loads a block of prompts'
K x K tiles once, keeps them on chip through every BT iteration, and writes
all outputs. ``aggregate_pairwise_reference`` is the same math in PyTorch.
This module imports only torch and triton.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_K = 64


class PairwiseAggregate(NamedTuple):
    q: torch.Tensor  # [B, K, K] fp32
    win_rate: torch.Tensor  # [B, K] fp32
    strength: torch.Tensor  # [B, K] fp32
    chosen: torch.Tensor  # [B] int64
    rejected: torch.Tensor  # [B] int64
    confidence: torch.Tensor  # [B] fp32
    agreement: torch.Tensor  # [B] fp32


# The formulas, in one place: the reference below, curation, independent scoring and evaluation all use these
# (the Triton kernel computes the same expressions on chip). Each takes tensors or plain floats.
def debias(p_ij, p_ji):
    """``q_ij``: the judged preference of i over j with both presentation orders averaged (``q_ij + q_ji = 1``)."""
    return (p_ij + 1 - p_ji) * 0.5


def order_agreement(p_ij, p_ji):
    """1 when the two orders' judgements agree (``p_ij + p_ji = 1``), falling to 0 as they contradict."""
    return 1 - abs(p_ij + p_ji - 1)


def pair_confidence(p_ij, p_ji):
    """The weight of the pair (i chosen, j rejected): ``clip(2 q_ij - 1, 0, 1) * agreement``."""
    margin = 2 * debias(p_ij, p_ji) - 1
    margin = margin.clamp(0, 1) if isinstance(margin, torch.Tensor) else min(max(margin, 0.0), 1.0)
    return margin * order_agreement(p_ij, p_ji)


def _check_inputs(p: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if p.dim() != 3 or p.shape[1] != p.shape[2]:
        raise ValueError(f"p must have shape [B, K, K], got {tuple(p.shape)}")
    if not 2 <= p.shape[1] <= MAX_K:
        raise ValueError(f"K must be between 2 and {MAX_K}, got {p.shape[1]}")
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"p must be fp32, bf16 or fp16, got {p.dtype}")
    if valid is None:
        return torch.ones(p.shape[:2], dtype=torch.bool, device=p.device)
    if valid.shape != p.shape[:2]:
        raise ValueError(f"valid must have shape {tuple(p.shape[:2])}, got {tuple(valid.shape)}")
    return valid.to(device=p.device, dtype=torch.bool)


def _non_finite_error(p: torch.Tensor, pair: torch.Tensor) -> ValueError:
    b, i, j = (torch.nonzero(~torch.isfinite(p) & pair)[0]).tolist()
    return ValueError(f"p has a non-finite value at prompt {b}, pair ({i}, {j}): {p[b, i, j].item()}")


def aggregate_pairwise_reference(p, valid=None, bt_iters: int = 50, bt_tol: float = 1e-6) -> PairwiseAggregate:
    valid = _check_inputs(p, valid)
    B, K, _ = p.shape
    eye = torch.eye(K, dtype=torch.bool, device=p.device)
    pair = valid[:, :, None] & valid[:, None, :] & ~eye
    if not torch.isfinite(p[pair]).all():
        raise _non_finite_error(p, pair)
    p = p.float()
    q = torch.where(pair, debias(p, p.transpose(1, 2)), 0.0)
    n_valid = valid.sum(1)
    wins = q.sum(2)
    win_rate = torch.where(valid, wins / (n_valid - 1).clamp(min=1)[:, None], 0.0)

    s = valid.float()
    active = n_valid >= 2
    validf = valid.float()
    for _ in range(bt_iters):
        if not active.any():
            break
        sum_ij = torch.where(pair, s[:, :, None] + s[:, None, :], 1.0)
        denom = torch.where(pair, 1.0 / sum_ij, 0.0).sum(2)
        new = torch.where(valid, wins / torch.where(valid & (denom > 0), denom, 1.0), 0.0)
        mean = (new * validf).sum(1) / n_valid.clamp(min=1)
        new = new / torch.where(mean > 0, mean, 1.0)[:, None]
        delta = (new - s).abs().amax(1)
        s = torch.where(active[:, None], new, s)
        active = active & (delta >= bt_tol)

    chosen = torch.where(valid, s, -torch.inf).argmax(1)
    rejected = torch.where(valid, s, torch.inf).argmin(1)
    ok = (n_valid >= 2) & (chosen != rejected)
    rows = torch.arange(B, device=p.device)
    p_cr, p_rc = p[rows, chosen, rejected], p[rows, rejected, chosen]
    agreement = torch.where(ok, order_agreement(p_cr, p_rc), 0.0)
    confidence = torch.where(ok, pair_confidence(p_cr, p_rc), 0.0)
    few = n_valid < 2
    chosen = torch.where(few, -1, chosen)
    rejected = torch.where(few, -1, rejected)
    return PairwiseAggregate(q, win_rate, s, chosen, rejected, confidence, agreement)


@triton.jit
def _aggregate_kernel(
    p_ptr,
    valid_ptr,
    q_ptr,
    win_ptr,
    s_ptr,
    chosen_ptr,
    rejected_ptr,
    conf_ptr,
    agree_ptr,
    bad_ptr,
    B,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    HAS_VALID: tl.constexpr,
    bt_iters,
    bt_tol,
):
    pid = tl.program_id(0)
    b = pid * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
    k = tl.arange(0, KP)  # [KP]
    b_in = b < B
    k_in = k < K
    if HAS_VALID:
        vb = tl.load(valid_ptr + b[:, None] * K + k[None, :], mask=b_in[:, None] & k_in[None, :], other=0) != 0
    else:
        vb = b_in[:, None] & k_in[None, :]
    b3 = b[:, None, None].to(tl.int64)
    i3 = k[None, :, None]
    j3 = k[None, None, :]
    pair = vb[:, :, None] & vb[:, None, :] & (i3 != j3)  # [BB, KP, KP]
    in_tile = b_in[:, None, None] & (i3 < K) & (j3 < K)
    base = b3 * (K * K)
    p = tl.load(p_ptr + base + i3 * K + j3, mask=in_tile, other=0.5).to(tl.float32)
    # The transposed tile reads the same bytes again, from cache rather than memory.
    pt = tl.load(p_ptr + base + j3 * K + i3, mask=in_tile, other=0.5).to(tl.float32)

    non_finite = pair & ((p != p) | (tl.abs(p) == float("inf")))
    tl.store(bad_ptr + b, tl.max(tl.max(non_finite.to(tl.int32), axis=2), axis=1), mask=b_in)

    q = tl.where(pair, (p + 1.0 - pt) * 0.5, 0.0)
    tl.store(q_ptr + base + i3 * K + j3, q, mask=in_tile)

    validf = vb.to(tl.float32)
    n_valid = tl.sum(validf, axis=1)  # [BB]
    wins = tl.sum(q, axis=2)  # [BB, KP]
    win_rate = tl.where(vb, wins / tl.maximum(n_valid - 1.0, 1.0)[:, None], 0.0)

    s = validf
    active = n_valid >= 2.0
    it = 0
    while (it < bt_iters) & (tl.max(active.to(tl.int32), axis=0) > 0):
        sum_ij = tl.where(pair, s[:, :, None] + s[:, None, :], 1.0)
        denom = tl.sum(tl.where(pair, 1.0 / sum_ij, 0.0), axis=2)
        # Prompts with fewer than two candidates (and padding rows) divide by 1, not 0; they stay inactive.
        new = tl.where(vb, wins / tl.where(vb & (denom > 0), denom, 1.0), 0.0)
        mean = tl.sum(new * validf, axis=1) / tl.maximum(n_valid, 1.0)
        new = new / tl.where(mean > 0, mean, 1.0)[:, None]
        delta = tl.max(tl.abs(new - s), axis=1)
        s = tl.where(active[:, None], new, s)
        active = active & (delta >= bt_tol)
        it += 1

    chosen = tl.argmax(tl.where(vb, s, float("-inf")), axis=1, tie_break_left=True)
    rejected = tl.argmin(tl.where(vb, s, float("inf")), axis=1, tie_break_left=True)
    ok = (n_valid >= 2.0) & (chosen != rejected)
    is_cr = (i3 == chosen[:, None, None]) & (j3 == rejected[:, None, None])
    is_rc = (i3 == rejected[:, None, None]) & (j3 == chosen[:, None, None])
    p_cr = tl.sum(tl.sum(tl.where(is_cr, p, 0.0), axis=2), axis=1)
    p_rc = tl.sum(tl.sum(tl.where(is_rc, p, 0.0), axis=2), axis=1)
    q_cr = tl.sum(tl.sum(tl.where(is_cr, q, 0.0), axis=2), axis=1)
    agreement = tl.where(ok, 1.0 - tl.abs(p_cr + p_rc - 1.0), 0.0)
    confidence = tl.where(ok, tl.minimum(tl.maximum(2.0 * q_cr - 1.0, 0.0), 1.0) * agreement, 0.0)
    few = n_valid < 2.0

    out2 = b[:, None] * K + k[None, :]
    m2 = b_in[:, None] & k_in[None, :]
    tl.store(win_ptr + out2, win_rate, mask=m2)
    tl.store(s_ptr + out2, s, mask=m2)
    tl.store(chosen_ptr + b, tl.where(few, -1, chosen).to(tl.int64), mask=b_in)
    tl.store(rejected_ptr + b, tl.where(few, -1, rejected).to(tl.int64), mask=b_in)
    tl.store(conf_ptr + b, confidence, mask=b_in)
    tl.store(agree_ptr + b, agreement, mask=b_in)


def _block_b(kp: int) -> int:
    # About 4096 tile elements per program: enough work per program, and a tile that stays in registers.
    return max(1, 4096 // (kp * kp))


def aggregate_pairwise(p, valid=None, bt_iters: int = 50, bt_tol: float = 1e-6) -> PairwiseAggregate:
    has_valid = valid is not None
    valid = _check_inputs(p, valid)
    p = p.contiguous()
    B, K, _ = p.shape
    dev = p.device
    q = torch.empty((B, K, K), dtype=torch.float32, device=dev)
    win_rate = torch.empty((B, K), dtype=torch.float32, device=dev)
    strength = torch.empty((B, K), dtype=torch.float32, device=dev)
    chosen = torch.empty(B, dtype=torch.int64, device=dev)
    rejected = torch.empty(B, dtype=torch.int64, device=dev)
    confidence = torch.empty(B, dtype=torch.float32, device=dev)
    agreement = torch.empty(B, dtype=torch.float32, device=dev)
    bad = torch.empty(B, dtype=torch.int32, device=dev)
    if B == 0:
        return PairwiseAggregate(q, win_rate, strength, chosen, rejected, confidence, agreement)
    kp = triton.next_power_of_2(K)
    block_b = _block_b(kp)
    valid_u8 = valid.to(torch.uint8).contiguous() if has_valid else bad  # unused when HAS_VALID is False
    _aggregate_kernel[(triton.cdiv(B, block_b),)](
        p,
        valid_u8,
        q,
        win_rate,
        strength,
        chosen,
        rejected,
        confidence,
        agreement,
        bad,
        B,
        K=K,
        KP=kp,
        BLOCK_B=block_b,
        HAS_VALID=has_valid,
        bt_iters=bt_iters,
        bt_tol=bt_tol,
        num_warps=4,
    )
    if bad.any():
        eye = torch.eye(K, dtype=torch.bool, device=dev)
        raise _non_finite_error(p, valid[:, :, None] & valid[:, None, :] & ~eye)
    return PairwiseAggregate(q, win_rate, strength, chosen, rejected, confidence, agreement)
