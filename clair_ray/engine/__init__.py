"""Ray engine: client actors, aggregator actor, round loop, checkpoints.

``run_experiment(cfg)`` runs a config end to end. The names are loaded lazily so that light modules
(``engine.seeds``, used by the workloads) do not import Ray and the actor classes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EngineError", "RunResult", "run_experiment"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from clair_ray.engine import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'clair_ray.engine' has no attribute {name!r}")
