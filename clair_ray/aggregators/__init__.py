"""Aggregation methods behind one interface (:class:`Aggregator`): CLAIR and the baselines.

Use :func:`get_aggregator`::

    agg = get_aggregator("multi_krum")
    out = agg.aggregate(updates, AggContext(n_attackers=15))   # updates: (K, p, q)
    out.per_client, out.flagged, out.reasons
"""

from __future__ import annotations

from typing import Any

from clair_ray.aggregators.base import AggContext, AggOutput, Aggregator
from clair_ray.aggregators.baselines import (
    FedAvg,
    GeometricMedian,
    Local,
    Median,
    MultiKrum,
    Oracle,
    TrimmedMean,
)
from clair_ray.aggregators.clair_agg import Clair

__all__ = ["AGGREGATORS", "AggContext", "AggOutput", "Aggregator", "available_aggregators", "get_aggregator"]

#: Name → aggregator class; ``get_aggregator(name, **params)`` instantiates it.
AGGREGATORS: dict[str, type] = {
    cls.name: cls for cls in (Clair, FedAvg, Local, Oracle, Median, TrimmedMean, MultiKrum, GeometricMedian)
}


def available_aggregators() -> tuple[str, ...]:
    """The registered aggregator names, in registry order."""
    return tuple(AGGREGATORS)


def get_aggregator(name: str, **params: Any) -> Aggregator:
    """Builds an aggregator by name.

    Args:
        name: One of :func:`available_aggregators` (clair, fedavg, local, oracle, median, trimmed_mean,
            multi_krum, geometric_median).
        **params: The method's constructor parameters (e.g. ``max_iter`` for geometric_median, CLAIR's
            default ``solver`` / ``mad_k``).

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
