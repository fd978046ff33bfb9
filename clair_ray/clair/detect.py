"""Detection of contaminated clients from their residuals off the estimated subspace.

Score of client k: s_k = ||P_U⊥(M_k - c)||_F / nu_k, its energy outside the shared subspace in units
of its own noise scale. Flagged: s_k > max(median(s) + k_mad * 1.4826 * MAD(s), floor). The median and
MAD are over the finite clients, so a minority of contaminated clients moves neither (a
multiple of the median alone flagged nobody on the copy task). ``floor`` is the numerical floor for
noiseless data, where the honest residuals are rounding errors.
"""

from __future__ import annotations

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


def combine_modules(results: Mapping[str, Any]) -> Detection:
    """Combines per-module CLAIR results (one per LoRA module) into one verdict per client.

    A client's evidence is the mean over modules of its score divided by that module's threshold
    (so no single large module dominates); it is flagged when the mean
    exceeds 1, i.e. when it sits above the threshold on average. A client non-finite in any module is
    flagged with that reason.

    Args:
        results: Module name -> ``ClairResult`` over the same K clients.

    Returns:
        A :class:`Detection` with threshold 1 and the evidence as scores.
    """
    if not results:
        raise ValueError("results: empty; pass one ClairResult per module")
    names = list(results)
    ratios = torch.stack([results[n].scores.double() / float(results[n].info["threshold"]) for n in names])
    evidence = ratios.mean(dim=0)  # (K,); +inf where any module saw a non-finite update
    reasons: dict[int, str] = {}
    for k in range(evidence.shape[0]):
        bad = [n for n in names if k in results[n].reasons and results[n].reasons[k].startswith("non-finite")]
        if bad:
            reasons[k] = f"non-finite in module(s) {', '.join(bad)}"
        elif float(evidence[k]) > 1.0:
            top = names[int(ratios[:, k].argmax())]
            reasons[k] = (
                f"residual: mean score/threshold over {len(names)} modules {float(evidence[k]):.3g} > 1 "
                f"(largest in {top}: {float(ratios[:, k].max()):.3g})"
            )
    return Detection(sorted(reasons), evidence, 1.0, reasons)
