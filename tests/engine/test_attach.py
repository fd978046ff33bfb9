"""``ray.address``: the engine attaches to a running cluster instead of starting Ray in-process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from clair_ray.engine.session import use_token_auth

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_run_attaches_to_a_running_cluster(tmp_path: Path) -> None:
    use_token_auth()  # the head, the probes and the attached run share this user's token
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    # A private, short temp dir (Unix socket paths are limited to ~107 bytes): `ray start` records itself in
    # <temp_dir>/ray_current_cluster, and in the shared /tmp/ray that record would make every plain
    # ray.init() on this machine try to join our (soon stopped) cluster.
    temp_dir = tempfile.mkdtemp(prefix="crt", dir="/tmp")
    # --block keeps `ray start` in the foreground: terminating it stops exactly the processes it started.
    head = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            "--block",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out = tmp_path / "attached"
        deadline, proc = time.time() + 60, None
        while time.time() < deadline:  # wait until the head answers
            probe = subprocess.run(
                [sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{port}'); ray.shutdown()"],
                env=env,
                capture_output=True,
                timeout=60,
            )
            if probe.returncode == 0:
                break
            time.sleep(1)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "clair_ray.cli",
                "run",
                str(REPO / "configs" / "linear_small.yaml"),
                f"output_dir={out}",
                f"ray.address=127.0.0.1:{port}",
                "ray.num_cpus=1",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "12/12 clients" in proc.stdout
        assert (out / "summary.parquet").exists()
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the group of the `ray start` we launched, nothing else
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
