"""Metrics for subspace recovery, detection and refinement ."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def subspace_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """sin-Theta distance ||U_hat U_hat^T - U U^T||_F between two orthonormal bases (p, r) and (p, r')."""
    e, t = estimate.double(), truth.double()
    return float(torch.linalg.matrix_norm(e @ e.T - t @ t.T))


def detection_metrics(flagged: Iterable[int], truth: Iterable[int]) -> dict[str, float]:
    """Precision, recall and F1 of a flagged set against the true contaminated set.

    Conventions for empty sets: nothing flagged and nothing to find is perfect (1, 1, 1); nothing flagged
    with something to find has precision 1 and recall 0; flags with nothing to find have precision 0.
    """
    f, t = set(flagged), set(truth)
    tp = len(f & t)
    precision = tp / len(f) if f else 1.0
    recall = tp / len(t) if t else 1.0
    if not f and not t:
        precision = recall = 1.0
    elif not t:
        precision = 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": float(tp)}


def client_errors(estimates: Sequence[torch.Tensor], truth: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-client Frobenius errors ||W_tilde_k - W_k||_F: (K,) float64."""
    return torch.tensor(
        [float(torch.linalg.matrix_norm((e - t).double())) for e, t in zip(estimates, truth, strict=True)]
    )


def mean_error(errors: torch.Tensor, clients: Iterable[int]) -> float:
    """Mean of ``errors`` over ``clients`` (e.g. the honest ones)."""
    idx = list(clients)
    return float(errors[idx].mean()) if idx else float("nan")
