"""Checkpoints as data: after every round, what a run needs to continue and to rebuild its tables.

Everything lives under ``output_dir/checkpoint/`` and nothing in it is code: opening or resuming a results
directory someone sent you never unpickles anything.

- ``rows/t<trial>-r<round>.parquet`` and ``.json``: each completed round's client rows (the client
  table's schema), and its per-method summary extras and timing row (``rounds.parquet``), written once,
  atomically, before the round's state.
  The per-round write does not grow with the number of rounds.
- ``state.json``: the last completed (trial, round), the rounds per trial, the config fingerprint (the part
  of the config that determines results, so ``resume=true`` refuses a checkpoint of another experiment)
  and the layout of what every method's clients continue from (``starts``: nested dicts, lists and
  tuples of numpy arrays and scalars, the workload's payload), whose arrays are in the ``.npz`` it names
  (read with ``allow_pickle=False``).
- ``state.prev.json`` (and its ``.npz``): the state it replaced. A state that cannot be read is reported
  in one line and the previous one is used where it can be read.

Each file is written to a temporary name and renamed, so a crash mid-write leaves the previous state intact;
a write that fails (a full disk) removes its temporary file and says why. Row files of rounds after the
state's position (written just before a crash) are ignored and removed on resume.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clair_ray.engine.session import EngineError

DIRNAME = "checkpoint"
STATE = "state.json"
PREVIOUS = "state.prev.json"
FORMAT = 1
#: The pickled checkpoint of clair_ray before checkpoints became data: refused, never loaded.
LEGACY = "checkpoint.pkl"
_PART = re.compile(r"^t(\d+)-r(\d+)\.parquet$")

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
        client_rows: Client-table rows of every completed round (filled by :func:`load`).
        extras: (trial, method, round) -> per-method summary extras (filled by :func:`load`).
        timings: The completed rounds' timing rows, in order (filled by :func:`load`).
    """

    fingerprint: dict[str, Any]
    trial: int
    round: int
    rounds: int
    starts: Any
    client_rows: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[tuple[int, str, int], dict[str, Any]] = field(default_factory=dict)
    timings: list[dict[str, Any]] = field(default_factory=list)

    def next_position(self) -> tuple[int, int]:
        """The (trial, round) to run next."""
        if self.round + 1 < self.rounds:
            return self.trial, self.round + 1
        return self.trial + 1, 0


# ---- the payload as JSON + arrays ---------------------------------------------------------------------
def encode(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    """A JSON-able description of ``obj`` whose arrays are moved into ``arrays`` (key -> array)."""
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise CheckpointError("cannot checkpoint an object array (only numeric arrays are data)")
        key = f"a{len(arrays)}"
        arrays[key] = obj
        return {"a": key}
    if isinstance(obj, np.generic):
        return {"v": obj.item()}
    if obj is None or isinstance(obj, bool | int | float | str):
        return {"v": obj}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if isinstance(k, bool) or not isinstance(k, int | str | np.integer):
                raise CheckpointError(f"cannot checkpoint a dict key of type {type(k).__name__}")
            items.append([{"i": int(k)} if isinstance(k, int | np.integer) else {"s": k}, encode(v, arrays)])
        return {"d": items}
    if isinstance(obj, list | tuple):
        return {"l" if isinstance(obj, list) else "t": [encode(v, arrays) for v in obj]}
    raise CheckpointError(f"cannot checkpoint a value of type {type(obj).__name__}")


def decode(tree: Any, arrays: Any) -> Any:
    """The inverse of :func:`encode` (``arrays``: a mapping key -> array, e.g. an open ``.npz``)."""
    if "a" in tree:
        return np.asarray(arrays[tree["a"]])
    if "v" in tree:
        return tree["v"]
    if "d" in tree:
        return {(k["i"] if "i" in k else k["s"]): decode(v, arrays) for k, v in tree["d"]}
    if "l" in tree:
        return [decode(v, arrays) for v in tree["l"]]
    return tuple(decode(v, arrays) for v in tree["t"])


# ---- writing ------------------------------------------------------------------------------------------
def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write the checkpoint file {path}: {exc}") from exc


def _stem(trial: int, round_: int) -> str:
    return f"t{trial:04d}-r{round_:05d}"


def write_round(
    out_dir: str | Path,
    trial: int,
    round_: int,
    rows: list[dict[str, Any]],
    extras: dict[str, dict[str, Any]],
    schema: pa.Schema,
    timing: dict[str, Any] | None = None,
) -> None:
    """Writes one completed round's client rows, per-method extras and timing (before :func:`save`).

    Args:
        out_dir: The run directory.
        trial: Trial index.
        round_: Round index.
        rows: The round's client rows.
        extras: Method -> its summary extras of the round.
        schema: The client table's schema.
        timing: The round's row of ``rounds.parquet``.
    """
    d = Path(out_dir) / DIRNAME / "rows"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"could not write the checkpoint directory {d}: {exc}") from exc
    table = pa.Table.from_pylist(rows, schema=schema)
    _atomic(d / f"{_stem(trial, round_)}.parquet", lambda p: pq.write_table(table, p))
    doc = {"extras": extras, "timing": timing}
    _atomic(d / f"{_stem(trial, round_)}.json", lambda p: p.write_text(json.dumps(doc)))


