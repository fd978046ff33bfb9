"""An example clair_ray plugin: one aggregator, defined outside the package.

A plugin is any importable module; naming it under ``plugins:`` in a config makes the driver import it
before the config is validated and makes every client and aggregator actor import it too (the engine
hands the actors the directory this file sits in). Its registrations run on import::

    plugins: [clair_plugin_example]
    aggregation:
      methods: [fedavg, plugin_trimmed_mean]

``tests/test_contract.py`` runs it on the engine (this directory is not a Python package, so the module
is found as a top-level module once the directory is on ``sys.path``).
"""

from __future__ import annotations

import torch

from clair_ray.aggregators import AggContext, AggOutput, register_aggregator
from clair_ray.aggregators._common import check_updates, finite_mask, global_output

__all__ = ["PluginTrimmedMean", "norm_trimmed_mean"]


def norm_trimmed_mean(updates: torch.Tensor) -> tuple[torch.Tensor | None, dict[int, str]]:
    """The mean of the finite clients whose update norm is at or below the median norm.

    Args:
        updates: (K, p, q) client updates (non-finite entries allowed: those clients are left out).

    Returns:
        ((p, q) float64 aggregate, or None when no client is finite; client -> reason for each finite
        client left out because its norm is above the median).
    """
    mask = finite_mask(updates)  # (K,)
    idx = torch.nonzero(mask).flatten()  # (N,)
    if idx.numel() == 0:
        return None, {}
    x = updates[idx].to(torch.float64)  # (N, p, q)
    norms = torch.linalg.matrix_norm(x)  # (N,)
    med = torch.quantile(norms, 0.5)  # the mean of the two middle norms for an even N
    keep = norms <= med
    out = {
        int(idx[j]): f"plugin_trimmed_mean: norm {float(norms[j]):.4g} > median {float(med):.4g}"
        for j in torch.nonzero(~keep).flatten().tolist()
    }
    return x[keep].mean(dim=0), out


@register_aggregator("plugin_trimmed_mean")
class PluginTrimmedMean:
    """A global method: every finite client gets the mean of the clients with at most the median norm;
    those above it are flagged."""

    def aggregate(self, updates: torch.Tensor, ctx: AggContext) -> AggOutput:
        del ctx
        check_updates(updates)
        agg, flagged = norm_trimmed_mean(updates)
        return global_output(updates, finite_mask(updates), agg, flagged=flagged)
