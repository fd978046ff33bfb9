"""`ray job submit` end to end against a private head node on loopback (jobs/, RAY-NOTES "Cluster and jobs").

The head node gets its own temp dir and free ports, so other Ray instances on a shared machine are never
touched. It is stopped by killing exactly its own processes (those naming its temp dir, and their
children): ``ray stop`` would stop every Ray process of this user on the machine, the test session's own
Ray included.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # ray start enables token auth once ~/.ray/auth_token exists, ray job submit then fails: disable it
    # for every command alike. The job's python is the one on the PATH that `ray start` had.
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{env.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    return env


def _stop_head(temp_dir: str) -> None:
    """Terminates the processes of this head node only: those naming its temp dir, and their children."""
    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                roots.append(p)
        except psutil.Error:
            continue
    procs = {p.pid: p for p in roots}
    for p in roots:
        try:
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.Error:
            continue
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture
def head_node() -> Iterator[str]:
    """A 2-CPU head node on 127.0.0.1 with non-default ports; yields the job server address."""
    temp_dir = tempfile.mkdtemp(prefix="crj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, client, nm, om, agent, agent_grpc, metrics, renv = _free_ports(9)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={renv}",
        "--num-cpus=2",
        "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(cmd, env=_env(), check=True, capture_output=True, text=True, timeout=120)
        yield f"http://127.0.0.1:{dash}"
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_runs_a_config_and_a_sweep_on_a_local_head(head_node: str, tmp_path: Path) -> None:
    out = tmp_path / "job_run"
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head_node,
        "--working-dir",
        ".",
        "--runtime-env",
        "jobs/runtime_env.yaml",
        "--",
        "python",
        "jobs/run.py",
        "configs/linear_small.yaml",
        f"output_dir={out}",
        "aggregation.methods=[clair,fedavg]",
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log, log[-4000:]
    assert "round 1/1: 12/12 clients" in log, "the job's own output is streamed back"
    for name in ("clients", "summary", "detection"):
        assert (out / f"{name}.parquet").exists()
    from clair_ray.results import read_tables

    summary = read_tables(out)["summary"].set_index("method")
    assert summary.loc["clair", "honest_mean_error"] < summary.loc["fedavg", "honest_mean_error"]
    assert time.time() - t0 < 300

    # the sweep entry point on the same head node: Tune against a `ray start` cluster (RAY_ADDRESS)
    store = tmp_path / "store"
    sweep_file = tmp_path / "job_sweep.yaml"
    sweep_file.write_text(
        "base: configs/linear_small.yaml\n"  # resolved in the job's working directory
        "aggregation: {methods: [clair, fedavg]}\n"
        "engine: {num_actors: 1, actor_num_cpus: 0.25, aggregator_num_cpus: 0.25}\n"
        f"sweep: {{name: job, storage_path: {store}, params: {{seed: {{grid: [0, 1]}}}}}}\n"
    )
    cmd[cmd.index("jobs/run.py") :] = ["jobs/sweep.py", str(sweep_file)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in log, log[-4000:]
    assert log.count(" done ") == 2, log[-4000:]
    from clair_ray.report import read_sweep

    data = read_sweep(store / "job-results")
    assert (data["trials"]["status"] == "complete").all() and data["summary"]["seed"].nunique() == 2
