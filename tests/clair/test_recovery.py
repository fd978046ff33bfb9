"""Exact recovery without noise, stable recovery with noise, and the refinement's gain."""

from __future__ import annotations

import pytest
import torch

import clair_ray
from clair_ray.clair.metrics import client_errors, detection_metrics, mean_error, subspace_error
from clair_ray.clair.synthetic import make_instance, make_regression

SHAPES = [
    # (K, p, q, r, fraction, offset)
    (30, 20, 5, 3, 0.2, False),
    (40, 30, 1, 2, 0.3, False),  # q = 1: regression columns
    (20, 16, 40, 2, 0.3, False),  # q > p: the exact solver works on the compact form
    (30, 20, 5, 3, 0.3, True),  # unknown common offset
    (24, 12, 6, 1, 0.1, False),
]


@pytest.mark.parametrize(("k", "p", "q", "r", "fraction", "offset"), SHAPES)
@pytest.mark.parametrize("kinds", [("dense_noise",), ("other_subspace",), ("dense_noise", "other_subspace")])
def test_noiseless_exact_recovery(
    k: int, p: int, q: int, r: int, fraction: float, offset: bool, kinds: tuple[str, ...]
) -> None:
    inst = make_instance(
        k, p, q, r, fraction=fraction, kinds=kinds, base_scale=1.0 if offset else 0.0, seed=k + q
    )
    res = clair_ray.clair(inst.estimates, rank=r, offset=offset)
    assert res.info["problem"] == "P0"
    assert subspace_error(res.subspace, inst.subspace) < 1e-6
    assert res.contaminated == inst.contaminated
    assert set(res.reasons) == set(inst.contaminated)
    assert all(reason.startswith("residual") for reason in res.reasons.values())


def test_noiseless_recovery_with_chosen_rank() -> None:
    inst = make_instance(30, 20, 5, 3, fraction=0.2, seed=5)
    res = clair_ray.clair(inst.estimates)
    assert res.info["rank"] == 3 and res.info["rank_chosen"]
    assert subspace_error(res.subspace, inst.subspace) < 1e-6
    assert res.contaminated == inst.contaminated


def test_stable_recovery_grows_linearly_with_noise() -> None:
    sigmas = [1e-3, 4e-3, 1.6e-2]
    errs = []
    for sigma in sigmas:
        inst = make_instance(40, 20, 5, 3, fraction=0.2, sigma=sigma, seed=11)
        res = clair_ray.clair(inst.estimates, rank=3)
        assert res.info["problem"] == "P1"
        assert res.contaminated == inst.contaminated
        errs.append(subspace_error(res.subspace, inst.subspace))
    # Each 4x step in sigma multiplies the error by about 4 (linear, not worse).
    for lo, hi in zip(errs, errs[1:], strict=False):
        assert 2.5 < hi / lo < 6.0
    assert errs[0] < 0.05


def test_noise_estimate_tracks_sigma() -> None:
    inst = make_instance(40, 20, 5, 3, fraction=0.3, sigma=0.02, seed=2)
    res = clair_ray.clair(inst.estimates, rank=3)
    assert res.info["noise_sigma"] == pytest.approx(0.02, rel=0.15)


@pytest.mark.parametrize("offset", [False, True])
def test_refinement_beats_local_when_rank_is_small(offset: bool) -> None:
    inst = make_instance(
        40,
        32,
        8,
        2,
        fraction=0.2,
        sigma=0.05,
        base_scale=1.0 if offset else 0.0,
        seed=4,
        kinds=("dense_noise", "other_subspace", "sign_flip", "partial"),
    )
    res = clair_ray.clair(inst.estimates, rank=2, offset=offset)
    local = mean_error(client_errors(inst.estimates, inst.truth), inst.honest)
    refined = mean_error(client_errors(res.refined, inst.truth), inst.honest)
    assert refined < 0.6 * local
    # Detection is judged against contamination with energy outside U; sign flips are invisible.
    invisible = set(inst.contaminated) - set(inst.detectable())
    metrics = detection_metrics(set(res.contaminated) - invisible, inst.detectable())
    assert metrics["f1"] == 1.0


def test_regression_with_unequal_sample_sizes() -> None:
    samples = [40 + 10 * (k % 5) for k in range(30)]
    inst = make_regression(30, 12, 4, 2, samples=samples, fraction=0.2, sigma=0.3, seed=8)
    res = clair_ray.clair(inst.estimates, rank=2, noise_scale=inst.noise_scale)
    assert res.contaminated == inst.contaminated
    local = mean_error(client_errors(inst.estimates, inst.truth), inst.honest)
    refined = mean_error(client_errors(res.refined, inst.truth), inst.honest)
    assert refined < local


def test_refined_formula_and_flagged_passthrough() -> None:
    inst = make_instance(20, 10, 4, 2, fraction=0.2, sigma=0.01, seed=9)
    res = clair_ray.clair(inst.estimates, rank=2, refine=2, mean_clip=None)
    u = res.refine_bases[0]
    assert u.shape == (10, 2)
    honest = res.honest
    mean = inst.estimates[honest].mean(dim=0)
    for k in range(20):
        if k in honest:
            want = u @ u.T @ inst.estimates[k] + mean - u @ u.T @ mean
            torch.testing.assert_close(res.refined[k], want, rtol=1e-10, atol=1e-12)
        else:
            assert torch.equal(res.refined[k], inst.estimates[k])
    # L + S (+ c) reproduces the data exactly in P0 and approximately in P1.
    for k in range(20):
        assert res.low_rank[k].shape == (10, 4) and res.sparse[k].shape == (10, 4)


def test_one_huge_block_does_not_bend_the_subspace() -> None:
    """A client 1e6 x larger than the rest (a scaling attack compounding over rounds) is flagged and
    changes neither the subspace nor the other verdicts: blocks above 10 x the median norm are scaled
    down to it for the fit."""
    inst = make_instance(30, 16, 8, 2, fraction=0.2, sigma=0.05, seed=11)
    plain = clair_ray.clair(inst.estimates, rank=2)
    big = inst.estimates.clone()
    k = inst.contaminated[0]
    big[k] = big[k] * 1e6
    res = clair_ray.clair(big, rank=2)
    assert res.contaminated == plain.contaminated == inst.contaminated
    assert res.info["clipped"] == [k]
    # Scaled down to 10 x the median norm, it still counts a little, as much as a large client may.
    assert subspace_error(res.subspace, inst.subspace) < 1.5 * subspace_error(plain.subspace, inst.subspace)
    assert subspace_error(res.subspace, plain.subspace) < 0.01
