"""Factor inputs with a common offset (low-rank centre), projection on both sides, module combination."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import clair_ray
from clair_ray.clair import combine_modules
from clair_ray.clair.detect import null_survival, null_threshold
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
    both = clair_ray.clair(inst.estimates, rank=2, side="both", refine=2)
    assert both.contaminated == col.contaminated == inst.contaminated
    u, v = both.refine_bases
    assert u.shape == (16, 2) and v.shape == (12, 2)
    mean = inst.estimates[both.honest].mean(dim=0)
    for k in both.honest:
        want = mean + u @ u.T @ (inst.estimates[k] - mean) @ v @ v.T
        torch.testing.assert_close(both.refined[k], want, rtol=1e-10, atol=1e-12)
    pairs = lora_factors(inst, 12)
    both_f = clair_ray.clair(pairs, rank=2, side="both", solver="admm", refine=2)
    assert both_f.contaminated == both.contaminated
    assert subspace_error(both_f.subspace, both.subspace) < 1e-6
    assert subspace_error(both_f.refine_bases[0], u) < 1e-6
    assert subspace_error(both_f.refine_bases[1], v) < 1e-6
    for k in both.honest:
        torch.testing.assert_close(both_f.refined.dense(k), both.refined[k], rtol=1e-6, atol=1e-8)


def test_combine_modules() -> None:
    a = make_instance(20, 12, 6, 2, fraction=0.2, sigma=0.01, seed=1)
    b = make_instance(20, 10, 4, 2, fraction=0.0, sigma=0.01, seed=2)
    updates_b = b.estimates.clone()
    updates_b[7, 0, 0] = math.nan
    res = {"attn": clair_ray.clair(a.estimates, rank=2), "mlp": clair_ray.clair(updates_b, rank=2)}
    det = combine_modules(res)
    # T = sum over modules of max(z, 0)^2 with z standardised so that a module's own threshold is z = 4.
    for k in range(20):
        want = 0.0
        for r in res.values():
            s = r.scores.double()
            med = float(s[torch.isfinite(s)].median())
            z = (float(s[k]) - med) / ((r.info["threshold"] - med) / 4.0)
            want += max(z, 0.0) ** 2
        assert float(det.scores[k]) == pytest.approx(want)
    assert det.threshold == pytest.approx(null_threshold(0.5 * math.erfc(4.0 / math.sqrt(2.0)), 2))
    assert det.reasons[7].startswith("non-finite in module(s) mlp")
    # Module "attn" carries the contamination: its outliers are flagged, and nobody else is.
    assert set(det.contaminated) == set(a.contaminated) | {7}
    with pytest.raises(ValueError, match="results: empty"):
        combine_modules({})


def test_combined_null_distribution() -> None:
    # One module: the combination is exactly that module's rule (z > mad_k).
    assert null_survival(16.0, 1) == pytest.approx(0.5 * math.erfc(4.0 / math.sqrt(2.0)), rel=1e-9)
    assert null_threshold(0.5 * math.erfc(4.0 / math.sqrt(2.0)), 1) == pytest.approx(16.0, rel=1e-9)
    # Several modules: the survival of T = sum max(z, 0)^2 for iid N(0, 1) z matches a simulation.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200_000, 8, generator=gen, dtype=torch.float64)
    t = z.clamp_min(0.0).pow(2).sum(dim=1)
    for cut in (2.0, 6.0, 12.0):
        assert null_survival(cut, 8) == pytest.approx(float((t > cut).double().mean()), abs=3e-3)
    assert null_survival(0.0, 8) == 1.0


def test_thin_or_concentrated_damage_is_flagged() -> None:
    """A client a little off in every module, or far off in one, is flagged; honest clients are not."""
    gen = torch.Generator().manual_seed(3)
    k_all, modules = 40, 8
    scores = 1.0 + 0.1 * torch.randn(modules, k_all, generator=gen, dtype=torch.float64)  # (M, K)
    scores[:, 0] += 0.25  # 2.5 robust sd in every module: mean score/threshold stays below 1
    scores[3, 1] += 0.9  # 9 sd in one module
    results = {}
    for m in range(modules):
        s = scores[m]
        med = float(s.median())
        mad = float((s - med).abs().median())
        results[f"m{m}"] = SimpleNamespace(scores=s, info={"threshold": med + 4 * 1.4826 * mad}, reasons={})
    det = combine_modules(results)
    assert det.contaminated == [0, 1]
