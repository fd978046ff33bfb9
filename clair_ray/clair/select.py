"""Parameter choices that need no hand tuning: robust first fit, noise level, rank, lambda path.

The rule (documented in README "How CLAIR picks its parameters"):

1. A robust first fit (least-trimmed-squares for subspaces): a rank-r basis from the half of the clients
   with the smallest residuals, iterated to a fixed point, started from the unit-normalised blocks so
   that a few large blocks cannot steer the start. It never looks at the contamination fraction.
2. Noise level from that fit: honest residuals satisfy ||P_U⊥ E_k||_F^2 ~ nu_k^2 sigma^2 (p - r) q, so
   sigma_hat = median_k residual_k / (nu_k sqrt((p - r) q)), a median over clients and hence robust to
   any minority of contaminated ones.
3. tau: 0 (problem P0) when sigma_hat is at the numerical floor; otherwise
   tau = sigma_hat (nu_max sqrt(p) + sqrt(q sum_k nu_k^2)), the bound on ||[E_1 ... E_K]||_op, so noise
   does not reach L.
4. lambda: lambda_k = ell * tau * nu_k (ell alone in P0) with ell the largest value on a bisection
   path whose L has rank r (0.85 x that in P0, off its degenerate boundary). Larger ell lets
   contaminated blocks leak into L (rank > r); smaller ell starts to move honest blocks into S. As
   sigma_hat -> 0, P1 with lambda = ell * tau tends to P0 with lambda = ell, so the two regimes join
   continuously.
5. Rank (when not given): the r with the largest drop of the robust fit's median residual, r-1 -> r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clair_ray.clair.admm import Decomposition, Path
from clair_ray.clair.ops import block_norms, project_out, stack, top_left_singular_vectors


@dataclass
class RobustFit:
    """Result of the trimmed first fit.

    Attributes:
        basis: (p, r) orthonormal basis.
        centre: (p, w) centre (zeros without offset).
        scores: (K,) residual norms off ``basis``, divided by the clients' noise scales.
        kept: Indices of the clients in the final trimmed set.
    """

    basis: torch.Tensor
    centre: torch.Tensor
    scores: torch.Tensor
    kept: list[int]


def numerical_floor(blocks: torch.Tensor) -> float:
    """Residual level below which a block counts as exactly in the subspace.

    10 sqrt(eps) of the median block norm: 1.5e-7 relative in float64, 3.5e-3 in float32.
    """
    eps = torch.finfo(blocks.dtype).eps
    return 10.0 * math.sqrt(eps) * float(block_norms(blocks).median())


def robust_fit(
    blocks: torch.Tensor, rank: int, offset: bool, nu: torch.Tensor, max_iter: int = 20
) -> RobustFit:
    """Least-trimmed-squares subspace fit on (K, p, w) blocks (all finite).

    Args:
        blocks: (K, p, w) blocks.
        rank: Subspace rank r.
        offset: Whether to fit a common centre too.
        nu: (K,) relative noise scales (ones when unknown).
        max_iter: Iteration cap (it usually stops in 3-5).

    Returns:
        The fit.
    """
    k = blocks.shape[0]
    h = min(k, k // 2 + 1)  # a majority: the honest clients are assumed to be one
    centre = blocks.median(dim=0).values if offset else torch.zeros_like(blocks[0])
    x = blocks - centre  # (K, p, w)
    norms = block_norms(x).clamp_min(torch.finfo(blocks.dtype).tiny)
    basis = top_left_singular_vectors(stack(x / norms[:, None, None]), rank)  # (p, r)
    kept: list[int] = []
    scores = torch.zeros(k, dtype=blocks.dtype)
    for _ in range(max_iter):
        scores = block_norms(project_out(basis, x)) / nu  # (K,)
        new_kept = sorted(torch.argsort(scores)[:h].tolist())
        if new_kept == kept:
            break
        kept = new_kept
        if offset:
            centre = blocks[kept].mean(dim=0)
            x = blocks - centre
        basis = top_left_singular_vectors(stack(x[kept]), rank)
    scores = block_norms(project_out(basis, x)) / nu
    return RobustFit(basis, centre, scores, kept)


def estimate_noise(fit: RobustFit, p: int, q: int, rank: int) -> float:
    """sigma_hat from the median normalised residual of the robust fit (see module docstring)."""
    dof = max((p - rank) * q, 1)
    return float(fit.scores.median()) / math.sqrt(dof)


def choose_rank(blocks: torch.Tensor, offset: bool, nu: torch.Tensor, max_rank: int) -> int:
    """Rank with the largest drop of the robust fit's median residual (step 5 of the rule)."""
    floor = numerical_floor(blocks)
    centre = blocks.median(dim=0).values if offset else torch.zeros_like(blocks[0])
    prev = float((block_norms(blocks - centre) / nu).median())
    best_r, best_ratio = 1, -1.0
    for r in range(1, max_rank + 1):
        med = float(robust_fit(blocks, r, offset, nu).scores.median())
        ratio = max(prev, floor) / max(med, floor)
        if ratio > best_ratio * (1.0 + 1e-9):
            best_r, best_ratio = r, ratio
        if med <= floor:
            break  # exact fit: higher ranks cannot drop further
        prev = med
    return best_r


