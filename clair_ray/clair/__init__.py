"""CLAIR in pure torch: decomposition solvers, detection, refinement, metrics (no Ray, no peft)."""

from clair_ray.clair.api import ClairResult, clair
from clair_ray.clair.detect import combine_modules
from clair_ray.clair.metrics import client_errors, detection_metrics, mean_error, subspace_error
from clair_ray.clair.refine import FactoredRefinement

__all__ = [
    "ClairResult",
    "FactoredRefinement",
    "clair",
    "combine_modules",
    "client_errors",
    "detection_metrics",
    "mean_error",
    "subspace_error",
]
