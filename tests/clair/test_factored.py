"""Factor inputs: the compact form gives the dense answer; the fast path agrees with the exact solver."""

from __future__ import annotations

import pytest
import torch

import clair_ray
from clair_ray.clair.metrics import subspace_error
from clair_ray.clair.ops import compact_factors, compact_pairs, stack
from clair_ray.clair.refine import FactoredRefinement
from clair_ray.clair.synthetic import lora_factors, make_instance


@pytest.mark.parametrize("sigma", [0.0, 1e-3])
def test_factored_input_equals_dense_input(sigma: float) -> None:
    inst = make_instance(30, 24, 12, 3, fraction=0.2, sigma=sigma, seed=2, kinds=("dense_noise", "partial"))
    pairs = lora_factors(inst, 12)
    dense = clair_ray.clair(inst.estimates, rank=3, solver="admm")
    fact = clair_ray.clair(pairs, rank=3, solver="admm")
    assert fact.contaminated == dense.contaminated == inst.contaminated
    assert subspace_error(fact.subspace, dense.subspace) < 1e-9
    torch.testing.assert_close(fact.scores, dense.scores, rtol=1e-8, atol=1e-10)
    assert isinstance(fact.refined, FactoredRefinement)
    assert fact.low_rank is None and fact.sparse is None
    correction = fact.refined.correction()
    for k in range(30):
        torch.testing.assert_close(fact.refined.dense(k, correction), dense.refined[k], rtol=1e-8, atol=1e-10)


def test_compact_form_preserves_singular_values_and_block_norms() -> None:
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(5, 9, 3, generator=gen, dtype=torch.float64)
    a = torch.randn(5, 3, 7, generator=gen, dtype=torch.float64)
    dense = torch.bmm(b, a)  # (K, p, q)
    compact = compact_factors(b, a)  # (K, p, r')
    torch.testing.assert_close(torch.linalg.svdvals(stack(compact)), torch.linalg.svdvals(stack(dense))[:9])
    torch.testing.assert_close(
        torch.linalg.vector_norm(compact, dim=(1, 2)), torch.linalg.vector_norm(dense, dim=(1, 2))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compact_pairs_equal_the_stacked_compact_form(dtype: torch.dtype) -> None:
    """Pair by pair: the same Gram C_k C_k^T = B_k A_k A_k^T B_k^T as compact_factors (mixed ranks
    zero-padded, a nearly rank-deficient A_k through the QR route), non-finite pairs flagged and zeroed,
    and stack() of the result a view, not a copy."""
    gen = torch.Generator().manual_seed(1)
    pairs = [
        (torch.randn(9, r, generator=gen, dtype=dtype), torch.randn(r, 7, generator=gen, dtype=dtype))
        for r in (3, 2, 3, 3, 3, 1)
    ]
    b3, a3 = pairs[3]
    pairs[3] = (b3, torch.cat([a3[:2], a3[:1] + 1e-5 * a3[2:]]))  # ill-conditioned: condition number ~1e5
    pairs[4] = (
        pairs[4][0],
        pairs[4][1]
        .clone()
        .index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(float("nan"), dtype=dtype)),
    )
    pairs[5] = (pairs[5][0].clone().index_fill_(0, torch.tensor([0]), float("inf")), pairs[5][1])
    blocks, ok = compact_pairs(pairs)
    assert blocks.shape == (6, 9, 3) and ok.tolist() == [True, True, True, True, False, False]
    assert stack(blocks).data_ptr() == blocks.data_ptr() and not stack(blocks).is_contiguous()
    assert float(blocks[4:].abs().max()) == 0.0
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    for k in range(4):
        b, a = pairs[k]
        dense = b @ a  # (p, q)
        torch.testing.assert_close(blocks[k] @ blocks[k].T, dense @ dense.T, **tol)
        b_pad = torch.cat([b, b.new_zeros(9, 3 - b.shape[1])], dim=1)
        a_pad = torch.cat([a, a.new_zeros(3 - a.shape[0], 7)])
        ref = compact_factors(b_pad[None], a_pad[None])[0]
        torch.testing.assert_close(blocks[k] @ blocks[k].T, ref @ ref.T, **tol)


