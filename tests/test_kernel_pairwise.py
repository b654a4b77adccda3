"""The pairwise-aggregation Triton kernel against its PyTorch reference (CPU, TRITON_INTERPRET=1)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.pairwise import aggregate_pairwise, aggregate_pairwise_reference

# Strengths come out of up to 50 fp32 MM iterations summed in different orders: 1e-5 absolute.
ATOL = {"q": 0, "win_rate": 1e-6, "strength": 1e-5, "confidence": 1e-6, "agreement": 1e-6}


def assert_same(kernel, reference):
    for name in ("q", "win_rate", "strength", "confidence", "agreement"):
        torch.testing.assert_close(
            getattr(kernel, name), getattr(reference, name), atol=ATOL[name], rtol=1e-5, msg=name
        )
    assert torch.equal(kernel.chosen, reference.chosen)
    assert torch.equal(kernel.rejected, reference.rejected)


def random_judgements(B, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, K, K, generator=g)


@pytest.mark.parametrize(
    "B, K",
    [(150, 8), (40, 2), (37, 3), (20, 5), (9, 13), (20, 16), (5, 33), (3, 64)],
)
def test_matches_reference_across_shapes(B, K):
    # B spans several program blocks for every K (blocks hold 4096 // next_pow2(K)**2 prompts).
    p = random_judgements(B, K, seed=K)
    assert_same(aggregate_pairwise(p), aggregate_pairwise_reference(p))


def test_debiasing_and_normalisation_invariants():
    p = random_judgements(64, 6)
    out = aggregate_pairwise(p)
    off = ~torch.eye(6, dtype=torch.bool)
    assert torch.allclose((out.q + out.q.transpose(1, 2))[:, off], torch.ones(1))
    assert torch.allclose(out.strength.mean(1), torch.ones(64), atol=1e-5)
    assert ((out.confidence >= 0) & (out.confidence <= 1)).all()


def test_all_ties():
    p = torch.full((70, 6, 6), 0.5)
    out = aggregate_pairwise(p)
    assert_same(out, aggregate_pairwise_reference(p))
    assert torch.equal(out.strength, torch.ones(70, 6))
    assert torch.equal(out.win_rate, torch.full((70, 6), 0.5))
    assert (out.confidence == 0).all() and (out.agreement == 0).all()


def test_perfectly_ordered_tournament():
    K = 7
    order = torch.randperm(K, generator=torch.Generator().manual_seed(3))  # order[r] = candidate of rank r
    rank = torch.empty(K, dtype=torch.long)
    rank[order] = torch.arange(K)
    p = (rank[:, None] < rank[None, :]).float()[None].repeat(3, 1, 1)
    out = aggregate_pairwise(p)
    assert_same(out, aggregate_pairwise_reference(p))
    assert (out.chosen == order[0]).all() and (out.rejected == order[-1]).all()
    torch.testing.assert_close(out.win_rate[0][order], torch.linspace(1, 0, K))
    assert (out.strength[0][order].diff() < 0).all()
    assert (out.confidence == 1).all() and (out.agreement == 1).all()


def test_masked_candidates_and_too_few_candidates():
    p = random_judgements(130, 8, seed=5)
    valid = torch.rand(130, 8, generator=torch.Generator().manual_seed(6)) > 0.3
    valid[0] = False  # no candidate
    valid[1] = False
    valid[1, 4] = True  # one candidate
    valid[2] = False
    valid[2, [1, 6]] = True  # exactly two
    out = aggregate_pairwise(p, valid)
    assert_same(out, aggregate_pairwise_reference(p, valid))
    assert out.chosen[:2].tolist() == [-1, -1] and out.rejected[:2].tolist() == [-1, -1]
    assert out.confidence[:2].tolist() == [0, 0]
    assert out.strength[1].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    assert {out.chosen[2].item(), out.rejected[2].item()} == {1, 6}
    assert (out.strength[~valid] == 0).all() and (out.win_rate[~valid] == 0).all()
    assert (out.q[~valid] == 0).all()
    # Invalid candidates do not change the others' results: same as dropping them.
    kept = valid[5].nonzero().squeeze(1)
    alone = aggregate_pairwise(p[5:6][:, kept][:, :, kept])
    torch.testing.assert_close(out.strength[5, kept], alone.strength[0], atol=1e-5, rtol=1e-5)


def test_bf16_input():
    p = random_judgements(100, 8, seed=9).to(torch.bfloat16)
    out = aggregate_pairwise(p)
    assert_same(out, aggregate_pairwise_reference(p))  # both read bf16 and compute in fp32
    fp32 = aggregate_pairwise_reference(p.float())
    torch.testing.assert_close(out.strength, fp32.strength, atol=1e-5, rtol=1e-5)
    assert out.q.dtype == torch.float32


@pytest.mark.parametrize("fn", [aggregate_pairwise, aggregate_pairwise_reference])
def test_non_finite_input_raises_naming_the_entry(fn):
    p = random_judgements(80, 5)
    p[71, 2, 4] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite value at prompt 71, pair \(2, 4\): nan"):
        fn(p)
    p[71, 2, 4] = float("inf")
    with pytest.raises(ValueError, match=r"prompt 71, pair \(2, 4\): inf"):
        fn(p)


@pytest.mark.parametrize("fn", [aggregate_pairwise, aggregate_pairwise_reference])
def test_non_finite_values_outside_valid_pairs_are_ignored(fn):
    p = random_judgements(4, 5)
    valid = torch.ones(4, 5, dtype=torch.bool)
    valid[1, 3] = False
    p[:, 0, 0] = float("nan")  # the diagonal is never read
    p[1, 3, :] = float("nan")  # a masked candidate
    out = fn(p, valid)
    assert torch.isfinite(out.strength).all()


@pytest.mark.parametrize(
    "shape, message",
    [
        ((4, 1, 1), "K must be between 2 and 64"),
        ((2, 65, 65), "K must be between 2 and 64"),
        ((3, 4, 5), r"\[B, K, K\]"),
    ],
)
def test_bad_shapes_are_refused(shape, message):
    with pytest.raises(ValueError, match=message):
        aggregate_pairwise(torch.rand(shape))


def test_bt_iteration_limit_and_tolerance_are_honoured():
    p = random_judgements(10, 6, seed=2)
    one = aggregate_pairwise(p, bt_iters=1)
    assert_same(one, aggregate_pairwise_reference(p, bt_iters=1))
    loose = aggregate_pairwise(p, bt_tol=1e-2)
    assert_same(loose, aggregate_pairwise_reference(p, bt_tol=1e-2))
    tight = aggregate_pairwise(p)
    assert not torch.allclose(one.strength, tight.strength, atol=1e-4)


def test_importing_kernels_beside_hugging_face_kernels_names_the_clash(tmp_path):
    # transformers 5.25 pulls in Hugging Face's `kernels`, whose import name is this package's: the error must say
    # so rather than fail later inside transformers. A dist-info folder is all importlib.metadata looks at.
    dist_info = tmp_path / "kernels-0.19.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", "import kernels"],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{tmp_path}"},
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0
    assert "Hugging Face package 'kernels' 0.19.1 is installed" in run.stderr
    assert "transformers>=5.0,<5.25" in run.stderr
    clean = subprocess.run([sys.executable, "-c", "import kernels"], cwd=repo, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
