"""The one interface every aggregation method implements (CLAIR and the baselines).

An aggregator sees the K clients' updates of one round, stacked as a dense (K, p, q) tensor (for the
linear workload) and returns, for every client, the update that client continues from (multi-round) or is
evaluated with (one-shot), plus who it flagged and why. Aggregators are pure functions of their inputs:
no Ray, no global state, so they are unit-testable and run unchanged inside the aggregator actor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class AggContext:
    """What an aggregator may know besides the updates.

    Attributes:
        rank: Rank r of CLAIR's detection subspace; None lets CLAIR choose it.
        refine: How much of each honest client's centred deviation CLAIR and the oracle keep
            (``"auto"`` or a rank; ``clair_ray.clair``'s ``refine``).
        n_attackers: Number of contaminated clients assumed by baselines that need it (trimmed mean,
            multi-Krum). Comes from config, never from the ground truth; CLAIR ignores it.
        offset: Whether the updates share an unknown common offset (CLAIR's ``offset``).
        noise_scale: Optional (K,) relative noise level of each client's estimate (e.g. 1/sqrt(n_k)).
        seed: Seed for any randomness inside the method (randomized SVD).
        honest: Oracle only: the true honest client indices.
        true_subspace: Oracle only: (p, r) orthonormal basis of the true shared subspace.
        params: Method-specific parameters from config (e.g. CLAIR's ``mad_k``, ``solver``).
    """

    rank: int | None = None
    refine: int | str = "auto"
    n_attackers: int = 0
    offset: bool = False
    noise_scale: torch.Tensor | None = None
    seed: int = 0
    honest: list[int] | None = None
    true_subspace: torch.Tensor | None = None
    params: dict = field(default_factory=dict)


@dataclass
class AggOutput:
    """Result of one aggregation.

    Attributes:
        per_client: (K, p, q) the update each client continues from / is evaluated with.
        flagged: Sorted client indices the method excluded as contaminated.
        reasons: Why each flagged client was flagged.
        subspace: (p, r) estimated shared subspace, where the method estimates one.
        scores: (K,) detection scores, where the method computes them.
        info: Method-specific record (CLAIR and the oracle: ``refine``, side -> chosen refinement).
    """

    per_client: torch.Tensor
    flagged: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)
    subspace: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


class Aggregator(Protocol):
    """An aggregation method: ``name`` plus ``aggregate(updates, ctx)``."""

    name: str

    def aggregate(self, updates: torch.Tensor, ctx: AggContext) -> AggOutput:
        """Aggregates a round's updates.

        Args:
            updates: (K, p, q) client updates (non-finite entries possible).
            ctx: What the method may know besides the updates.

        Returns:
            The per-client results.
        """
        ...


#: Name -> aggregator class, in registration order (the only list of method names; config reads it).
AGGREGATORS: dict[str, type] = {}


def register_aggregator(name: str, *, personalized: bool = False) -> Callable[[type], type]:
    """Registers an aggregator class under ``name``; used as a class decorator where the class is defined.

    A user's own method is one decorated class in their own module, loaded through ``plugins``::

        @register_aggregator("norm_clipped_mean")
        class NormClippedMean:
            def aggregate(self, updates, ctx):  # (K, p, q) -> AggOutput
                ...

    Args:
        name: The name used in ``aggregation.methods`` and ``aggregation.params``.
        personalized: Whether clients get different results (``local``, ``oracle``, ``clair``); a global
            method gives every kept client the same aggregate, which is what LoRA workloads can run
            for any registered method (one shared correction per module).

    Returns:
        The decorator; it sets ``cls.name`` and ``cls.personalized`` and returns the class.

    Raises:
        ValueError: ``name`` is taken by another class.
    """

    def deco(cls: type) -> type:
        old = AGGREGATORS.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"register_aggregator: {name!r} is registered already ({old.__qualname__})")
        cls.name = name  # type: ignore[attr-defined]
        cls.personalized = personalized  # type: ignore[attr-defined]
        AGGREGATORS[name] = cls
        return cls

    return deco


def available_aggregators() -> tuple[str, ...]:
    """The registered aggregator names, in registry order."""
    return tuple(AGGREGATORS)


def get_aggregator(name: str, **params: Any) -> Aggregator:
    """Builds an aggregator by name.

    Args:
        name: A registered name (:func:`available_aggregators`).
        **params: The method's constructor parameters (``aggregation.params.<name>``).

    Returns:
        The aggregator.

    Raises:
        ValueError: On an unknown name (the message lists the valid names) or parameters the method does
            not take.
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; valid names: {', '.join(AGGREGATORS)}")
    try:
        return AGGREGATORS[name](**params)
    except TypeError as exc:  # an unexpected keyword: say which method and which parameters
        raise ValueError(f"bad parameters {sorted(params)} for aggregator {name!r}: {exc}") from exc
