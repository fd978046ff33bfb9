"""The linear workload: truth, data, local training, noise levels and metrics (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clair_ray.config import load_config
from clair_ray.workloads import get_workload

BASE = [
    "workload.num_clients=10",
    "workload.p=6",
    "workload.q=3",
    "workload.true_rank=2",
    "workload.n_min=10",
    "workload.n_median=30",
]


def make(*extra: str):
    return get_workload(load_config(None, [*BASE, *extra]))


def test_problem_is_deterministic_and_well_formed() -> None:
    a, b = make("workload.quantity_skew=0.8").problem(0), make("workload.quantity_skew=0.8").problem(0)
    assert torch.equal(a.U, b.U) and torch.equal(a.W, b.W) and np.array_equal(a.n, b.n)
    assert torch.allclose(a.U.T @ a.U, torch.eye(2, dtype=torch.float64))
    assert a.W.shape == (10, 6, 3) and (a.n >= 10).all() and len(set(a.n.tolist())) > 1
    c = make("workload.quantity_skew=0.8").problem(1)
    assert not torch.equal(a.U, c.U), "trials draw fresh problems"


def test_heterogeneity_zero_means_identical_clients() -> None:
    W = make("workload.heterogeneity=0").problem(0).W
    assert torch.allclose(W, W[0].expand_as(W))
    W = make("workload.heterogeneity=1").problem(0).W
    assert not torch.allclose(W, W[0].expand_as(W))


def test_updates_live_in_u_plus_offset() -> None:
    wl = make("workload.base_scale=2.0")
    prob = wl.problem(0)
    D = prob.W - prob.W0
    assert torch.allclose(D, prob.U @ (prob.U.T @ D))
    assert wl.off_subspace_energy(0, prob.W).max() < 1e-10


def test_noiseless_ols_recovers_truth() -> None:
    wl = make("workload.noise_std=0")
    M, info = wl.train(0, 3, None)
    assert info["noise_level"] == 0.0 and info["noise_scale"] > 0
    assert np.allclose(M, wl.problem(0).W[3].numpy())
    assert wl.errors(0, torch.from_numpy(M)[None].expand(10, -1, -1))["error"][3] < 1e-10


def test_noise_level_matches_ols_error() -> None:
    # Across clients the OLS error outside U should be near the predicted level (a chi-type variable).
    wl = make(
        "workload.noise_std=1.0",
        "workload.num_clients=40",
        "workload.p=12",
        "workload.q=8",
        "workload.n_min=20",
        "workload.n_median=40",
    )
    ratios = []
    for k in range(40):
        M, info = wl.train(0, k, None)
        lvl = info["noise_level"]
        ratios.append(wl.off_subspace_energy(0, torch.from_numpy(M)[None])[0] / lvl)
    assert 0.85 < float(np.mean(ratios)) < 1.15


def test_multi_round_gradient_steps_approach_ols() -> None:
    wl = make("workload.mode=multi_round", "workload.local_steps=3", "workload.lr=0.3")
    ols = torch.linalg.lstsq(*wl.client_data(0, 2)).solution.numpy()
    start = wl.initial_model()
    gaps = []
    for _ in range(4):
        start, _ = wl.train(0, 2, start)
        gaps.append(np.linalg.norm(start - ols))
    assert all(b < a for a, b in zip(gaps, gaps[1:], strict=False))


def test_data_contamination_changes_targets() -> None:
    wl = make("contamination.fraction=0.5", "contamination.mix={data_random: 1.0}")
    prob = wl.contamination(0)
    assert len(prob.contaminated) == 5 and all(prob.is_data_attack(k) for k in prob.contaminated)
    clean = make().client_data(0, prob.contaminated[0])[1]
    dirty = wl.client_data(0, prob.contaminated[0])[1]
    assert not torch.allclose(clean, dirty)


def test_metrics() -> None:
    wl = make("workload.noise_std=0.5")
    W = wl.problem(0).W
    m = wl.errors(0, W + 0.1)
    assert m["error"] == pytest.approx(np.full(10, 0.1 * np.sqrt(18)))
    assert m["test_mse"] == pytest.approx(m["error"] ** 2 / 3 + 0.25)
    assert wl.subspace_error(0, wl.problem(0).U) < 1e-12
    assert np.isnan(wl.subspace_error(0, None))


def test_gradient_step_clients_report_the_noise_of_what_they_send() -> None:
    """After t gradient steps M = (I − F) M0 + F W_ols exactly; the reported noise scale is that
    estimate's, sqrt(tr(F (XᵀX)⁻¹ Fᵀ)), and the truth's level adds the unfinished optimisation's energy
    outside U (one-shot: F = I, the OLS formulas)."""
    wl = make("workload.mode=multi_round", "workload.local_steps=3", "workload.lr=0.3")
    X, Y = wl.client_data(0, 4)
    G = torch.linalg.inv(X.T @ X)
    W_ols = G @ X.T @ Y
    start = torch.randn(wl.w.p, wl.w.q, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    M, info = wl.train(0, 4, start.numpy())
    F = wl._steps_map(X)
    torch.testing.assert_close(torch.from_numpy(M), start - F @ start + F @ W_ols)
    assert info["noise_scale"] == pytest.approx(float(torch.sqrt(torch.trace(F @ G @ F.T))))
    prob = wl.problem(0)
    Pp = torch.eye(wl.w.p, dtype=torch.float64) - prob.U @ prob.U.T  # P_U⊥
    bias = Pp @ (start - F @ start + F @ prob.W[4])  # W_0 = 0 here
    want = wl.w.noise_std**2 * wl.w.q * float(torch.trace(Pp @ F @ G @ F.T)) + float((bias**2).sum())
    assert info["noise_level"] == pytest.approx(math.sqrt(want))
    one = make()
    _, info1 = one.train(0, 4, None)
    assert info1["noise_scale"] == pytest.approx(float(torch.sqrt(torch.trace(G))))
    U = one.problem(0).U
    level = one.w.noise_std * math.sqrt(one.w.q * float(torch.trace(G) - torch.trace(U.T @ G @ U)))
    assert info1["noise_level"] == pytest.approx(level)
