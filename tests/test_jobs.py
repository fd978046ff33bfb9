"""`ray job submit` end to end against a private head node on loopback (jobs/, jobs/head.py).

The head node gets its own temp dir and free ports, so other Ray instances on a shared machine are never
touched. It is stopped by killing exactly its own processes (those naming its temp dir, and their
children): ``ray stop`` would stop every Ray process of this user on the machine, the test session's own
Ray included.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clair_ray.engine.session import use_token_auth

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("head", REPO / "jobs" / "head.py")
head = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(head)  # type: ignore[union-attr]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Token authentication for every command alike (ray start, ray job submit), with this user's
    # ~/.ray/auth_token (mode 0600). The job's python is the one on the PATH that `ray start` had.
    use_token_auth()
    env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{env.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def head_node() -> Iterator[str]:
    """A 2-CPU head node on 127.0.0.1 (jobs/head.py start); yields the job server address; stopped with
    jobs/head.py's stop, which ends exactly its processes."""
    info = head.start(2, 200_000_000, env=_env())
    try:
        yield info["dashboard"]
    finally:
        assert head.stop(info["temp_dir"]) > 0
        shutil.rmtree(info["temp_dir"], ignore_errors=True)


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
    assert "round 0 (of 0..0): 12/12 clients" in log, "the job's own output is streamed back"
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
