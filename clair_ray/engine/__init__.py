"""The Ray engine: client actors, the aggregator actor, the round loop, checkpoints.

Ray plumbing only: it calls a workload through the contract of :mod:`clair_ray.workloads.base` and never
looks inside updates, models or metrics. ``run_experiment(cfg)`` runs a config end to end.
"""

from __future__ import annotations

from clair_ray.engine.runner import EngineError, RunInterrupted, RunResult, SimulatedCrash, run_experiment

__all__ = ["EngineError", "RunInterrupted", "RunResult", "SimulatedCrash", "run_experiment"]
