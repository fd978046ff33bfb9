"""Detection of contaminated clients from their residuals off the estimated subspace.

Score of client k: s_k = ||P_U⊥(M_k - c)||_F / nu_k, its energy outside the shared subspace in units
of its own noise scale. Flagged: s_k > max(median(s) + k_mad * 1.4826 * MAD(s), floor). The median and
MAD are over the finite clients, so a minority of contaminated clients moves neither (a
multiple of the median alone flagged nobody on the copy task). ``floor`` is the numerical floor for
noiseless data, where the honest residuals are rounding errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

MAD_TO_SIGMA = 1.4826  # MAD of a Gaussian times this is its standard deviation


@dataclass
class Detection:
    """Flagged clients, their scores and why.

    Attributes:
        contaminated: Sorted flagged client indices (non-finite ones included).
        scores: (K,) scores; +inf for non-finite clients.
        threshold: The score threshold used.
        reasons: Why each flagged client was flagged.
    """

    contaminated: list[int]
    scores: torch.Tensor
    threshold: float
    reasons: dict[int, str]


def flag_by_residual(
    scores: torch.Tensor,
    finite: list[int],
    nonfinite: list[int],
    mad_k: float,
    floor: float,
    sparse_norms: torch.Tensor | None = None,
) -> Detection:
    """Flags clients whose residual score is an outlier.

    Args:
        scores: (K,) residual scores (only entries of ``finite`` are read).
        finite: Indices of finite clients.
        nonfinite: Indices of clients whose update had NaN/Inf (flagged with reason "non-finite").
        mad_k: Number of robust standard deviations above the median.
        floor: Lowest threshold (numerical noise level).
        sparse_norms: Optional (K,) ||S_k||_F from the decomposition, quoted in the reasons.

    Returns:
        The detection.
    """
    full = scores.clone()
    full[nonfinite] = float("inf")
    s = scores[finite]
    med = float(s.median())
    mad = float((s - med).abs().median())
    threshold = max(med + mad_k * MAD_TO_SIGMA * mad, floor)
    reasons: dict[int, str] = {k: "non-finite: the update has NaN or Inf entries" for k in nonfinite}
    for k in finite:
        if float(scores[k]) > threshold:
            extra = "" if sparse_norms is None else f", ||S_k||_F = {float(sparse_norms[k]):.4g}"
            reasons[k] = (
                f"residual: energy outside the shared subspace {float(scores[k]):.4g} > threshold "
                f"{threshold:.4g} (median {med:.4g} + {mad_k:g} x 1.4826 x MAD {mad:.4g}, "
                f"floor {floor:.3g}){extra}"
            )
    return Detection(sorted(reasons), full, threshold, reasons)


def null_survival(t: float, m: int) -> float:
    """P(T > t) for T = sum over m modules of max(z, 0)^2 with z iid N(0, 1).

    Each module adds a chi-square with one degree of freedom with probability 1/2 (z > 0) and nothing
    otherwise, so T is chi-square with Binomial(m, 1/2) degrees of freedom.
    """
    if t <= 0:
        return 1.0
    x = torch.tensor(t / 2.0, dtype=torch.float64)
    total = 0.0
    for j in range(1, m + 1):
        upper = float(torch.special.gammaincc(torch.tensor(j / 2.0, dtype=torch.float64), x))
        total += math.comb(m, j) * upper
    return total / 2.0**m


def null_threshold(level: float, m: int) -> float:
    """The t with :func:`null_survival` (t, m) = level (bisection; the survival falls with t)."""
    lo, hi = 0.0, 1.0
    while null_survival(hi, m) > level:
        hi *= 2.0
    for _ in range(100):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if null_survival(mid, m) > level else (lo, mid)
    return hi


def combine_modules(results: Mapping[str, Any], mad_k: float = 4.0) -> Detection:
    """Combines per-module CLAIR results (one per LoRA module) into one verdict per client.

    In each module m a client's score is standardised against that module's honest majority,
    z_m = (s_m - median) / sigma_m with sigma_m = (threshold_m - median) / mad_k (the robust standard
    deviation 1.4826 MAD, or the numerical floor's share when the scores are rounding errors), so a
    client sitting exactly at a module's own threshold has z_m = mad_k. The evidence is
    T = sum_m max(z_m, 0)^2, which a client cannot hide from by spreading its damage thinly (many modules
    a little above the median add up) nor by concentrating it (one large z_m dominates the sum), where the
    mean of score / threshold diluted a single-module outlier by the number of modules. Under the null
    (z_m iid standard normal) T is chi-square with Binomial(M, 1/2) degrees of freedom
    (:func:`null_survival`); a client is flagged when P(T_null > T) is below the one-module rule's level
    P(z > mad_k), so with one module this is exactly that module's rule. A client non-finite in any
    module is flagged with that reason.

    Args:
        results: Module name -> ``ClairResult`` over the same K clients.
        mad_k: The per-module threshold's number of robust standard deviations (CLAIR's ``mad_k``).

    Returns:
        A :class:`Detection` with T as the scores and the T threshold.
    """
    if not results:
        raise ValueError("results: empty; pass one ClairResult per module")
    names = list(results)
    z_rows = []
    for n in names:
        scores = results[n].scores.double()  # (K,), +inf where non-finite
        ok = torch.isfinite(scores)
        med = float(scores[ok].median()) if bool(ok.any()) else 0.0
        sigma = max(float(results[n].info["threshold"]) - med, 1e-300) / mad_k
        z_rows.append((scores - med) / sigma)
    z = torch.stack(z_rows)  # (M, K)
    evidence = z.clamp_min(0.0).pow(2).sum(dim=0)  # (K,); +inf where any module saw a non-finite update
    level = 0.5 * math.erfc(mad_k / math.sqrt(2.0))  # P(z > mad_k) for a standard normal z
    threshold = null_threshold(level, len(names))
    reasons: dict[int, str] = {}
    for k in range(evidence.shape[0]):
        bad = [n for n in names if k in results[n].reasons and results[n].reasons[k].startswith("non-finite")]
        if bad:
            reasons[k] = f"non-finite in module(s) {', '.join(bad)}"
        elif float(evidence[k]) > threshold:
            top = int(z[:, k].argmax())
            reasons[k] = (
                f"residual: sum over {len(names)} modules of squared standardised scores "
                f"{float(evidence[k]):.3g} > {threshold:.3g} (null level {level:.2g}; largest in "
                f"{names[top]}: z = {float(z[top, k]):.3g})"
            )
    return Detection(sorted(reasons), evidence, threshold, reasons)
