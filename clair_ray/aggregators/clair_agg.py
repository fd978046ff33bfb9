"""CLAIR behind the aggregator interface: a thin wrapper around the public :func:`clair_ray.clair`."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from clair_ray.aggregators._common import check_updates
from clair_ray.aggregators.base import AggContext, AggOutput, register_aggregator
from clair_ray.clair.api import clair

__all__ = ["Clair"]

#: The keyword parameters ``aggregation.params.clair`` may set (the rest come from the context).
_CLAIR_PARAMS = frozenset(inspect.signature(clair).parameters) - {
    "updates",
    "rank",
    "refine",
    "offset",
    "seed",
    "noise_scale",
}


@register_aggregator("clair", personalized=True)
class Clair:
    """CLAIR: shared subspace, contaminated set, and refined honest updates.

    Calls ``clair_ray.clair(list_of_updates, rank=ctx.rank, offset=ctx.offset, seed=ctx.seed,
    noise_scale=ctx.noise_scale, **params)`` where ``params`` are the constructor's parameters overridden
    by ``ctx.params`` (e.g. ``solver``, ``lam``, ``tau``, ``mad_k``).

    CLAIR never sees ``ctx.n_attackers``: the number of contaminated clients is something it *finds*, and
    feeding it the configured fraction would make its output depend on a baseline's knob.

    Non-finite client updates are flagged "non-finite" by the core and kept out of every SVD. Flagged
    clients keep their input, honest ones get CLAIR's refinement.

    Args:
        **params: Default keyword arguments for ``clair_ray.clair`` (``ctx.params`` wins on conflicts).
    """

    def __init__(self, **params: Any) -> None:
        reserved = sorted({"rank", "offset", "seed", "noise_scale"} & set(params))
        if reserved:
            raise ValueError(f"clair parameters {reserved} come from AggContext, not from params")
        known = _CLAIR_PARAMS
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown clair parameter(s) {unknown}; allowed: {sorted(known)}")
        self.params = dict(params)

    def aggregate(self, updates: torch.Tensor, ctx: AggContext) -> AggOutput:
        """Runs CLAIR on the finite updates and maps the result back to all K clients."""

        check_updates(updates)
        params = {**self.params, **(ctx.params or {})}
        reserved = sorted({"rank", "offset", "seed", "noise_scale"} & set(params))
        if reserved:
            raise ValueError(f"ctx.params must not set {reserved}: they are AggContext fields")

        # clair() itself flags non-finite clients ("non-finite") and keeps them out of every SVD, and
        # returns the input unchanged for every flagged client.
        res = clair(
            list(updates.unbind(0)),
            rank=ctx.rank,
            refine=ctx.refine,
            offset=ctx.offset,
            seed=ctx.seed,
            noise_scale=ctx.noise_scale,
            **params,
        )
        per_client = torch.stack(res.refined).to(device=updates.device, dtype=updates.dtype)  # (K, p, q)
        subspace = res.subspace.to(device=updates.device, dtype=updates.dtype)
        reasons = dict(sorted(res.reasons.items()))
        return AggOutput(
            per_client=per_client,
            flagged=res.contaminated,
            reasons=reasons,
            subspace=subspace,
            scores=res.scores,
            info={"refine": getattr(res, "info", {}).get("refine", {})},
        )
