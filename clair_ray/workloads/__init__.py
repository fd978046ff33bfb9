"""Workloads: what a virtual client trains. ``get_workload(cfg)`` picks one by ``workload.name``.

- ``linear``: linear regression (:class:`LinearWorkload`); the engine's dense path calls its ``problem,
  train, errors, off_subspace_energy, subspace_error, initial_model``.
- ``copy_task``: the paper's copy-task LoRA workload
  (:class:`clair_ray.workloads.copy_task_engine.CopyTaskWorkload`). Its updates are per-module LoRA
  factor pairs, so it brings its own ``prepare`` (driver: build the cached base), ``train_batch`` (client
  actors) and ``aggregate_round`` (aggregator actor), which the engine calls when a workload has them.
  Imported lazily: it pulls in transformers and peft.
- ``hf_causal_lm``: any Hugging Face causal LM on local text data
  (:class:`clair_ray.workloads.hf_causal_lm_engine.HFCausalLMWorkload`), the same LoRA engine path
  (:class:`clair_ray.workloads.lora_engine.LoRAEngineWorkload`).
"""

from __future__ import annotations

from typing import Any

from clair_ray.config import ExperimentConfig
from clair_ray.workloads.linear import LinearWorkload

__all__ = ["LinearWorkload", "get_workload"]


def get_workload(cfg: ExperimentConfig) -> Any:
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
    if cfg.workload.name == "copy_task":
        from clair_ray.workloads.copy_task_engine import CopyTaskWorkload

        return CopyTaskWorkload(cfg)
    if cfg.workload.name == "hf_causal_lm":
        from clair_ray.workloads.hf_causal_lm_engine import HFCausalLMWorkload

        return HFCausalLMWorkload(cfg)
    raise ValueError(f"workload.name={cfg.workload.name!r}: unknown workload")
