"""CLAIR behind the aggregator interface: a thin wrapper around the public :func:`clair_ray.clair`."""

from __future__ import annotations

from typing import Any

import torch

from clair_ray.aggregators._common import NON_FINITE, check_updates, finite_mask, non_finite_clients
from clair_ray.aggregators.base import AggContext, AggOutput

__all__ = ["Clair"]


class Clair:
    """CLAIR (DESIGN.md section 1): shared subspace, contaminated set, and refined honest updates.

    Calls ``clair_ray.clair(list_of_updates, rank=ctx.rank, offset=ctx.offset, seed=ctx.seed,
    noise_scale=ctx.noise_scale, **params)`` where ``params`` are the constructor's parameters overridden
    by ``ctx.params`` (e.g. ``solver``, ``lam``, ``tau``, ``mad_k``).

    CLAIR never sees ``ctx.n_attackers``: the number of contaminated clients is something it *finds*, and
    feeding it the configured fraction would make its output depend on a baseline's knob.

    Non-finite client updates are removed before the call (so none can reach an SVD, whatever the core
    does with them), flagged "non-finite" and kept unchanged; the remaining clients' results are mapped
    back to their original ids. Flagged clients keep their input, honest ones get CLAIR's refinement.

    Args:
        **params: Default keyword arguments for ``clair_ray.clair`` (``ctx.params`` wins on conflicts).
    """

    name = "clair"

    def __init__(self, **params: Any) -> None:
        reserved = sorted({"rank", "offset", "seed", "noise_scale"} & set(params))
        if reserved:
            raise ValueError(f"clair parameters {reserved} come from AggContext, not from params")
        self.params = dict(params)

    def aggregate(self, updates: torch.Tensor, ctx: AggContext) -> AggOutput:
        """Runs CLAIR on the finite updates and maps the result back to all K clients."""
        import clair_ray  # late: the package's __init__ imports the CLAIR core, which must not import us

        check_updates(updates)
        k = updates.shape[0]
        params = {**self.params, **(ctx.params or {})}
        reserved = sorted({"rank", "offset", "seed", "noise_scale"} & set(params))
        if reserved:
            raise ValueError(f"ctx.params must not set {reserved}: they are AggContext fields")

        mask = finite_mask(updates)  # (K,)
        idx = [int(i) for i in torch.nonzero(mask).flatten().tolist()]  # original ids of the finite clients
        reasons: dict[int, str] = {i: NON_FINITE for i in non_finite_clients(mask)}
        per_client = updates.clone()  # (K, p, q)
        scores = torch.full((k,), float("nan"), dtype=torch.float64, device=updates.device)
        if not idx:
            return AggOutput(per_client=per_client, flagged=list(reasons), reasons=reasons, scores=scores)

        noise_scale = ctx.noise_scale
        if noise_scale is not None:
            noise_scale = torch.as_tensor(noise_scale).flatten()
            if noise_scale.shape[0] != k:
                raise ValueError(
                    f"ctx.noise_scale must have K={k} entries, got shape {tuple(noise_scale.shape)}"
                )
            noise_scale = noise_scale[mask.to(noise_scale.device)]

        clair_fn = getattr(clair_ray, "clair", None)
        if not callable(clair_fn):  # the package re-exports clair(); fall back to its home if it does not yet
            from clair_ray.clair.api import clair as clair_fn
        res = clair_fn(
            [updates[i] for i in idx],
            rank=ctx.rank,
            offset=ctx.offset,
            seed=ctx.seed,
            noise_scale=noise_scale,
            **params,
        )

        # Map the finite-subset results back to original client ids.
        sub_reasons = dict(res.reasons or {})
        for j in res.contaminated:
            reasons[idx[j]] = sub_reasons.get(j, "clair")
        for j, refined in enumerate(res.refined):
            per_client[idx[j]] = refined.to(device=updates.device, dtype=updates.dtype)
        for j in res.contaminated:
            # The contract says flagged clients keep their input; enforce it rather than trust it.
            per_client[idx[j]] = updates[idx[j]]
        if res.scores is not None:
            scores[idx] = torch.as_tensor(res.scores).to(device=updates.device, dtype=torch.float64).flatten()
        subspace = (
            res.subspace.to(device=updates.device, dtype=updates.dtype) if res.subspace is not None else None
        )
        reasons = dict(sorted(reasons.items()))
        return AggOutput(
            per_client=per_client, flagged=list(reasons), reasons=reasons, subspace=subspace, scores=scores
        )
