"""Factor inputs with a common offset (low-rank centre), projection on both sides, module combination."""

from __future__ import annotations

import math

import pytest
import torch

import clair_ray
from clair_ray.clair import combine_modules
from clair_ray.clair.metrics import subspace_error
from clair_ray.clair.synthetic import Instance, lora_factors, make_instance


@pytest.fixture(scope="module")
def offset_instance() -> Instance:
    """Honest U V_k^T plus a rank-2 part every client shares (the LoRA case the centre is for)."""
    inst = make_instance(30, 24, 12, 3, fraction=0.2, seed=3, kinds=("dense_noise", "other_subspace"))
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(24, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        2, 12, generator=gen, dtype=torch.float64
    )
    inst.estimates = inst.estimates + common
    return inst


def test_factored_offset_matches_dense_offset(offset_instance: Instance) -> None:
    inst = offset_instance
    pairs = lora_factors(inst, 12)
    dense = clair_ray.clair(inst.estimates, rank=3, offset=True)
    fact = clair_ray.clair(pairs, rank=3, offset=True)
    assert fact.contaminated == dense.contaminated == inst.contaminated
    assert subspace_error(fact.subspace, inst.subspace) < 1e-6
    c_b, c_a = fact.offset
    assert c_b.shape == (24, 12) and c_a.shape == (12, 12)
    correction = fact.refined.correction()
    for k in fact.honest:
        torch.testing.assert_close(fact.refined.dense(k, correction), dense.refined[k], rtol=1e-6, atol=1e-8)
    # Without the offset the shared part pollutes the subspace.
    plain = clair_ray.clair(pairs, rank=3)
    assert subspace_error(plain.subspace, inst.subspace) > 0.1


def test_factored_offset_fast_path(offset_instance: Instance) -> None:
    pairs = lora_factors(offset_instance, 12)
    fast = clair_ray.clair(pairs, rank=3, offset=True, solver="fast")
    assert fast.contaminated == offset_instance.contaminated
    assert subspace_error(fast.subspace, offset_instance.subspace) < 1e-3


def test_both_sides_refinement_and_detection() -> None:
    inst = make_instance(30, 16, 12, 2, fraction=0.2, sigma=0.01, seed=5)
    col = clair_ray.clair(inst.estimates, rank=2)
    both = clair_ray.clair(inst.estimates, rank=2, side="both")
    assert both.contaminated == col.contaminated == inst.contaminated
    u, v = both.subspace, both.info["row_subspace"]
    assert v.shape == (12, 2)
    mean = inst.estimates[both.honest].mean(dim=0)
    for k in both.honest:
        want = mean + u @ u.T @ (inst.estimates[k] - mean) @ v @ v.T
        torch.testing.assert_close(both.refined[k], want, rtol=1e-10, atol=1e-12)
    pairs = lora_factors(inst, 12)
    both_f = clair_ray.clair(pairs, rank=2, side="both", solver="admm")
    assert both_f.contaminated == both.contaminated
    assert subspace_error(both_f.subspace, u) < 1e-6
    assert subspace_error(both_f.info["row_subspace"], v) < 1e-6
    for k in both.honest:
        torch.testing.assert_close(both_f.refined.dense(k), both.refined[k], rtol=1e-6, atol=1e-8)


def test_combine_modules() -> None:
    a = make_instance(20, 12, 6, 2, fraction=0.2, sigma=0.01, seed=1)
    b = make_instance(20, 10, 4, 2, fraction=0.0, sigma=0.01, seed=2)
    updates_b = b.estimates.clone()
    updates_b[7, 0, 0] = math.nan
    res = {"attn": clair_ray.clair(a.estimates, rank=2), "mlp": clair_ray.clair(updates_b, rank=2)}
    det = combine_modules(res)
    assert det.threshold == 1.0
    for k in range(20):
        want = (
            res["attn"].scores[k] / res["attn"].info["threshold"]
            + res["mlp"].scores[k] / res["mlp"].info["threshold"]
        ) / 2
        assert float(det.scores[k]) == pytest.approx(float(want))
    assert det.reasons[7].startswith("non-finite in module(s) mlp")
    # Module "attn" carries the contamination; strong outliers there stay flagged after averaging.
    assert set(a.contaminated) <= set(det.contaminated) | set()
    assert set(det.contaminated) - {7} <= set(a.contaminated)
    with pytest.raises(ValueError, match="results: empty"):
        combine_modules({})