def test_compact_pairs_flags_a_finite_pair_whose_block_overflows() -> None:
    """B_k A_k finite in float32 entries but ||B_k A_k|| beyond float32's range: not finite, zero block."""
    gen = torch.Generator().manual_seed(2)
    pairs = [(torch.randn(9, 3, generator=gen), torch.randn(3, 7, generator=gen)) for _ in range(3)]
    pairs.append((torch.full((9, 3), 1e30), torch.full((3, 7), 1e10)))
    blocks, ok = compact_pairs(pairs)
    assert ok.tolist() == [True, True, True, False] and bool(torch.isfinite(blocks).all())


def test_refined_factors_keep_one_shared_correction() -> None:
    inst = make_instance(20, 16, 10, 2, fraction=0.2, sigma=1e-3, seed=6)
    pairs = lora_factors(inst, 4)
    res = clair_ray.clair(pairs, rank=2)
    ref = res.refined
    u = res.refine_bases[0]
    assert res.refine_bases[1] is None and u.shape[1] == res.info["refine"]["column"]["rank"]
    for k in range(20):
        b, a = ref.adapter(k)
        if k in res.contaminated:
            assert b is pairs[k][0] and a is pairs[k][1]
        else:
            torch.testing.assert_close(b, u @ (u.T @ pairs[k][0]))
            assert a is pairs[k][1]
    r_b, r_a = ref.correction_factors()
    # R lies outside U and is the mean of the honest updates' off-subspace parts.
    assert float((u.T @ r_b).abs().max()) < 1e-10
    mean = sum(pairs[k][0] @ pairs[k][1] for k in res.honest) / len(res.honest)
    torch.testing.assert_close(r_b @ r_a, mean - u @ (u.T @ mean))


@pytest.mark.parametrize(
    ("sigma", "dtype"), [(0.0, torch.float64), (1e-4, torch.float64), (1e-3, torch.float32)]
)
def test_fast_path_agrees_with_exact(sigma: float, dtype: torch.dtype) -> None:
    inst = make_instance(
        60, 24, 12, 3, fraction=0.25, sigma=sigma, seed=3, kinds=("dense_noise", "other_subspace", "partial")
    )
    pairs = [(b.to(dtype), a.to(dtype)) for b, a in lora_factors(inst, 12)]
    exact = clair_ray.clair(pairs, rank=3, solver="admm")
    fast = clair_ray.clair(pairs, rank=3, solver="fast")
    assert fast.info["solver"] == "fast" and exact.info["solver"] == "admm"
    assert fast.contaminated == exact.contaminated == inst.contaminated
    assert subspace_error(fast.subspace, exact.subspace) < 1e-3


def test_fast_path_on_dense_input_with_offset() -> None:
    inst = make_instance(80, 20, 5, 2, fraction=0.2, sigma=1e-3, base_scale=1.0, seed=12)
    exact = clair_ray.clair(inst.estimates, rank=2, offset=True, solver="admm")
    fast = clair_ray.clair(inst.estimates, rank=2, offset=True, solver="fast")
    assert fast.contaminated == exact.contaminated == inst.contaminated
    assert subspace_error(fast.subspace, exact.subspace) < 1e-3
    assert len(fast.low_rank) == 80


def test_row_side_is_the_transposed_problem() -> None:
    inst = make_instance(20, 12, 6, 2, fraction=0.2, sigma=0.0, seed=7)
    transposed = inst.estimates.transpose(1, 2).contiguous()  # shared subspace now spans rows
    res = clair_ray.clair(transposed, rank=2, side="row")
    assert subspace_error(res.subspace, inst.subspace) < 1e-6
    assert res.contaminated == inst.contaminated
    assert res.refined[0].shape == (6, 12)
    pairs = [(a.T.contiguous(), b.T.contiguous()) for b, a in lora_factors(inst, 6)]
    res_f = clair_ray.clair(pairs, rank=2, side="row")
    assert res_f.contaminated == inst.contaminated
    for k in res_f.honest:
        torch.testing.assert_close(res_f.refined.dense(k), res.refined[k], rtol=1e-7, atol=1e-9)
