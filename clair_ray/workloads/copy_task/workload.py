"""The copy-task LoRA workload (the paper's experiment): task objects, cached base, client data.

The task (:mod:`clair_ray.workloads.copy_task.task`): a small pretrained Transformer copies a token prefix;
each honest client needs a shared set of token substitutions plus cluster-specific personal ones;
contaminated clients corrupt their targets (random, reversed, shifted, a subtle flip of token pairs) or
attack their update. Everything about where it runs, how clients train and how methods aggregate is
shared by every LoRA workload (:class:`clair_ray.workloads.lora.workload.LoRAWorkload`); this module only
says what the task is.

- **Driver** (:meth:`CopyTaskWorkload.prepare`): builds the base W_0 once into the disk cache
  (:func:`~clair_ray.workloads.copy_task.task.build_base`, keyed by the base config's hash), before any
  actor starts, so actors only ever load it.
- Evaluation: each honest client's held-out target loss and exact-match copy accuracy on its own variant.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from clair_ray.workloads.base import register_workload
from clair_ray.workloads.copy_task import task as ct
from clair_ray.workloads.lora.workload import LoRAWorkload

if TYPE_CHECKING:
    from clair_ray.config import ExperimentConfig

__all__ = ["CopyTaskWorkload"]


@register_workload("copy_task")
class CopyTaskWorkload(LoRAWorkload):
    """The copy-task workload (see the module docstring); its config section is
    :class:`~clair_ray.workloads.copy_task.task.CopyTaskConfig`."""

    config_class = ct.CopyTaskConfig
    data_attacks = ct.DATA_ATTACK_KINDS

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.task: ct.CopyTaskConfig = cfg.workload  # type: ignore[assignment]
        self._base_path: Path | None = None

    def cache_dir(self) -> Path:
        """Where the base is cached."""
        if self.task.cache_dir:
            return Path(self.task.cache_dir)
        return Path(os.environ.get("CLAIR_CACHE", str(Path.home() / ".cache" / "clair_ray")))

    def prepare(self, progress: Callable[[str], None] | None = None) -> Path:  # type: ignore[override]
        """Builds the base into the cache (driver, once, before the actors start); returns its path."""
        if self._base_path is not None:
            return self._base_path
        cached = ct.is_cached(self.task.base, self.cache_dir())
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        # One thread: on a shared 2-core machine, torch's default pool oversubscribes the cores and a tiny
        # model's steps slow down by an order of magnitude (measured: 180 ms per step of a 1-layer base).
        torch.set_num_threads(1)
        try:
            path = ct.build_base(self.task.base, self.cache_dir())
        finally:
            torch.set_num_threads(threads)
        if progress is not None and not cached:
            progress(f"built the copy-task base in {time.perf_counter() - t0:.1f}s: {path}")
        self._base_path = path
        return path

    def load_base_model(self) -> torch.nn.Module:
        """The cached pretrained base (built first if missing)."""
        return ct.load_base(self.prepare())

    def default_targets(self) -> list[str]:
        """Every attention and MLP projection of the base's architecture."""
        return ct.default_targets(self.task.base.arch)

    def client_sizes(self, trial: int) -> np.ndarray:
        """Every client holds ``n_sequences`` training sequences."""
        del trial
        return np.full(self.K, self.task.n_sequences, dtype=np.int64)

    def train_data(self, trial: int, k: int) -> dict[str, torch.Tensor]:
        """Client k's local sequences, its data corruption applied."""
        plan = self.contamination(trial)
        kind = plan.attack[k] if plan.is_data_attack(k) else None
        return ct.client_data(
            self.task,
            k,
            self.data_seed(trial, k),
            self.task.n_sequences,
            corruption=kind,
            n_flips=self.task.n_flips,
        )

    def test_data(self, trial: int, k: int) -> dict[str, torch.Tensor]:
        """Client k's clean held-out sequences (its own task variant)."""
        return ct.client_data(self.task, k, self.data_seed(trial, k), self.task.test_sequences, split="test")
