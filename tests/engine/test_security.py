"""A local Ray started by clair_ray keeps Ray's token authentication on: another host or user cannot run
code in it (Ray 2.60's GCS and raylet listen on every interface whatever the node address, so the token,
not the bind address, is the guard)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from clair_ray.engine.session import use_token_auth

FOREIGN = """
import pathlib, sys, ray
try:
    ray.init(address=sys.argv[1], logging_level="ERROR")

    @ray.remote
    def plant(path):
        pathlib.Path(path).write_text("ran")

    ray.get(plant.remote(sys.argv[2]), timeout=60)
    print("RAN")
except Exception as exc:  # refused: the expected outcome
    print("REFUSED", type(exc).__name__)
"""


@pytest.mark.usefixtures("ray_session")
def test_a_client_without_the_token_cannot_run_code(tmp_path: Path) -> None:
    assert os.environ["RAY_AUTH_MODE"] == "token"
    token = Path.home() / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    gcs = ray.get_runtime_context().gcs_address
    home = tmp_path / "other_user"  # no ~/.ray/auth_token there
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(home)
    marker = tmp_path / "planted"
    cmd = [sys.executable, "-c", FOREIGN, gcs, str(marker)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert "REFUSED" in out.stdout, out.stdout + out.stderr
    assert "Authentication token is missing" in out.stderr, out.stderr[-2000:]
    assert not marker.exists()
    # Control: the same client with this user's token runs its task (so the refusal above was the token's).
    env.update(HOME=str(Path.home()), RAY_AUTH_MODE="token")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert "RAN" in out.stdout and marker.read_text() == "ran", out.stdout + out.stderr


def test_token_file_is_created_private_and_narrowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # unset: Ray's default, token mode
    path = use_token_auth()
    assert path == tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) == 64
    first = path.read_text()
    path.chmod(0o644)  # as Ray itself writes it
    assert use_token_auth() == path and path.read_text() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit choice is respected
    assert use_token_auth() is None
