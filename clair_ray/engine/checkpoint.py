"""Checkpoints: after every round, everything needed to continue and to rebuild the result tables.

A checkpoint holds the last completed (trial, round), the models every client continues from (per method),
the result rows so far, and the config fingerprint (the part of the config that determines results), so
``resume=true`` refuses a checkpoint written by a different experiment. Written to a temporary file and
renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FILENAME = "checkpoint.pkl"


@dataclass
class Checkpoint:
    """State after a completed round.

    Attributes:
        fingerprint: :func:`clair_ray.config.fingerprint` of the run's config.
        trial: Trial of the last completed round.
        round: Last completed round of that trial.
        rounds: Rounds per trial.
        starts: Method -> what its clients continue from (the workload's payload; None when the trial is
            finished).
        client_rows: Client-table rows so far.
        extras: (trial, method, round) -> per-method summary extras so far.
    """

    fingerprint: dict[str, Any]
    trial: int
    round: int
    rounds: int
    starts: dict[str, np.ndarray] | None
    client_rows: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[tuple[int, str, int], dict[str, float]] = field(default_factory=dict)

    def next_position(self) -> tuple[int, int]:
        """The (trial, round) to run next."""
        if self.round + 1 < self.rounds:
            return self.trial, self.round + 1
        return self.trial + 1, 0


def save(out_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Writes the checkpoint atomically; returns its path."""
    path = Path(out_dir) / FILENAME
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(ckpt, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    return path


def load(out_dir: str | Path) -> Checkpoint | None:
    """The checkpoint in ``out_dir``, or None if there is none."""
    path = Path(out_dir) / FILENAME
    if not path.exists():
        return None
    with open(path, "rb") as f:
        ckpt = pickle.load(f)
    if not isinstance(ckpt, Checkpoint):
        raise ValueError(f"{path}: not a clair_ray checkpoint")
    return ckpt