def save(out_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Writes the state after a round (its rows go first, :func:`write_round`); the state it replaces is
    kept as ``state.prev.json``.

    Raises:
        CheckpointError: The write failed (disk full, read-only directory, a payload that is not data);
            no temporary file is left.
    """
    d = Path(out_dir) / DIRNAME
    arrays: dict[str, np.ndarray] = {}
    tree = encode(ckpt.starts, arrays)
    npz = f"starts-{_stem(ckpt.trial, ckpt.round)}.npz"
    state = {
        "format": FORMAT,
        "fingerprint": ckpt.fingerprint,
        "trial": ckpt.trial,
        "round": ckpt.round,
        "rounds": ckpt.rounds,
        "starts_file": npz,
        "starts": tree,
    }
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"could not write the checkpoint directory {d}: {exc}") from exc
    _atomic(d / npz, lambda p: np.savez(p.open("wb"), **arrays))
    path = d / STATE
    if path.exists():
        path.replace(d / PREVIOUS)
    _atomic(path, lambda p: p.write_text(json.dumps(state)))
    keep = {npz, _starts_file(d / PREVIOUS)}
    for old in d.glob("starts-*.npz"):  # only the current and the previous state's arrays are needed
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return path


def _starts_file(state_path: Path) -> str | None:
    try:
        return str(json.loads(state_path.read_text())["starts_file"])
    except Exception:
        return None


# ---- reading ------------------------------------------------------------------------------------------
def _read_state(path: Path) -> Checkpoint:
    state = json.loads(path.read_text())
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError("not a clair_ray checkpoint state")
    with np.load(path.parent / state["starts_file"], allow_pickle=False) as arrays:
        starts = decode(state["starts"], arrays)
    return Checkpoint(
        fingerprint=state["fingerprint"],
        trial=int(state["trial"]),
        round=int(state["round"]),
        rounds=int(state["rounds"]),
        starts=starts,
    )


def _read_rows(d: Path, upto: tuple[int, int]) -> tuple[list[dict[str, Any]], dict, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    extras: dict[tuple[int, str, int], dict[str, Any]] = {}
    timings: list[dict[str, Any]] = []
    parts = sorted(
        (int(m.group(1)), int(m.group(2)), p)
        for p in (d / "rows").glob("*.parquet")
        if (m := _PART.match(p.name))
    )
    for trial, round_, part in parts:
        if (trial, round_) > upto:  # written just before a crash, after the state: not completed
            part.unlink(missing_ok=True)
            part.with_suffix(".json").unlink(missing_ok=True)
            continue
        rows.extend(pq.read_table(part).to_pylist())
        doc = json.loads(part.with_suffix(".json").read_text())
        for method, ex in doc["extras"].items():
            extras[(trial, method, round_)] = ex
        if doc.get("timing"):
            timings.append(doc["timing"])
    return rows, extras, timings


def load(out_dir: str | Path) -> Checkpoint | None:
    """The checkpoint in ``out_dir`` (the previous state if the last cannot be read), rows included, or
    None if there is none.

    Raises:
        CheckpointError: Neither state can be read, a row file is missing or unreadable, or the directory
            holds a pickled checkpoint of an older clair_ray (never loaded: a pickle can run code).
    """
    out = Path(out_dir)
    if (out / LEGACY).exists():
        raise CheckpointError(
            f"{out / LEGACY} is a pickled checkpoint of an older clair_ray; it is not loaded (unpickling "
            "can run code): start again with overwrite=true"
        )
    d = out / DIRNAME
    for tmp in d.glob(".*.tmp") if d.exists() else []:  # a write that died midway
        tmp.unlink(missing_ok=True)
    path, prev = d / STATE, d / PREVIOUS
    if not path.exists() and not prev.exists():
        return None
    try:
        ckpt = _read_state(path)
    except Exception as exc:  # missing (a write failed), truncated, garbage, a lost array file
        why = f"{type(exc).__name__}: {exc}".strip()
        try:
            ckpt = _read_state(prev)
        except Exception:
            raise CheckpointError(
                f"{path} cannot be read ({why}) and there is no readable {PREVIOUS}: "
                "start again with overwrite=true"
            ) from exc
        log.warning("%s cannot be read (%s); resuming from %s", path, why, prev)
    try:
        ckpt.client_rows, ckpt.extras, ckpt.timings = _read_rows(d, (ckpt.trial, ckpt.round))
    except Exception as exc:
        raise CheckpointError(
            f"the result rows under {d / 'rows'} cannot be read ({type(exc).__name__}: {exc}): "
            "start again with overwrite=true"
        ) from exc
    return ckpt
