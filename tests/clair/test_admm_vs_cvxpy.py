"""The exact solvers against an independent convex solver (cvxpy + SCS) on small instances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clair_ray.clair.admm import solve_p0, solve_p1
from clair_ray.clair.synthetic import make_instance

cp = pytest.importorskip("cvxpy")


def _cvxpy_solve(
    m: np.ndarray, lam: float, tau: float | None, offset: bool
) -> tuple[float, np.ndarray, np.ndarray]:
    """P1 (tau given) or P0 (tau None) written out literally in cvxpy."""
    k, p, w = m.shape
    low = [cp.Variable((p, w)) for _ in range(k)]
    sparse = [cp.Variable((p, w)) for _ in range(k)]
    c = cp.Variable((p, w)) if offset else np.zeros((p, w))
    block_pen = lam * sum(cp.norm(s, "fro") for s in sparse)
    if tau is None:
        cons = [m[i] == c + low[i] + sparse[i] for i in range(k)]
        prob = cp.Problem(cp.Minimize(cp.normNuc(cp.hstack(low)) + block_pen), cons)
    else:
        fit = 0.5 * sum(cp.sum_squares(m[i] - c - low[i] - sparse[i]) for i in range(k))
        prob = cp.Problem(cp.Minimize(fit + tau * cp.normNuc(cp.hstack(low)) + block_pen))
    prob.solve(solver=cp.SCS, eps=1e-9, max_iters=200_000)
    return float(prob.value), np.stack([v.value for v in low]), np.stack([v.value for v in sparse])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.mark.parametrize(
    ("k", "p", "q", "offset", "lam", "tau"),
    [
        (8, 8, 3, False, 0.3, 0.4),
        (8, 8, 3, True, 0.6, 0.8),
        (10, 6, 1, False, 0.3, 0.4),
        (6, 10, 4, True, 1.0, 0.8),
    ],
)
def test_p1_matches_cvxpy(k: int, p: int, q: int, offset: bool, lam: float, tau: float) -> None:
    inst = make_instance(k, p, q, 2, fraction=0.25, sigma=0.05, base_scale=1.0 if offset else 0.0, seed=k + p)
    m = inst.estimates
    ours = solve_p1(m, lam, tau, offset=offset, tol=1e-11)
    obj, low, sparse = _cvxpy_solve(m.numpy(), lam, tau, offset)
    assert ours.converged
    # The parameters are chosen so both parts are nontrivial, or the comparison proves little.
    assert 0 < int((torch.linalg.vector_norm(ours.sparse, dim=(1, 2)) > 1e-6).sum()) < k and ours.rank >= 1
    assert abs(ours.objective - obj) / abs(obj) < 1e-6
    assert _rel(ours.low_rank.numpy(), low) < 1e-4
    assert _rel(ours.sparse.numpy(), sparse) < 1e-4


@pytest.mark.parametrize("offset", [False, True])
def test_p0_matches_cvxpy(offset: bool) -> None:
    inst = make_instance(12, 10, 3, 2, fraction=0.25, base_scale=1.0 if offset else 0.0, seed=3)
    m = inst.estimates
    ours = solve_p0(m, 0.5, offset=offset, tol=1e-11)
    obj, low, _ = _cvxpy_solve(m.numpy(), 0.5, None, offset)
    assert abs(ours.objective - obj) / abs(obj) < 1e-6
    assert _rel(ours.low_rank.numpy(), low) < 1e-4
    # Feasibility of the equality constraint.
    c = ours.offset if offset else torch.zeros_like(m[0])
    assert float((m - c - ours.low_rank - ours.sparse).abs().max()) < 1e-7
