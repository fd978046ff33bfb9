"""CLAIR's refinement chosen by the clients' held-back loss (``aggregation.refine: heldout``), pure compute.

The spectral rule (``refine: auto``) cannot tell a LoRA client's personal signal from its estimation
noise: every client starts from the same A and follows the same base gradients, so the noise of the
clients' deviations is aligned and looks shared (README "Choosing the refinement"). A reference outside
the updates can: each client holds back a share of its local rows (``workload.lora.holdout``), and the
refinement is chosen among a small grid of candidates by the loss on those rows.

A candidate keeps, of each detected-honest client's centred deviation Δ_k − m, its projection on the
``rank`` leading directions per projected side (``None``: the whole deviation) scaled by ``shrink``:

    m + shrink · P_U (Δ_k − m) P_V

so (0, any) is the detected-honest mean, (None, 1) the client's own update (local training), and the
shrunk ones sit between, the bias-variance trade-off of a noisy personal estimate (James-Stein). The grid
is fixed (:func:`candidates`), one choice per run for every module and client: each detected-honest client
reports every candidate's mean token loss on its held-back rows, and the candidate with the smallest
median over those clients of (its loss − the mean's loss) wins if that median gain is clearly below zero
(more than :data:`MARGIN` standard errors), else the mean does. Paired differences cancel how hard a
client's rows are; the median keeps a minority of undetected attackers (who hold back corrupted rows, or
lie) from deciding; the margin keeps chance from choosing a personal candidate where the clients are
alike. No labels of test data, no test
rows and no knowledge of who is honest enter the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "HELDOUT",
    "MARGIN",
    "RANKS",
    "SHRINKS",
    "TOP_RANK",
    "Candidate",
    "candidates",
    "choose",
    "summary",
    "truncate",
]

#: ``aggregation.refine`` value of this rule.
HELDOUT = "heldout"
#: Directions per projected side a candidate keeps (None: the whole deviation, no projection).
RANKS: tuple[int | None, ...] = (1, 2, 4, None)
#: Shares of the (projected) deviation a candidate keeps.
SHRINKS = (0.25, 0.5, 0.75, 1.0)
#: Standard errors by which the best candidate must beat the mean (:func:`choose`).
MARGIN = 2.0
#: The most directions any projecting candidate keeps: the bases are computed once with this many.
TOP_RANK = max(j for j in RANKS if j is not None)


@dataclass(frozen=True)
class Candidate:
    """One refinement: ``shrink`` times the deviation projected on ``rank`` directions per side.

    Attributes:
        rank: Leading directions kept per projected side (0: none, the mean; None: every direction).
        shrink: Share of the projected deviation kept, in [0, 1].
    """

    rank: int | None
    shrink: float


def candidates() -> list[Candidate]:
    """The grid, least personal first: the detected-honest mean, then every (rank, shrink)."""
    return [Candidate(0, 0.0)] + [Candidate(j, a) for j in RANKS for a in SHRINKS]


Bases = dict[str, tuple[np.ndarray | None, np.ndarray | None]]


def truncate(bases: Bases, cand: Candidate) -> Bases:
    """Module -> (U, V) of ``cand``: the leading ``cand.rank`` columns of each projected side's basis,
    (None, None) for every module when the candidate keeps the whole deviation.

    Args:
        bases: Module -> (U (out, j) or None, V (in, j) or None), computed with :data:`TOP_RANK` directions
            (None: that side is not projected).
        cand: The candidate.
    """
    if cand.rank is None:
        return dict.fromkeys(bases, (None, None))
    j = cand.rank
    return {n: tuple(None if b is None else b[:, :j] for b in uv) for n, uv in bases.items()}  # type: ignore[misc]


def choose(losses: np.ndarray, margin: float = MARGIN) -> int:
    """The winning candidate of held-back losses.

    Args:
        losses: (C, H) candidate c's mean held-back token loss for client h (row 0: the mean, the
            reference of the paired differences); NaN where a client has none.
        margin: Standard errors by which the best candidate's median gain must lie below zero.

    Returns:
        The candidate with the smallest median over clients of ``losses[c] - losses[0]`` (the first of
        equals) when that median lies more than ``margin`` standard errors below zero (the standard
        error of a median, 1.2533 x 1.4826 MAD / sqrt(H)); otherwise 0, the mean. The best of 16 noisy
        candidates looks better than the mean by chance: without the margin, on clients whose tasks
        are alike (where the mean is right) the rule picked a personal candidate in 6 of 12 problems and
        lost up to 10% to the honest mean (README "the regime grids").

    Raises:
        ValueError: When no client has a finite loss under every candidate.
    """
    ok = np.isfinite(losses).all(axis=0)  # (H,)
    if not ok.any():
        raise ValueError("refine='heldout': no detected-honest client has a finite held-back loss")
    gains = losses[:, ok] - losses[0, ok]  # (C, H')
    med = np.median(gains, axis=1)  # (C,)
    best = int(np.argmin(med))
    mad = float(np.median(np.abs(gains[best] - med[best])))
    se = 1.2533 * 1.4826 * mad / np.sqrt(gains.shape[1])
    return best if med[best] < -margin * se else 0


def summary(bases: Bases, cand: Candidate, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Module -> side -> {rank, shrink}: what the chosen candidate keeps (a side kept whole counts its
    full dimension), in the shape the other rules record (``refine_scalars``).

    Args:
        bases: Module -> (U, V) as computed (before :func:`truncate`; None: a side never projected).
        cand: The chosen candidate.
        shapes: Module -> (out, in).
    """
    out: dict[str, Any] = {}
    for n, (u, v) in bases.items():
        out[n] = {}
        for side, b, dim in (("column", u, shapes[n][0]), ("row", v, shapes[n][1])):
            if b is None:
                continue  # a side the configured ``side`` never projects
            rank = dim if cand.rank is None else min(int(b.shape[1]), cand.rank)  # type: ignore[union-attr]
            out[n][side] = {"rank": rank if cand.shrink > 0 else 0, "shrink": cand.shrink}
    return out
