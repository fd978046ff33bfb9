"""Workloads: what a virtual client trains. ``get_workload(cfg)`` picks one by ``workload.name``.

Only the linear-regression workload exists so far; the copy-task transformer and the Hugging Face causal
LM come with later issues and implement the same methods (problem, train, errors, off_subspace_energy,
subspace_error, initial_model).
"""

from __future__ import annotations

from clair_ray.config import ExperimentConfig
from clair_ray.workloads.linear import LinearWorkload

__all__ = ["LinearWorkload", "get_workload"]


def get_workload(cfg: ExperimentConfig) -> LinearWorkload:
    """The workload named by ``cfg.workload.name``.

    Args:
        cfg: The validated experiment config.

    Returns:
        A fresh workload instance (one per actor).

    Raises:
        ValueError: Unknown workload name.
    """
    if cfg.workload.name == "linear":
        return LinearWorkload(cfg)
    raise ValueError(f"workload.name={cfg.workload.name!r}: unknown workload")
