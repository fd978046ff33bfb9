"""Workloads: what a virtual client trains, what the server aggregates, how both are judged.

Every workload implements the contract of :mod:`clair_ray.workloads.base` and registers itself with
``@register_workload(name)``; ``workload.name`` in a config picks one. Built in:

- ``linear``: linear regression, the setting of CLAIR's theory (:mod:`clair_ray.workloads.linear`).
- ``copy_task``: the paper's copy-task LoRA experiment (:mod:`clair_ray.workloads.copy_task`).
- ``hf_causal_lm``: any Hugging Face causal LM on local text (:mod:`clair_ray.workloads.hf_causal_lm`).

The LoRA workloads share :mod:`clair_ray.workloads.lora`. Importing this package registers the built-in
workloads without loading torch models, peft or transformers (those load where a model is used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clair_ray.workloads.base import WORKLOADS, Workload, get_workload_class, register_workload
from clair_ray.workloads.copy_task.workload import CopyTaskWorkload
from clair_ray.workloads.hf_causal_lm.workload import HFCausalLMWorkload
from clair_ray.workloads.linear import LinearConfig, LinearWorkload

if TYPE_CHECKING:
    from clair_ray.config import ExperimentConfig

__all__ = [
    "WORKLOADS",
    "CopyTaskWorkload",
    "HFCausalLMWorkload",
    "LinearConfig",
    "LinearWorkload",
    "Workload",
    "get_workload",
    "get_workload_class",
    "register_workload",
]


def get_workload(cfg: ExperimentConfig) -> Workload:
    """A fresh instance of the workload ``cfg.workload.name`` names (one per process)."""
    return get_workload_class(cfg.workload.name)(cfg)
