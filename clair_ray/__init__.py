"""clair_ray: federated LoRA fine-tuning under contamination, on Ray, with CLAIR.

The public entry point of the method is :func:`clair_ray.clair`::

    import clair_ray
    res = clair_ray.clair(updates, rank=4)
    res.subspace, res.contaminated, res.refined
"""

from clair_ray.clair.api import ClairResult, clair
from clair_ray.clair.refine import FactoredRefinement

__all__ = ["ClairResult", "FactoredRefinement", "clair", "__version__"]
__version__ = "0.1.0"
