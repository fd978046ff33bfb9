"""Shared input checks and non-finite handling for every aggregator."""

from __future__ import annotations

import torch

from clair_ray.aggregators.base import AggContext, AggOutput

NON_FINITE = "non-finite"

_FLOAT_DTYPES = (torch.float32, torch.float64)


def check_updates(updates: object) -> torch.Tensor:
    """Checks a round's stacked updates before any work starts.

    Args:
        updates: Should be a (K, p, q) float32/float64 tensor with K >= 1.

    Returns:
        ``updates`` unchanged.

    Raises:
        ValueError: Naming ``updates`` and what is wrong with it.
    """
    if not isinstance(updates, torch.Tensor):
        raise ValueError(f"updates must be a (K, p, q) torch.Tensor, got {type(updates).__name__}")
    if updates.ndim != 3:
        raise ValueError(f"updates must have shape (K, p, q), got shape {tuple(updates.shape)}")
    if updates.shape[0] < 1:
        raise ValueError(f"updates must hold at least one client, got shape {tuple(updates.shape)}")
    if updates.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"updates must be float32 or float64, got dtype {updates.dtype}")
    return updates


def check_n_attackers(ctx: AggContext) -> int:
    """Returns ``ctx.n_attackers`` if it is a non-negative integer, else raises ValueError naming it."""
    f = ctx.n_attackers
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"ctx.n_attackers must be an integer >= 0, got {f!r}")
    return f


def checked_inputs(updates: object, ctx: AggContext) -> tuple[int, torch.Tensor, int]:
    """The preamble of methods that assume a number of attackers: validate, then find finite clients.

    Returns:
        (f = ``ctx.n_attackers``, (K,) finite mask, number of finite clients).
    """
    check_updates(updates)
    f = check_n_attackers(ctx)
    mask = finite_mask(updates)  # type: ignore[arg-type]
    return f, mask, int(mask.sum())


def finite_mask(updates: torch.Tensor) -> torch.Tensor:
    """(K,) bool: True where a client's whole update is finite."""
    return torch.isfinite(updates).flatten(1).all(dim=1)  # (K,)


def non_finite_clients(mask: torch.Tensor) -> list[int]:
    """Sorted ids of the clients whose update is not finite, given :func:`finite_mask`."""
    return [int(i) for i in torch.nonzero(~mask).flatten().tolist()]


def global_output(
    updates: torch.Tensor,
    mask: torch.Tensor,
    aggregate: torch.Tensor | None,
    flagged: dict[int, str] | None = None,
    scores: torch.Tensor | None = None,
) -> AggOutput:
    """Builds the output of a global method: every finite client gets the same aggregate.

    Args:
        updates: (K, p, q) the inputs.
        mask: (K,) finite clients (:func:`finite_mask`).
        aggregate: (p, q) the aggregate, or None when no client was finite (then every client keeps its
            input, so nothing is lost and nothing NaN spreads).
        flagged: Extra flagged clients and their reasons (besides the non-finite ones).
        scores: (K,) optional detection scores.

    Returns:
        The output; non-finite clients are flagged "non-finite" and keep their input unchanged.
    """
    per_client = updates.clone()  # (K, p, q)
    if aggregate is not None:
        per_client[mask] = aggregate.to(updates.dtype)
    reasons = {i: NON_FINITE for i in non_finite_clients(mask)}
    reasons.update(flagged or {})
    reasons = dict(sorted(reasons.items()))
    return AggOutput(per_client=per_client, flagged=list(reasons), reasons=reasons, scores=scores)
