"""The output directory's lock: two runs into one directory would mix their tables."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from clair_ray.config import load_config
from clair_ray.engine import EngineError, checkpoint, run_experiment
from clair_ray.engine.output import LOCK_NAME, DirLock, disk_errors, prepare_dir
from clair_ray.errors import ConfigError

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


def _ckpt(round_: int, starts: object = None) -> checkpoint.Checkpoint:
    return checkpoint.Checkpoint(fingerprint={"seed": 0}, trial=0, round=round_, rounds=5, starts=starts)


def _round(tmp_path: Path, round_: int) -> None:
    schema = pa.schema([("round", pa.int32()), ("loss", pa.float64()), ("method", pa.string())])
    rows = [{"round": round_, "loss": 0.5 + round_, "method": "clair"}]
    extras = {"clair": {"agg_s": 0.1, "refine": "{}"}}
    checkpoint.write_round(tmp_path, 0, round_, rows, extras, schema, {"round": round_, "round_s": 1.5})


def test_checkpoint_is_data_and_round_trips(tmp_path: Path) -> None:
    """The payload (nested dicts with int and str keys, tuples, lists, None, numbers, arrays) comes back
    equal; the files are JSON, Parquet and an npz that loads without pickle; rows are per round."""
    starts = {
        "clair": {"corr": {"m": np.arange(6.0).reshape(2, 3)}, "shared": None, "personal": {3: ({"x": 1},)}},
        "local": [np.float32(2.5), 7, "s", True, (np.ones((1, 2), dtype=np.float32),)],
    }
    for r in range(3):
        _round(tmp_path, r)
        checkpoint.save(tmp_path, _ckpt(r, starts))
    got = checkpoint.load(tmp_path)
    assert got.round == 2 and got.next_position() == (0, 3)
    np.testing.assert_array_equal(got.starts["clair"]["corr"]["m"], starts["clair"]["corr"]["m"])
    assert got.starts["clair"]["personal"] == {3: ({"x": 1},)} and got.starts["clair"]["shared"] is None
    assert got.starts["local"][:4] == [2.5, 7, "s", True] and got.starts["local"][4][0].dtype == np.float32
    assert [row["loss"] for row in got.client_rows] == [0.5, 1.5, 2.5]
    assert got.extras[(0, "clair", 1)] == {"agg_s": 0.1, "refine": "{}"}
    assert [t["round"] for t in got.timings] == [0, 1, 2]  # rounds.parquet survives a resume
    d = tmp_path / checkpoint.DIRNAME
    assert sorted(p.name for p in d.glob("starts-*.npz")) == [
        "starts-t0000-r00001.npz",
        "starts-t0000-r00002.npz",
    ]
    assert not list(tmp_path.rglob("*.pkl"))
    json.loads((d / checkpoint.STATE).read_text())
    with np.load(d / "starts-t0000-r00002.npz", allow_pickle=False) as z:
        assert len(z.files) == 2  # the arrays; numbers and strings live in the JSON
    # Rows written after the last state (a crash between the two) are not a completed round.
    _round(tmp_path, 3)
    assert (
        len(checkpoint.load(tmp_path).client_rows) == 3 and not (d / "rows" / "t0000-r00003.parquet").exists()
    )
    with pytest.raises(checkpoint.CheckpointError, match="cannot checkpoint a value of type"):
        checkpoint.save(tmp_path, _ckpt(4, {"f": object()}))


def test_a_pickled_checkpoint_is_never_loaded(tmp_path: Path) -> None:
    (tmp_path / checkpoint.LEGACY).write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    with pytest.raises(checkpoint.CheckpointError, match="not loaded \\(unpickling can run code\\)"):
        checkpoint.load(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    for r in range(2):
        _round(tmp_path, r)
        checkpoint.save(tmp_path, _ckpt(r))
    assert checkpoint.load(tmp_path).round == 1
    path = tmp_path / checkpoint.DIRNAME / checkpoint.STATE
    path.write_bytes(path.read_bytes()[:20])  # truncated mid-write by a full disk, say
    got = checkpoint.load(tmp_path)
    assert got.round == 0 and len(got.client_rows) == 1  # the previous one, with a warning
    (tmp_path / checkpoint.DIRNAME / checkpoint.PREVIOUS).write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot be read \(.*\) and there is no readable"):
        checkpoint.load(tmp_path)


def test_failed_checkpoint_write_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _round(tmp_path, 0)
    checkpoint.save(tmp_path, _ckpt(0))
    d = tmp_path / checkpoint.DIRNAME
    before = sorted(p.name for p in d.iterdir())

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.np, "savez", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        checkpoint.save(tmp_path, _ckpt(1))
    assert sorted(p.name for p in d.iterdir()) == before
    monkeypatch.undo()
    assert checkpoint.load(tmp_path).round == 0
    (d / ".state.json.tmp").write_bytes(b"half")  # left by a killed writer: removed on load
    assert checkpoint.load(tmp_path).round == 0 and not (d / ".state.json.tmp").exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_an_unwritable_output_dir_is_one_line(tmp_path: Path, code: int) -> None:
    """Read-only, not allowed or full: one line naming the directory and the cause; a bad output_dir
    before the run is bad input (ConfigError), a disk that fills up during it an EngineError; any other
    OSError goes through unchanged."""
    err = OSError(code, os.strerror(code), str(tmp_path / "clients.parquet"))
    with pytest.raises(ConfigError, match=f"output_dir=.*{os.strerror(code)}"):
        with disk_errors(tmp_path, before_start=True):
            raise err
    with pytest.raises(EngineError, match=f"writing .*clients.parquet: {os.strerror(code)}"):
        with disk_errors(tmp_path, before_start=False):
            raise err
    with pytest.raises(FileNotFoundError):
        with disk_errors(tmp_path, before_start=True):
            raise FileNotFoundError(errno.ENOENT, "gone", "x")
    elsewhere = OSError(code, os.strerror(code), "/some/data/file.jsonl")  # not the results directory's
    with pytest.raises(OSError) as caught:
        with disk_errors(tmp_path, before_start=False):
            raise elsewhere
    assert caught.value is elsewhere
    parent = OSError(code, os.strerror(code), str(tmp_path))  # creating out/ inside a read-only parent
    with pytest.raises(ConfigError, match="output_dir="):
        with disk_errors(tmp_path / "out", before_start=True):
            raise parent


def test_cli_refuses_an_output_dir_it_cannot_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clair_ray import cli

    def refuse(self: DirLock) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self.path))

    monkeypatch.setattr(DirLock, "acquire", refuse)
    small = Path(__file__).resolve().parents[2] / "configs" / "linear_small.yaml"
    assert cli.main(["run", str(small), f"output_dir={tmp_path / 'out'}"]) == 2
