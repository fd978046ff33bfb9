"""The output directory's lock: two runs into one directory would mix their tables."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clair_ray.config import load_config
from clair_ray.engine import EngineError, checkpoint, run_experiment
from clair_ray.engine.output import LOCK_NAME, DirLock, prepare_dir

SMALL = Path(__file__).resolve().parents[2] / "configs" / "linear_small.yaml"


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    out = tmp_path / "run"
    lock = DirLock(out)
    lock.acquire()
    held = json.loads((out / LOCK_NAME).read_text())
    assert held == {"pid": os.getpid(), "host": socket.gethostname()}
    with pytest.raises(EngineError, match=rf"in use by another run \(pid {os.getpid()} on host"):
        DirLock(out).acquire()
    lock.release()
    assert not (out / LOCK_NAME).exists()


def test_stale_lock_is_taken_over_and_foreign_host_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    lock = DirLock(out)
    lock.acquire()  # its holder is gone (killed with SIGKILL, say)
    lock.release()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-node"}))
    with pytest.raises(EngineError, match="pid 1 on host another-node"):
        DirLock(out).acquire()


def test_prepare_dir_ignores_and_keeps_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "run"
    lock = DirLock(out)
    lock.acquire()
    prepare_dir(out, resume=False, overwrite=False)  # only the lock there: empty
    (out / "old.parquet").write_text("x")
    prepare_dir(out, resume=False, overwrite=True)
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    lock.release()


def test_a_run_refuses_a_directory_another_run_holds(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    # A live process on this host (the test's parent) holds it: refused before Ray or any file is touched.
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(EngineError, match=rf"in use by another run \(pid {os.getppid()}"):
        run_experiment(load_config(SMALL, [f"output_dir={out}"]))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def _ckpt(round_: int) -> checkpoint.Checkpoint:
    return checkpoint.Checkpoint(fingerprint={"seed": 0}, trial=0, round=round_, rounds=5, starts=None)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, _ckpt(0))
    checkpoint.save(tmp_path, _ckpt(1))
    assert checkpoint.load(tmp_path).round == 1
    path = tmp_path / checkpoint.FILENAME
    path.write_bytes(path.read_bytes()[:20])  # truncated mid-write by a full disk, say
    assert checkpoint.load(tmp_path).round == 0  # the previous one, with a warning
    (tmp_path / checkpoint.PREVIOUS).write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot be read \(.*\) and there is no readable"):
        checkpoint.load(tmp_path)


def test_failed_checkpoint_write_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint.save(tmp_path, _ckpt(0))

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.pickle, "dump", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        checkpoint.save(tmp_path, _ckpt(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.FILENAME]
    monkeypatch.undo()
    assert checkpoint.load(tmp_path).round == 0
    (tmp_path / "checkpoint.tmp").write_bytes(b"half")  # left by a killed writer: removed on load
    assert checkpoint.load(tmp_path).round == 0 and not (tmp_path / "checkpoint.tmp").exists()
