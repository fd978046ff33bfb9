"""Checkpoints: after every round, everything needed to continue and to rebuild the result tables.

A checkpoint holds the last completed (trial, round), the models every client continues from (per method),
the result rows so far, and the config fingerprint (the part of the config that determines results), so
``resume=true`` refuses a checkpoint written by a different experiment. Written to a temporary file and
renamed, so a crash mid-write leaves the previous checkpoint intact; a write that fails (a full disk)
removes its temporary file and says why. The checkpoint it replaces is kept as ``checkpoint.prev.pkl``:
a checkpoint that cannot be read (truncated, garbage) is reported in one line, and the previous one is
used where it can be read.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clair_ray.engine.session import EngineError

FILENAME = "checkpoint.pkl"
PREVIOUS = "checkpoint.prev.pkl"

log = logging.getLogger(__name__)


class CheckpointError(EngineError):
    """A checkpoint could not be written, or none in the directory could be read."""


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
    """Writes the checkpoint atomically (the one it replaces becomes ``checkpoint.prev.pkl``).

    Raises:
        CheckpointError: The write failed (disk full, read-only directory); no temporary file is left.
    """
    path = Path(out_dir) / FILENAME
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            pickle.dump(ckpt, f, protocol=pickle.HIGHEST_PROTOCOL)
        if path.exists():
            path.replace(path.with_name(PREVIOUS))
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write the checkpoint {path}: {exc}") from exc
    return path


def _read(path: Path) -> Checkpoint:
    with open(path, "rb") as f:
        ckpt = pickle.load(f)
    if not isinstance(ckpt, Checkpoint):
        raise ValueError("not a clair_ray checkpoint")
    return ckpt


def load(out_dir: str | Path) -> Checkpoint | None:
    """The checkpoint in ``out_dir`` (the previous one if it cannot be read), or None if there is none.

    Raises:
        CheckpointError: Neither the checkpoint nor the previous one can be read.
    """
    out = Path(out_dir)
    path = out / FILENAME
    (out / (FILENAME.rsplit(".", 1)[0] + ".tmp")).unlink(missing_ok=True)  # a write that died midway
    if not path.exists():
        return None
    try:
        return _read(path)
    except Exception as exc:  # truncated, garbage, another pickle: never a raw traceback
        why = f"{type(exc).__name__}: {exc}".strip()
        prev = out / PREVIOUS
        if prev.exists():
            try:
                ckpt = _read(prev)
            except Exception:
                pass
            else:
                log.warning("%s cannot be read (%s); resuming from %s", path, why, prev)
                return ckpt
        raise CheckpointError(
            f"{path} cannot be read ({why}) and there is no readable {PREVIOUS}: "
            "start again with overwrite=true"
        ) from exc
