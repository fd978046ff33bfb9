"""The Flower side of ``benchmarks/vs_flower.py``: the federated LoRA copy-task job in Flower's simulation.

Runs INSIDE the Flower venv (flwr[simulation] pins its own ray, so it cannot share clair_ray's venv); the
driver starts it as a subprocess and parses the one ``FLOWER_RESULT {json}`` line it prints last.

* ServerApp: Flower's Message-API ``FedAvg`` (``fraction_train=1.0``, all K clients every round,
  ``min_train_nodes = min_available_nodes = K``, ``fraction_evaluate=0.0``: no client-side evaluation),
  wrapped to timestamp each round (``configure_train`` .. end of ``aggregate_train``). Equal weights, so its
  aggregate is the mean of the B's and of the A's per module, as ``fedavg_factors`` (FedIT). After the last
  round the server evaluates the final global adapter with the workload's ``evaluate_global``.
* ClientApp: per message, ``CopyTaskWorkload.train_one`` (one client with plain peft) from the global
  adapter (``None`` in round 1: peft's initial adapter). The workload (and its peft model) is built once
  per Ray worker process and reused across calls, Flower at its best. Factors travel as NDArrays in a
  fixed order: sorted module names, B then A per module.
* ``run_simulation`` with ``client_resources = {num_cpus: 1, num_gpus: 0}`` by default: on 2 cores, two
  clients train at once.

Run by hand (from the repository root, in the Flower venv)::

    .venv-flower/bin/python benchmarks/flower_copy_task.py --config configs/bench_vs_flower.yaml
    .venv-flower/bin/python benchmarks/flower_copy_task.py --dummy --clients 4 --rounds 2   # no clair_ray
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

Factors = dict[str, tuple[np.ndarray, np.ndarray]]
RESULT_TAG = "FLOWER_RESULT"

# ---------------------------------------------------------------------------------------------------------
# The workload, on both sides of the wire
# ---------------------------------------------------------------------------------------------------------


class DummyWorkload:
    """A stand-in with the copy-task workload's interface (a small torch LoRA-like regression), no clair_ray.

    For checking the Flower plumbing alone (``--dummy``): each client fits ``y = x (W + B A)`` on its own
    data with 10 AdamW steps, where only the "adapter" (B, A) of two modules is trained.
    """

    def __init__(
        self, num_clients: int, seed: int = 0, width: int = 64, rank: int = 8, steps: int = 10
    ) -> None:
        self.num_clients, self.seed, self.width, self.rank, self.steps = num_clients, seed, width, rank, steps
        self.modules = ["layer0", "layer1"]

    def prepare(self, progress: Any = None) -> None:
        """Nothing to build."""

    def _init(self) -> Factors:
        gen = torch.Generator().manual_seed(self.seed)
        return {
            m: (
                np.zeros((self.width, self.rank)),
                torch.randn(self.rank, self.width, generator=gen, dtype=torch.float64).numpy() * 0.1,
            )
            for m in self.modules
        }

    def _data(self, k: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1000 + k * 2 + split)
        x = torch.randn(64, self.width, generator=gen)
        return x, torch.tanh(x @ torch.eye(self.width).roll(k % 3 + 1, dims=1))

    def _loss(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, y: torch.Tensor):
        h = x
        for m in self.modules:
            b, a = factors[m]
            h = torch.tanh(h + h @ (b @ a).T)
        return torch.nn.functional.mse_loss(h, y)

    def train_one(
        self, trial: int, round_: int, k: int, start: Factors | None = None
    ) -> tuple[Factors, float]:
        """One client's local training; returns its adapter and last loss."""
        del trial, round_
        start = self._init() if start is None else start
        params = {
            m: tuple(torch.tensor(f, dtype=torch.float32, requires_grad=True) for f in start[m])
            for m in start
        }
        opt = torch.optim.AdamW([p for pair in params.values() for p in pair], lr=3e-3, weight_decay=0.0)
        x, y = self._data(k, 0)
        for _ in range(self.steps):
            loss = self._loss(params, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out = {m: (b.detach().double().numpy(), a.detach().double().numpy()) for m, (b, a) in params.items()}
        return out, loss.item()

    def evaluate_global(self, trial: int, factors: Factors) -> float:
        """Mean held-out loss over the clients the job used."""
        del trial
        tens = {
            m: (torch.tensor(b, dtype=torch.float32), torch.tensor(a, dtype=torch.float32))
            for m, (b, a) in factors.items()
        }
        with torch.no_grad():
            return float(
                np.mean([float(self._loss(tens, *self._data(k, 1))) for k in range(self.num_clients)])
            )


def make_workload(job: dict[str, Any]) -> Any:
    """The job's workload: clair_ray's copy task from ``job["config"]`` + overrides, or the dummy.

    Args:
        job: The job spec (``config``, ``overrides``, ``dummy``, ``clients``).

    Returns:
        A workload with ``prepare``, ``train_one`` and ``evaluate_global``.
    """
    if job["dummy"]:
        return DummyWorkload(job["clients"])
    from clair_ray.config import load_config
    from clair_ray.workloads import get_workload

    return get_workload(load_config(job["config"], job["overrides"]))


def factors_to_ndarrays(factors: Factors) -> list[np.ndarray]:
    """Module -> (B, A) as Flower NDArrays: sorted module names, B then A per module."""
    return [f for name in sorted(factors) for f in factors[name]]


def ndarrays_to_factors(arrays: list[np.ndarray], names: list[str]) -> Factors:
    """Inverse of :func:`factors_to_ndarrays`, given the sorted module names."""
    if len(arrays) != 2 * len(names):
        raise ValueError(f"expected {2 * len(names)} arrays (B, A per module), got {len(arrays)}")
    return {name: (arrays[2 * i], arrays[2 * i + 1]) for i, name in enumerate(names)}


# ---------------------------------------------------------------------------------------------------------
# ClientApp (module level, so Ray workers import it by reference and keep the workload cache)
# ---------------------------------------------------------------------------------------------------------

client_app = ClientApp()
_WORKLOADS: dict[str, Any] = {}  # per worker process: job spec (JSON) -> workload, built on first use


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One virtual client's round: local training from the global adapter in the message."""
    config = msg.content["config"]
    job_json = str(config["job"])
    wl = _WORKLOADS.get(job_json)
    if wl is None:
        job = json.loads(job_json)
        torch.set_num_threads(max(1, int(job["client_cpus"])))
        warnings.filterwarnings("ignore", category=FutureWarning)
        wl = _WORKLOADS[job_json] = make_workload(job)
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    names = json.loads(str(config["modules"]))
    start = ndarrays_to_factors(arrays, names) if arrays else None
    k = int(context.node_config["partition-id"])
    t0 = time.perf_counter()
    factors, loss = wl.train_one(trial=0, round_=int(config["server-round"]) - 1, k=k, start=start)
    compute_s = time.perf_counter() - t0
    content = RecordDict(
        {
            "arrays": ArrayRecord(factors_to_ndarrays(factors)),
            "metrics": MetricRecord(
                {"num-examples": 1, "train_loss": loss, "compute_s": compute_s, "pid": os.getpid()}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


# ---------------------------------------------------------------------------------------------------------
# ServerApp
# ---------------------------------------------------------------------------------------------------------


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, recording each round's wall time and the clients' own compute times."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds: list[dict[str, float]] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Timestamps the round's start, then samples all K nodes as FedAvg does."""
        self.rounds.append({"round": server_round, "t_start": time.time()})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregate, then timestamps the round's end."""
        replies = list(replies)
        t_replies = time.time()
        arrays, metrics = super().aggregate_train(server_round, replies)
        rec = self.rounds[-1]
        rec["t_replies"] = t_replies
        rec["t_end"] = time.time()
        rec["round_s"] = rec["t_end"] - rec["t_start"]
        rec["agg_s"] = rec["t_end"] - t_replies
        ok = [m for m in replies if m.has_content()]
        rec["n_replies"] = len(ok)
        rec["n_errors"] = len(replies) - len(ok)
        per_client = [next(iter(m.content.metric_records.values())) for m in ok]
        rec["client_compute_s"] = float(sum(float(mr["compute_s"]) for mr in per_client))
        rec["workers"] = len({int(mr["pid"]) for mr in per_client})  # distinct Ray worker processes
        losses = [float(mr["train_loss"]) for mr in per_client]
        rec["train_loss_mean"] = float(np.mean(losses)) if losses else None
        return arrays, metrics


def make_server_app(job: dict[str, Any], out: dict[str, Any]) -> ServerApp:
    """The ServerApp of the job; fills ``out`` with the per-round times and the final evaluation."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        del context
        k = job["clients"]
        strategy = TimedFedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=k, min_evaluate_nodes=0,
            min_available_nodes=k,
        )  # fmt: skip
        train_config = ConfigRecord(
            {"job": json.dumps(job, sort_keys=True), "modules": json.dumps(job["modules"])}
        )
        out["t_strategy_start"] = time.time()
        result = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(), num_rounds=job["rounds"], train_config=train_config
        )
        out["t_strategy_end"] = time.time()
        out["rounds"] = strategy.rounds
        # Final global adapter: the server's own evaluation, once, after the last round.
        t0 = time.perf_counter()
        wl = make_workload(job)
        factors = ndarrays_to_factors(result.arrays.to_numpy_ndarrays(), job["modules"])
        out["final_loss"] = float(wl.evaluate_global(trial=0, factors=factors))
        out["eval_s"] = time.perf_counter() - t0
        out["global_factors_norm"] = float(np.sqrt(sum((f**2).sum() for f in factors_to_ndarrays(factors))))

    return server_app


def module_names(job: dict[str, Any]) -> list[str]:
    """Sorted LoRA module names of the job's adapter (one cheap client update in this process).

    The driver passes them in (``--modules``) when it knows them; otherwise the names come from one
    throw-away ``train_one`` here, before the timed part.
    """
    wl = make_workload(job)
    factors, _ = wl.train_one(trial=0, round_=0, k=0, start=None)
    return sorted(factors)


def quiet_logs(verbose: bool) -> None:
    """Flower logs every round at INFO and warns (WARNING) that run_simulation is deprecated and that
    fraction_evaluate=0 skips federated evaluation, both expected here: keep its errors only."""
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench_vs_flower.yaml", help="clair_ray YAML of the job")
    parser.add_argument("--override", action="append", default=[], help="key=value, repeatable")
    parser.add_argument("--clients", type=int, default=32, help="K: virtual clients (= workload.num_clients)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client-cpus", type=float, default=1.0, help="Ray num_cpus per Flower client")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="CPUs of the Ray instance")
    parser.add_argument("--modules", default=None, help="JSON list of the adapter's module names")
    parser.add_argument("--dummy", action="store_true", help="tiny torch stand-in workload, no clair_ray")
    parser.add_argument("--verbose", action="store_true", help="Flower INFO logs and Ray worker output")
    args = parser.parse_args()
    t_proc = psutil.Process().create_time()  # this interpreter's start (before the heavy imports)
    quiet_logs(args.verbose)
    # The server's final evaluation runs here: one thread, as in clair_ray's aggregator actor (torch's
    # default pool oversubscribes 2 busy cores and slows a tiny model down several times over).
    torch.set_num_threads(1)

    job: dict[str, Any] = {
        "config": args.config,
        "overrides": list(args.override),
        "clients": args.clients,
        "rounds": args.rounds,
        "client_cpus": args.client_cpus,
        "dummy": args.dummy,
    }
    job["modules"] = json.loads(args.modules) if args.modules else module_names(job)

    # The ClientApp must come from an importable module, not __main__: Ray workers then import it by name
    # (sys.path is passed on by Flower's Ray backend) and keep their workload cache across calls, instead
    # of unpickling a fresh copy of this script's globals with every message.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import flower_copy_task as app_module

    out: dict[str, Any] = {}
    backend_config = {
        "client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0},
        "init_args": {
            "address": "local",  # a new local Ray, never a running cluster's
            "num_cpus": args.ray_cpus,
            "include_dashboard": False,
            "log_to_driver": args.verbose,
            "logging_level": logging.INFO if args.verbose else logging.ERROR,
        },
    }
    t_before = time.time()
    run_simulation(
        server_app=make_server_app(job, out),
        client_app=app_module.client_app,
        num_supernodes=args.clients,
        backend_config=backend_config,
        verbose_logging=False,
    )
    t_after = time.time()
    if "final_loss" not in out:
        raise SystemExit("flower_copy_task: the ServerApp did not finish (see the log above)")
    rounds = out["rounds"]
    steady = [r["round_s"] for r in rounds[1:]] or [r["round_s"] for r in rounds]
    result = {
        "flwr_version": __import__("flwr").__version__,
        "ray_version": __import__("ray").__version__,
        "torch_version": torch.__version__,
        "clients": args.clients,
        "rounds_n": args.rounds,
        "client_cpus": args.client_cpus,
        "dummy": args.dummy,
        "t_process_start": t_proc,
        "t_before_sim": t_before,
        "t_after_sim": t_after,
        "job_s": t_after - t_before,
        "since_process_start_s": t_after - t_proc,
        "first_round_s": rounds[0]["round_s"],  # Ray start, actor start-up and worker imports included
        "strategy_s": out["t_strategy_end"] - out["t_strategy_start"],
        "shutdown_s": t_after - out["t_strategy_end"] - out["eval_s"],
        "eval_s": out["eval_s"],
        "rounds": rounds,
        "steady_updates_per_s": float(args.clients / np.mean(steady)),
        "final_loss": out["final_loss"],
        "global_factors_norm": out["global_factors_norm"],
    }
    print(f"{RESULT_TAG} {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
