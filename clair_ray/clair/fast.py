"""The fast path: rank-r low-rank + block-sparse alternation with randomized SVD, for large K.

This is NOT problem P1 (its iterates are truncated at rank r, like AltProj of Netrapalli et al. 2014
with block thresholding): it is judged by giving the same flagged set as the exact solver and a subspace
within 1e-3 of it (tests/clair/test_factored.py). It works on the compact p x r' blocks of factor
inputs, never on the dense p x Kq stack, and in the input's dtype.

The blocks are held as one stacked matrix X = [x_1 ... x_K] (p x K w), so every product is one GEMM.
One iteration, with U the current basis:
    scores s_k = ||P_U⊥ x_k||_F / nu_k, from ||x_k||^2 - ||U^T x_k||^2 accumulated in float64;
    threshold t from their median and MAD (detect.py); flagged = s_k > t;
    S_k = P_U⊥ x_k for flagged blocks (hard thresholding, as in AltProj), else 0;
    U <- one step of subspace iteration on Y = X - S (two on the first iteration), applying Y Y^T
         without forming Y: Y_k = x_k for kept blocks and U U^T x_k for flagged ones;
    c <- mean of the unflagged blocks (offset only).
The start is a randomized range finder (Halko et al. 2011) on the unit-normalised blocks, so that a few
large blocks cannot take over the first basis.

Measured (benchmarks/bench_clair.py, K = 1000, p = q = 4096, r' = 16): the first version, on a (K, p, w)
layout with einsum, four full-size temporaries per iteration and a float32 stopping tolerance it could not
reach, ran at 40-56x the floor (one torch.svd_lowrank of X); this layout stops in 3 iterations, at
3.7-3.8x the floor since the scores' U^T X also serves the first subspace step (4.3x before), and at
2.6-2.7x since clair() compacts the pairs one by one straight into X's memory (ops.compact_pairs: no
stacked copies of the factors, no copy for the stacked view).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clair_ray.clair.detect import MAD_TO_SIGMA
from clair_ray.clair.ops import orthonormalize


@dataclass
class FastFit:
    """Result of the fast path.

    Attributes:
        basis: (p, r) orthonormal basis of the shared subspace.
        centre: (p, w) common offset (zeros without offset).
        scores: (K,) residual scores, float64.
        sparse_norms: (K,) ||S_k||_F, float64.
        iterations: Outer iterations used.
    """

    basis: torch.Tensor
    centre: torch.Tensor
    scores: torch.Tensor
    sparse_norms: torch.Tensor
    iterations: int


def _threshold(scores: torch.Tensor, mad_k: float, floor: float) -> float:
    med = scores.median()
    mad = (scores - med).abs().median()
    return max(float(med + mad_k * MAD_TO_SIGMA * mad), floor)


def _block_sq_norms(x: torch.Tensor, k: int) -> torch.Tensor:
    """||x_k||^2 of the K column blocks of a (p, K w) matrix, in float64: (K,)."""
    p, n = x.shape
    return torch.linalg.vector_norm(x.reshape(p, k, n // k), dim=(0, 2)).double() ** 2


def _scores(
    x: torch.Tensor, basis: torch.Tensor, sq: torch.Tensor, nu: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual scores and the coefficients U^T X (r, K w) they were computed from."""
    k = sq.shape[0]
    coeff = (x.T @ basis).T  # (r, K w): X^T U, the layout the subspace step's first product needs
    inside = (coeff.double() ** 2).reshape(coeff.shape[0], k, -1).sum(dim=(0, 2))  # (K,)
    # The difference of squares loses the residual below sqrt(eps) ||x_k|| in float32 arithmetic, but it is
    # accumulated in float64 here, far below the float32 threshold floor of 3.5e-3 ||x_k||.
    return (sq - inside).clamp_min(0.0).sqrt() / nu, coeff


def fast_fit(
    x: torch.Tensor,
    num_blocks: int,
    rank: int,
    *,
    offset: bool,
    nu: torch.Tensor,
    mad_k: float,
    floor: float,
    seed: int,
    max_iter: int = 10,
    tol: float = 1e-6,
) -> FastFit:
    """Runs the fast path on the stacked (p, K w) matrix of K finite blocks.

    Args:
        x: (p, K w) stacked blocks [x_1 ... x_K] (compact factor forms or dense blocks).
        num_blocks: K.
        rank: Subspace rank r.
        offset: Whether to fit a common centre (dense blocks only).
        nu: (K,) relative noise scales, float64.
        mad_k: Threshold in robust standard deviations above the median score.
        floor: Lowest threshold (numerical noise level).
        seed: Seed of the randomized range finder.
        max_iter: Outer iteration cap.
        tol: Stop when the flagged set is unchanged and the basis moved less than this (sin-Theta); raised
            to 100 eps of the dtype, which is where the basis stops moving in that precision.

    Returns:
        The fit.
    """
    p, n = x.shape
    k, w = num_blocks, n // num_blocks
    tol = max(tol, 100 * torch.finfo(x.dtype).eps)
    gen = torch.Generator().manual_seed(seed)
    raw = x
    if offset:
        centre = raw.reshape(p, k, w).median(dim=1).values  # (p, w)
        x = raw - centre.repeat(1, k)
    else:
        centre = torch.zeros(p, w, dtype=x.dtype)
    sq = _block_sq_norms(x, k)  # (K,)
    # Randomized range finder on the unit-normalised blocks: q = r + 10 columns, 2 power steps.
    inv_sq = (1.0 / sq.clamp_min(1e-300)).to(x.dtype).repeat_interleave(w)[:, None]  # (K w, 1)
    q = orthonormalize(x @ (inv_sq * (x.T @ torch.randn(p, rank + 10, generator=gen, dtype=x.dtype))))
    q = orthonormalize(x @ (inv_sq * (x.T @ q)))
    small = (q.T @ x) * inv_sq.sqrt().T  # (r + 10, K w), normalised blocks in the range basis
    basis = q @ torch.linalg.svd(small, full_matrices=False)[0][:, :rank]  # (p, r)
    del small
    prev: torch.Tensor | None = None
    flagged = torch.zeros(k, dtype=torch.bool)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (it is reported after the loop)
        scores, coeff = _scores(x, basis, sq, nu)
        flagged = scores > _threshold(scores, mad_k, floor)
        keep = (~flagged).to(x.dtype).repeat_interleave(w)[:, None]  # (K w, 1)
        drop = 1.0 - keep
        new = basis
        for step in range(2 if it == 1 else 1):
            # Y^T V with Y_k = x_k (kept) or U U^T x_k = U coeff_k (flagged), then Y (Y^T V). In the first
            # step V = U, where Y_k^T U = x_k^T U for every block: the scores' coefficients (a pass saved).
            if step == 0:
                yv = coeff.T  # (K w, r)
            else:
                yv = keep * (x.T @ new) + drop * (coeff.T @ (basis.T @ new))  # (K w, r)
            new = orthonormalize(x @ (keep * yv) + basis @ (coeff @ (drop * yv)))
        moved = 2.0**0.5 * float(torch.linalg.matrix_norm(new - basis @ (basis.T @ new)))
        basis = new
        if offset:
            centre = raw.reshape(p, k, w)[:, ~flagged].mean(dim=1)
            x = raw - centre.repeat(1, k)
            sq = _block_sq_norms(x, k)
        if prev is not None and torch.equal(flagged, prev) and moved < tol:
            break
        prev = flagged
    scores, _ = _scores(x, basis, sq, nu)
    sparse_norms = torch.where(flagged, scores * nu, torch.zeros_like(scores))
    return FastFit(basis, centre, scores, sparse_norms, it)
