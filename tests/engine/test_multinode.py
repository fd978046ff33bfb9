"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``, driven by ``multinode.py`` in its own
process): client actors on different nodes, updates crossing nodes through the object store, and a worker
node removed mid-round (its actor and everything on it gone) give the tables of a one-node run, and so
does a 75 MiB object store on every node that must spill the updates to disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_engine import assert_same_results

from clair_ray.config import load_config
from clair_ray.engine import run_experiment
from clair_ray.results import read_tables

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

HERE = Path(__file__).resolve().parent
OVERRIDES = ["engine.debug_delay_s=1.0"]  # each client call sleeps 1 s first: time to remove its node


class _Tables:
    def __init__(self, out: Path) -> None:
        t = read_tables(out)
        self.clients, self.summary, self.detection = t["clients"], t["summary"], t["detection"]


def _multinode(out: Path, mode: str, overrides: list[str] = OVERRIDES) -> dict:
    cmd = [sys.executable, str(HERE / "multinode.py"), str(out), mode, *overrides]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the cluster's nodes and driver: token auth, as users get
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "cluster.json").read_text())


def _one_node(out: Path, overrides: list[str]) -> _Tables:
    small = HERE.parents[1] / "configs" / "linear_small.yaml"
    run_experiment(load_config(small, [f"output_dir={out}", *overrides]))
    return _Tables(out)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> _Tables:
    return _one_node(tmp_path_factory.mktemp("one_node"), OVERRIDES)


def test_actors_on_several_nodes_give_the_one_node_tables(one_node: _Tables, tmp_path: Path) -> None:
    info = _multinode(tmp_path, "plain")
    nodes = {n or "head" for n in info["calls"].values()}
    assert len(nodes) == 2, info  # the two client actors, each alone on its node
    assert info["restarts"] == 0
    assert_same_results(one_node, _Tables(tmp_path / "run"))


def test_a_worker_node_removed_mid_round_gives_the_same_tables(one_node: _Tables, tmp_path: Path) -> None:
    info = _multinode(tmp_path, "remove_node")
    removed = info["removed"]
    assert removed is not None, info
    assert info["restarts"] == 1, info  # one actor died with its node, counted once
    # its batch ran again, on a node still there
    lost = [m.split("-pid")[0] for m, n in info["calls"].items() if n == removed]
    again = [n for m, n in info["calls"].items() if m.split("-pid")[0] in lost and n != removed]
    assert again, info
    assert_same_results(one_node, _Tables(tmp_path / "run"))
    assert "died" in (tmp_path / "run" / "run.log").read_text()


def test_a_spilling_object_store_gives_the_same_tables(tmp_path: Path) -> None:
    """800 clients' (64, 512) float64 updates in batches of 100: 25.6 MB objects, 205 MB in all, through
    75 MiB stores; the aggregator's node must spill to disk."""
    big = [
        "workload.num_clients=800",
        "workload.p=64",
        "workload.q=512",
        "workload.n_min=70",
        "workload.n_median=80",
        "engine.batch_size=100",
    ]
    info = _multinode(tmp_path / "spill", "spill", big)
    assert info["spilled_mib"] > 0, info["memory_summary"]
    assert_same_results(_one_node(tmp_path / "one_node", big), _Tables(tmp_path / "spill" / "run"))