def noise_tau(sigma: float, p: int, q: int, nu: torch.Tensor) -> float:
    """Bound on the operator norm of the noise stack (step 3 of the rule)."""
    return sigma * (float(nu.max()) * math.sqrt(p) + math.sqrt(q * float(nu.pow(2).sum())))


BACKOFF = 0.85


def lambda_path(
    blocks: torch.Tensor,
    rank: int,
    offset: bool,
    nu: torch.Tensor,
    tau: float,
    steps: int = 12,
    coarse_tol: float = 1e-6,
) -> tuple[Decomposition, float]:
    """Largest lambda (in units of tau, or absolute in P0) whose L has rank <= r, by bisection.

    Args:
        blocks: (K, p, w) blocks, float64.
        rank: Target rank r.
        offset: Whether c is free.
        nu: (K,) relative noise scales; lambda_k = ell * tau * nu_k (ell * nu_k in P0).
        tau: Nuclear-norm weight; 0 selects P0.
        steps: Bisection steps in log(ell).
        coarse_tol: ADMM tolerance while bisecting (the rank of the iterate settles early).

    Returns:
        The decomposition at the chosen ell (solved to full accuracy) and ell.
    """
    width = min(blocks.shape[1], blocks.shape[2])
    # At ell >= sqrt(width) + 1 no block can be cheaper in S than in L (||X||_* <= sqrt(rank) ||X||_F),
    # so S = 0; at ell = 1e-3 almost everything is in S.
    lo, hi = math.log(1e-3), math.log(math.sqrt(width) + 1.0)
    path = Path(blocks, tau, offset=offset)
    unit = tau if tau > 0 else 1.0

    def solve(ell: float, tol: float) -> Decomposition:
        return path.solve(ell * unit * nu, tol=tol)

    top = solve(math.exp(hi), coarse_tol)
    if top.rank <= rank:
        ell = math.exp(hi)
        return solve(ell, 1e-9), ell
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if solve(math.exp(mid), coarse_tol).rank <= rank:
            lo = mid
        else:
            hi = mid
    # P0: step back from the rank transition. At the boundary itself P0 is degenerate and ADMM crawls
    # (5000 iterations without converging on a centred factor instance); 0.85 x stays inside the
    # exact-recovery interval, which spanned a factor of 1.5 or more on every instance tried. In P1 the
    # boundary is not degenerate, and stepping back would push honest blocks' noise into S.
    ell = (BACKOFF if tau == 0.0 else 1.0) * math.exp(lo)
    return solve(ell, 1e-9), ell
