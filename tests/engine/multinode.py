"""A run on a several-node Ray cluster on this machine (``ray.cluster_utils.Cluster``), for
``test_multinode.py``; run as a script, in its own process (the test session has its own Ray).

    python tests/engine/multinode.py OUT_DIR MODE [key=value ...]

MODE ``plain`` runs the config; ``spill`` runs it with a 75 MiB object store on every node (Ray's
smallest) and records how much Ray spilled to disk; ``remove_node`` removes the worker node of the first
client call in flight on a worker node (found through ``engine.debug_marker_dir``) while the run goes
on. Every node (the head and 3 workers) has 1 CPU and every actor needs 1, so no two actors share a
node: every update crosses nodes through the object store, and one node is left for a restarted actor.
Writes ``OUT_DIR/cluster.json``: the node of every client call (by its process's raylet), the removed
node, the run's restart count and the MiB spilled.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import psutil
import ray
from ray._private.internal_api import memory_summary
from ray.cluster_utils import Cluster

from clair_ray.config import load_config
from clair_ray.engine import run_experiment
from clair_ray.engine.session import use_token_auth

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "linear_small.yaml"
WORKERS = 3


def node_of(pid: int, raylets: dict[int, str]) -> str | None:
    """The worker node whose raylet started process ``pid`` (a worker's ancestor), or None (the head)."""
    try:
        proc: psutil.Process | None = psutil.Process(pid)
        while proc is not None:
            if proc.pid in raylets:
                return raylets[proc.pid]
            proc = proc.parent()
    except psutil.NoSuchProcess:
        return None
    return None


def main(out: Path, mode: str, overrides: list[str]) -> None:
    use_token_auth()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    store = {"object_store_memory": 75 * 2**20} if mode == "spill" else {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **store})
    nodes = {f"worker{i}": cluster.add_node(num_cpus=1, **store) for i in range(WORKERS)}
    raylets = {n.all_processes["raylet"][0].process.pid: name for name, n in nodes.items()}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    markers = out / "markers"
    markers.mkdir(parents=True, exist_ok=True)
    cfg = load_config(
        CONFIG,
        [
            f"output_dir={out / 'run'}",
            f"engine.debug_marker_dir={markers}",
            "engine.actor_num_cpus=1",
            "engine.aggregator_num_cpus=1",
            *overrides,
        ],
    )
    seen: dict[str, str | None] = {}  # marker -> node of its process
    removed: dict[str, str] = {}

    def watch() -> None:
        deadline = time.time() + 180
        while time.time() < deadline and not done.is_set():
            for m in sorted(markers.glob("t*-c*")):
                pid = m.read_text().strip()
                if m.name not in seen and pid:  # (a marker being written is read again next time)
                    seen[m.name] = node_of(int(pid), raylets)
                    if mode == "remove_node" and not removed and seen[m.name] is not None:
                        name = seen[m.name]
                        cluster.remove_node(nodes[name])
                        removed["node"] = name
            time.sleep(0.02)

    done = threading.Event()
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    res = run_experiment(cfg)
    done.set()
    t.join(timeout=5)
    summary = memory_summary(stats_only=True)
    spilled = re.search(r"Spilled (\d+) MiB", summary)
    info = {"calls": seen, "removed": removed.get("node"), "restarts": res.restarts}
    info["spilled_mib"] = int(spilled.group(1)) if spilled else 0
    info["memory_summary"] = summary
    (out / "cluster.json").write_text(json.dumps(info, indent=1))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
