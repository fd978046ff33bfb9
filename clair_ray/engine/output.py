"""What a run writes around its tables: the output directory's policy, package versions, TensorBoard."""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import json
import math
import os
import platform
import shutil
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from clair_ray import results
from clair_ray.engine.session import EngineError
from clair_ray.errors import ConfigError
from clair_ray.workloads.base import Column

__all__ = [
    "LOCK_NAME",
    "DirLock",
    "RunResult",
    "TensorBoard",
    "package_versions",
    "prepare_dir",
    "write_versions",
]


@dataclass
class RunResult:
    """What a run produced.

    Attributes:
        out_dir: The run directory.
        clients: Client table.
        summary: Summary table.
        detection: Per-attack detection table.
        restarts: Actor deaths the run recovered from (client actors in training or evaluation, the
            aggregator; each death once, its work re-submitted).
        dropouts: (trial, round, client_id) of clients that raised.
        actor_pids: Pid of each client actor when it was last seen.
        rounds: Per (trial, round) timings in seconds (also ``rounds.parquet``): ``round_s`` (wall, from
            handing out the first batch to the aggregator's answer), ``train_wall_s`` (until the last
            client batch answered), ``client_compute_s`` (the busiest client actor's time inside its
            training calls: the critical path of client compute), ``agg_s`` (the aggregator's compute:
            attacks, methods, truth metrics), ``eval_s`` (held-out evaluation: what the workload's round
            reports as evaluation inside the aggregator, plus the whole evaluation phase on the client
            actors when the round returns an evaluation plan) and
            ``orchestration_s`` = round_s - client_compute_s - agg_s - eval_s (scheduling, object
            transfers, waiting, driver work).
    """

    out_dir: Path
    clients: pd.DataFrame
    summary: pd.DataFrame
    detection: pd.DataFrame
    restarts: int = 0
    dropouts: list[tuple[int, int, int]] = field(default_factory=list)
    actor_pids: list[int] = field(default_factory=list)
    rounds: pd.DataFrame = field(default_factory=pd.DataFrame)


#: The file a run holds in its ``output_dir`` while it runs (pid and host of the holder, as JSON).
LOCK_NAME = ".clair-ray.lock"

#: The packages whose versions a run records (``versions.json``).
PACKAGES = ("clair-ray", "torch", "ray", "peft", "transformers", "numpy", "pyarrow", "pandas", "omegaconf")


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages results depend on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_versions(out_dir: Path) -> None:
    """Writes ``versions.json`` (:func:`package_versions`) into the run directory."""
    (out_dir / "versions.json").write_text(json.dumps(package_versions(), indent=1))


def prepare_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses a non-empty ``output_dir`` unless ``resume`` or ``overwrite`` (which empties it first).

    Raises:
        EngineError: The directory holds files and neither was given.
    """
    if not out.exists() or not any(p.name != LOCK_NAME for p in out.iterdir()) or resume:
        return
    if not overwrite:
        raise EngineError(
            f"output_dir={str(out)!r} is not empty: pass resume=true to continue the run there, "
            "overwrite=true to replace it, or another output_dir"
        )
    for item in out.iterdir():
        if item.name == LOCK_NAME:  # ours: the run took it before emptying
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


class TensorBoard:
    """Each round's summary numbers per method as TensorBoard scalars (``trial<t>/<method>/<column>``).

    Args:
        logdir: Where the event files go (``output_dir/tensorboard``).
        columns: The workload's result columns.
    """

    SKIP = frozenset({"trial", "method", "round", "agg_s", "round_s"})

    def __init__(self, logdir: Path, columns: Sequence[Column]) -> None:
        from tensorboardX import SummaryWriter  # comes with ray[tune]; loaded only when asked for

        self.columns = tuple(columns)
        self.writer = SummaryWriter(str(logdir))

    def write(self, trial: int, round_: int, rows: list[dict[str, Any]], extras: dict) -> None:
        """Summarises one round's client rows and writes every finite number."""
        clients = results.table(rows, results.client_schema(self.columns)).to_pandas()
        summary, _ = results.summarize(clients, extras, self.columns)
        for row in summary:
            for col, value in row.items():
                if col not in self.SKIP and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"trial{trial}/{row['method']}/{col}", float(value), round_)
        self.writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file."""
        self.writer.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class DirLock:
    """An exclusive lock on a run's ``output_dir``: two runs into one directory would mix their tables.

    The lock is a file created atomically (``O_CREAT | O_EXCL``) holding the holder's pid and host. A
    lock left by a process that no longer exists on this host (a run killed with SIGKILL) is taken over;
    one held by a live process, or written on another host (whose processes cannot be checked from here),
    refuses the run with the holder named.

    Args:
        out: The run directory (created if missing).
    """

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        """Takes the lock.

        Raises:
            EngineError: Another live run holds it, or one on another host.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # stale: its run is gone
                    continue
                raise EngineError(
                    f"output_dir={str(self.path.parent)!r} is in use by another run (pid "
                    f"{holder.get('pid', '?')} on host {holder.get('host', '?')}; lock file {self.path}): "
                    "wait for it, use another output_dir, or delete the lock file if that run is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise EngineError(f"could not take the lock {self.path}: it keeps reappearing")

    def _holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        """Drops the lock (only if this process holds it)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


#: What a results directory that cannot be written answers: read-only, not allowed, full, over quota.
_DISK_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


@contextlib.contextmanager
def disk_errors(out_dir: Path, before_start: bool) -> Iterator[None]:
    """Turns a results directory that cannot be written into one line naming it and the cause; an
    OSError about any other path (a data file, Ray's files) passes through unchanged.

    Args:
        out_dir: The run directory.
        before_start: True while taking the directory (a bad ``output_dir``: ConfigError, exit 2); False
            during the run (a disk that filled up: EngineError).
    """
    try:
        yield
    except OSError as exc:
        where = Path(exc.filename).resolve() if isinstance(exc.filename, str) else None
        out = Path(out_dir).resolve()
        # in the directory, or (taking it) the directory or a parent it could not be created in
        if where is None:
            ours = before_start
        else:
            ours = where.is_relative_to(out) or (before_start and out.is_relative_to(where))
        if exc.errno not in _DISK_ERRNOS or not ours:
            raise  # not the results directory's (a data file, Ray's own files): as it is
        what = f"output_dir={str(out_dir)!r}" if before_start else f"writing {where}"
        msg = f"{what}: {exc.strerror}; choose a writable output_dir with free space"
        raise (ConfigError if before_start else EngineError)(msg) from exc
