"""The copy-task LoRA workload on the Ray engine (the paper's experiment; issue 4).

The task (clair_ray/workloads/copy_task.py): a small pretrained Transformer copies a token prefix; each
honest client needs a shared set of token substitutions plus cluster-specific personal ones; contaminated
clients corrupt their targets (random, reversed, shifted, a subtle flip of token pairs) or attack their
update. Everything about where it runs, how clients train and how methods aggregate is shared by every
LoRA workload (:class:`clair_ray.workloads.lora_engine.LoRAEngineWorkload`); this module only says what
the task is.

- **Driver** (:meth:`CopyTaskWorkload.prepare`): builds the base W_0 once into the disk cache
  (:func:`clair_ray.workloads.copy_task.build_base`, keyed by the base config's hash), before any actor
  starts, so actors only ever load it.
- Evaluation: each honest client's held-out target loss and exact-match copy accuracy on its own variant.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from clair_ray.config import ExperimentConfig
from clair_ray.workloads import copy_task as ct
from clair_ray.workloads.lora_engine import LoRAEngineWorkload

__all__ = ["CopyTaskWorkload"]


class CopyTaskWorkload(LoRAEngineWorkload):
    """The copy-task workload: task objects, cached base, client data (see the module docstring)."""

    DATA_KINDS = ct.DATA_ATTACK_KINDS

    def __init__(self, cfg: ExperimentConfig) -> None:
        """Stores the config and derives the task objects (no model is loaded here).

        Args:
            cfg: The validated experiment config (``workload.name == "copy_task"``).
        """
        super().__init__(cfg)
        self.w = t = cfg.workload.copy_task
        self.base_cfg = ct.CopyBaseConfig(
            arch=t.arch,
            vocab_size=t.vocab_size,
            prefix_len=t.prefix_len,
            n_layer=t.n_layer,
            n_embd=t.n_embd,
            n_head=t.n_head,
            base_steps=t.base_steps,
            base_lr=t.base_lr,
            base_batch_size=t.base_batch_size,
            seed=t.base_seed,
        )
        self.task = ct.CopyTaskConfig(
            base=self.base_cfg,
            n_common=t.n_common,
            n_personal=t.n_personal,
            n_clusters=t.n_clusters,
            heterogeneity=t.heterogeneity,
            task_seed=t.task_seed,
        )
        self._base_path: Path | None = None

    def cache_dir(self) -> Path:
        """Where the base is cached."""
        if self.w.cache_dir:
            return Path(self.w.cache_dir)
        return Path(os.environ.get("CLAIR_CACHE", str(Path.home() / ".cache" / "clair_ray")))

    def prepare(self, progress: Callable[[str], None] | None = None) -> Path:
        """Builds the base into the cache (driver, once, before the actors start); returns its path."""
        if self._base_path is not None:
            return self._base_path
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        # One thread: on a shared 2-core machine, torch's default pool oversubscribes the cores and a tiny
        # model's steps slow down by an order of magnitude (measured: 180 ms per step of a 1-layer base).
        torch.set_num_threads(1)
        try:
            path = ct.build_base(self.base_cfg, self.cache_dir())
        finally:
            torch.set_num_threads(threads)
        if progress is not None and time.perf_counter() - t0 > 1.0:
            progress(f"built the copy-task base in {time.perf_counter() - t0:.1f}s: {path}")
        self._base_path = path
        return path

    def load_base_model(self) -> torch.nn.Module:
        """The cached pretrained base (built first if missing)."""
        return ct.load_base(self.prepare())

    def default_targets(self) -> list[str]:
        """Every attention and MLP projection of the base's architecture."""
        return ct.default_targets(self.w.arch)

    def client_sizes(self, trial: int) -> np.ndarray:
        """Every client holds ``n_sequences`` training sequences."""
        del trial
        return np.full(self.K, self.w.n_sequences, dtype=np.int64)

    def train_data(self, trial: int, k: int) -> dict[str, torch.Tensor]:
        """Client k's local sequences, its data corruption applied."""
        prob = self.problem(trial)
        kind = prob.attack[k] if prob.is_data_attack(k) else None
        return ct.client_data(
            self.task,
            k,
            self.data_seed(trial, k),
            self.w.n_sequences,
            corruption=kind,
            n_flips=self.w.n_flips,
        )

    def test_data(self, trial: int, k: int) -> dict[str, torch.Tensor]:
        """Client k's clean held-out sequences (its own task variant)."""
        return ct.client_data(self.task, k, self.data_seed(trial, k), self.w.test_sequences, split="test")
