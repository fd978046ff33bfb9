"""Client actor: one long-lived Ray actor serves many virtual clients.

The actor builds the workload once (the expensive shared state: for the linear workload the problem and
a cache of client data, both pure functions of the seeds) and then trains whichever virtual clients it is
handed. Per-client *mutable* state (the model a client continues from) is not kept here: it arrives with
every call as a reference to the aggregator's output, keyed by client id. So a restarted actor loses
nothing, and which actor serves which client cannot change a number.

Each call carries (trial, round, [(client_id, seed), ...]) and returns two objects (``num_returns=2``):
small per-client metadata the driver reads, and the (B, p, q) numpy updates, which the driver never
fetches: it hands their reference to the aggregator actor. Returned values are owned by the caller, so they
survive this actor's death (a ``ray.put`` here would not).
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from clair_ray.config import from_dict
from clair_ray.workloads import get_workload


class ClientWorker:
    """The actor's logic as a plain class (unit-testable without Ray).

    Args:
        cfg_dict: The experiment config as plain containers.
        actor_id: This actor's index (recorded in every result row).
    """

    def __init__(self, cfg_dict: dict[str, Any], actor_id: int) -> None:
        # Two actors on two cores must not each spawn a thread pool; also makes float results independent
        # of how many threads happen to be available.
        torch.set_num_threads(1)
        self.cfg = from_dict(cfg_dict)
        self.actor_id = actor_id
        self.workload = get_workload(self.cfg)
        self.calls = 0

    def info(self) -> dict[str, Any]:
        """This actor's pid and index (the pid lets tests kill it)."""
        return {"pid": os.getpid(), "actor_id": self.actor_id, "calls": self.calls}

    def train(
        self,
        trial: int,
        round_: int,
        group: str,
        jobs: list[tuple[int, int]],
        starts: np.ndarray | None,
    ) -> tuple[list[dict[str, Any]], Any]:
        """Trains a batch of virtual clients.

        Args:
            trial: Trial index.
            round_: Round index.
            group: Which trajectory the clients continue (a method name, or ``*`` when every method
                shares the round's updates).
            jobs: (client_id, seed) pairs, in client-id order.
            starts: (K, p, q) the models the clients continue from, indexed by client id (None: the
                first round, every client starts from the initial model); for a workload with
                ``train_batch``, whatever its aggregation returned for the group (LoRA: the global
                adapter's factors).

        Returns:
            Per-client metadata (``client_id, ok, traceback, noise_level, noise_scale, n_samples,
            update_norm, bytes_sent, actor_id, train_s``) and the (B, p, q) updates; a client that raised
            gets a NaN row and ``ok=False`` with its traceback. A workload with a ``train_batch`` method
            returns its own update payload instead of the (B, p, q) array (the copy task: per-module
            factor pairs).
        """
        self.calls += 1
        eng = self.cfg.engine
        if eng.debug_marker_dir:
            # Written before any work, so a test knows this call is in flight (and whom to kill).
            marker = Path(eng.debug_marker_dir) / f"t{trial}-r{round_}-{group}-c{jobs[0][0]}-pid{os.getpid()}"
            marker.write_text(str(os.getpid()))
        if eng.debug_delay_s > 0:
            time.sleep(eng.debug_delay_s)
        train_batch = getattr(self.workload, "train_batch", None)
        if train_batch is not None:
            # Workloads with their own update format (per-module LoRA factors) train a whole batch at once
            # (several clients in one forward/backward) and build the same per-client metadata.
            # ``starts`` is then the group's global adapter (multi-round) or None.
            return train_batch(trial, round_, jobs, self.actor_id, list(eng.debug_fail_clients), starts)
        p, q = self.cfg.workload.p, self.cfg.workload.q
        updates = np.full((len(jobs), p, q), np.nan)  # (B, p, q)
        meta: list[dict[str, Any]] = []
        for i, (k, seed) in enumerate(jobs):
            t0 = time.perf_counter()
            row: dict[str, Any] = {
                "client_id": k,
                "seed": seed,
                "ok": True,
                "traceback": None,
                "actor_id": self.actor_id,
                "noise_level": float("nan"),
                "noise_scale": float("nan"),
                "n_samples": int(self.workload.problem(trial).n[k]),
            }
            try:
                if k in eng.debug_fail_clients:
                    raise RuntimeError(f"debug_fail_clients: client {k} fails on purpose")
                start = None if starts is None else np.array(starts[k])
                upd, info = self.workload.train(trial, round_, k, start)
                if k in eng.debug_nonfinite_clients:
                    upd = np.full_like(upd, np.nan)
                updates[i] = upd
                row.update(info)
            except Exception:  # a client's failure is data (a dropout), not the batch's failure
                row["ok"] = False
                row["traceback"] = traceback.format_exc()
            row["update_norm"] = float(np.linalg.norm(updates[i]))
            row["bytes_sent"] = int(updates[i].nbytes) if row["ok"] else 0
            row["train_s"] = time.perf_counter() - t0
            meta.append(row)
        return meta, updates


@ray.remote
class ClientActor(ClientWorker):
    """:class:`ClientWorker` as a Ray actor; resources and restarts are set with ``.options``."""

    def train_from(
        self,
        trial: int,
        round_: int,
        group: str,
        jobs: list[tuple[int, int]],
        starts_box: list[Any],
        timeout_s: float,
    ) -> tuple[list[dict[str, Any]], np.ndarray]:
        """Like :meth:`ClientWorker.train`, with the starts passed as ``[ref]`` (``[]``: first round).

        The ref points at the aggregator's dict of per-method (K, p, q) models; fetching it here is
        zero-copy (read-only numpy views on the object store).
        """
        starts = None
        if starts_box:
            starts = ray.get(starts_box[0], timeout=timeout_s)[group]
        return self.train(trial, round_, group, jobs, starts)

    def evaluate_from(
        self, trial: int, plan_box: list[Any], clients: list[int], timeout_s: float
    ) -> dict[str, Any]:
        """Held-out evaluation of ``clients`` under the aggregator's plan (``[ref]``), on this actor's
        resident model (LoRA workloads: ``evaluate_batch``)."""
        self.calls += 1
        plan = ray.get(plan_box[0], timeout=timeout_s)
        return self.workload.evaluate_batch(trial, plan, clients)
