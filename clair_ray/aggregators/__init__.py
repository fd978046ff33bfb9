"""Aggregation methods behind one interface (:class:`Aggregator`) and one registry: CLAIR and the baselines.

Each method is one class registered where it is defined (:func:`register_aggregator`); a user's own
method is registered the same way in their own module, loaded through the ``plugins`` config key.
Use :func:`get_aggregator`::

    agg = get_aggregator("multi_krum")
    out = agg.aggregate(updates, AggContext(n_attackers=15))   # updates: (K, p, q)
    out.per_client, out.flagged, out.reasons
"""

from __future__ import annotations

from clair_ray.aggregators.base import (
    AGGREGATORS,
    AggContext,
    AggOutput,
    Aggregator,
    available_aggregators,
    get_aggregator,
    register_aggregator,
)
from clair_ray.aggregators.baselines import (
    FedAvg,
    GeometricMedian,
    Local,
    Median,
    MultiKrum,
    Oracle,
    TrimmedMean,
)

# The built-in methods register themselves on import (this order is the registry's order).
from clair_ray.aggregators.clair_agg import Clair  # noqa: I001

__all__ = [
    "AGGREGATORS",
    "AggContext",
    "AggOutput",
    "Aggregator",
    "Clair",
    "FedAvg",
    "GeometricMedian",
    "Local",
    "Median",
    "MultiKrum",
    "Oracle",
    "TrimmedMean",
    "available_aggregators",
    "get_aggregator",
    "register_aggregator",
]
