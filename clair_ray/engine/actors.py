"""The engine's two actor kinds; neither knows what it runs (the workload contract does).

**Client actor.** One long-lived Ray actor serves many virtual clients. It builds the workload once (the
expensive shared state: a resident base model, cached data, all pure functions of the seeds) and then
trains whichever virtual clients it is handed. Per-client *mutable* state (what a client continues from)
is not kept here: it arrives with every call as a reference to the aggregator's output, keyed by
trajectory. So a restarted actor loses nothing, and which actor serves which client cannot change a
number. Each call carries (trial, round, [(client_id, seed), ...]) and returns two objects
(``num_returns=2``): small per-client metadata the driver reads, and the workload's payload, which the
driver never fetches: it hands the reference to the aggregator actor. Returned values are owned by the
caller, so they survive this actor's death (a ``ray.put`` here would not).

**Aggregator actor.** Receives the references of the round's client batches (never the values through
the driver), fetches them zero-copy, and runs the workload's round. It returns three objects: a small
summary the driver reads, what each method's clients continue from, and the evaluation plan (both stay
in the object store as references).
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

import ray
import torch

from clair_ray.config import from_dict
from clair_ray.workloads import get_workload
from clair_ray.workloads.base import ClientJob, Group


class ClientWorker:
    """The client actor's logic as a plain class (unit-testable without Ray).

    Args:
        cfg_dict: The experiment config as plain containers.
        actor_id: This actor's index (recorded in every result row).
        plugin_dirs: Where the config's plugins are imported from (the driver's paths).
    """

    def __init__(self, cfg_dict: dict[str, Any], actor_id: int, plugin_dirs: list[str] | None = None) -> None:
        # Two actors on two cores must not each spawn a thread pool; also makes float results independent
        # of how many threads happen to be available.
        torch.set_num_threads(1)
        self.cfg = from_dict(cfg_dict, plugin_dirs)
        self.actor_id = actor_id
        self.workload = get_workload(self.cfg)
        self.calls = 0

    def info(self) -> dict[str, Any]:
        """This actor's pid and index (the pid lets tests kill it)."""
        return {"pid": os.getpid(), "actor_id": self.actor_id, "calls": self.calls}

    def train(
        self, trial: int, round_: int, group: str, jobs: list[tuple[int, int]], start: Any
    ) -> tuple[list[dict[str, Any]], Any]:
        """Trains a batch of virtual clients through the workload.

        Args:
            trial: Trial index.
            round_: Round index.
            group: Which trajectory the clients continue (a method name, or ``*`` when every method
                shares the round's updates); only named in the debug marker.
            jobs: (client_id, seed) pairs, in client-id order.
            start: What this trajectory's clients continue from (None in the first round).

        Returns:
            Per-client metadata (``client_id, ok, traceback, actor_id, train_s`` and the workload's info)
            and the payload of the clients that trained (``ids`` in the metadata order, ``ok`` or not).
            ``engine.debug_fail_clients`` raise here, before the workload sees them;
            ``engine.debug_nonfinite_clients`` get a non-finite update through the workload's
            ``corrupt_updates``.
        """
        self.calls += 1
        eng = self.cfg.engine
        if eng.debug_marker_dir:
            # Written before any work, so a test knows this call is in flight (and whom to kill).
            name = f"t{trial}-r{round_}-{group}-c{jobs[0][0]}-pid{os.getpid()}"
            (Path(eng.debug_marker_dir) / name).write_text(str(os.getpid()))
        if eng.debug_delay_s > 0:
            time.sleep(eng.debug_delay_s)
        t0 = time.perf_counter()
        fail = set(eng.debug_fail_clients)
        run = [ClientJob(k, seed) for k, seed in jobs if k not in fail]
        meta = [
            {
                "client_id": k,
                "seed": seed,
                "ok": True,
                "traceback": None,
                "actor_id": self.actor_id,
                "trained": True,
            }
            for k, seed in jobs
        ]
        for m in meta:
            if m["client_id"] in fail:
                m.update(ok=False, trained=False, traceback=_debug_failure(m["client_id"]))
        payload: Any = None
        pos = {j.client_id: i for i, j in enumerate(run)}
        if run:
            try:
                out = self.workload.train_batch(trial, round_, run, start)
                payload = out.payload
                nonfinite = [pos[k] for k in eng.debug_nonfinite_clients if k in pos]
                if nonfinite:
                    payload = self.workload.corrupt_updates(payload, nonfinite)
                    for i in nonfinite:
                        out.info[i]["finite"] = False
                for m in meta:
                    i = pos.get(m["client_id"])
                    if i is None:
                        continue
                    m.update(out.info[i])
                    if i in out.failed:
                        m.update(ok=False, traceback=out.failed[i])
            except Exception:  # the workload's whole call failed: every client of the batch drops out
                tb = traceback.format_exc()
                payload = None
                for m in meta:
                    if m["trained"]:
                        m.update(ok=False, trained=False, traceback=tb)
        dt = (time.perf_counter() - t0) / max(len(jobs), 1)
        for m in meta:
            m.setdefault("n_samples", 0)
            m.setdefault("bytes_sent", 0)
            m["train_s"] = dt
        return meta, payload


def _debug_failure(k: int) -> str:
    """The traceback of the ``engine.debug_fail_clients`` hook: a real exception, as a client would raise."""
    try:
        raise RuntimeError(f"debug_fail_clients: client {k} fails on purpose")
    except RuntimeError:
        return traceback.format_exc()


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
    ) -> tuple[list[dict[str, Any]], Any]:
        """Like :meth:`ClientWorker.train`, with the starts passed as ``[ref]`` (``[]``: first round).

        The ref points at the aggregator's dict of per-method starts; fetching it here is zero-copy.
        """
        start = ray.get(starts_box[0], timeout=timeout_s)[group] if starts_box else None
        return self.train(trial, round_, group, jobs, start)

    def evaluate_from(
        self, trial: int, plan_box: list[Any], clients: list[int], timeout_s: float
    ) -> dict[str, dict[str, Any]]:
        """Held-out evaluation of ``clients`` under the aggregator's plan (``[ref]``), on this actor's
        resident state (the workload's ``evaluate_batch``)."""
        self.calls += 1
        plan = ray.get(plan_box[0], timeout=timeout_s)
        return self.workload.evaluate_batch(trial, plan.data, clients)


@ray.remote
class AggregatorActor:
    """Runs the workload's round next to the object store; one per run."""

    def __init__(self, cfg_dict: dict[str, Any], plugin_dirs: list[str] | None = None) -> None:
        torch.set_num_threads(1)
        self.cfg = from_dict(cfg_dict, plugin_dirs)
        self.workload = get_workload(self.cfg)

    def aggregate(
        self,
        trial: int,
        round_: int,
        groups: list[dict[str, Any]],
        prev_box: list[Any],
        timeout_s: float,
    ) -> tuple[dict[str, Any], dict[str, Any], Any]:
        """Fetches the groups' client batches and runs the workload's round.

        Args:
            trial: Trial index.
            round_: Round index.
            groups: Per group ``methods``, ``dropped``, ``info`` (client id -> training info),
                ``clients`` (the round's sample) and ``batches``: a list of (client_ids, ref of the
                payload). Refs nested in a list arrive as refs, not values.
            prev_box: ``[ref]`` to the previous round's starts (``[]`` in the first round).
            timeout_s: Timeout of every fetch.

        Returns:
            The summary ``{"methods": {method: MethodRound}, "aggregator_s": seconds, "eval_clients":
            [...] or None}``, the per-method starts of the next round, and the evaluation plan (or None).
        """
        eng = self.cfg.engine
        if eng.debug_marker_dir:  # the test hooks of the client calls, for killing the aggregator
            name = f"agg-t{trial}-r{round_}-pid{os.getpid()}"
            (Path(eng.debug_marker_dir) / name).write_text(str(os.getpid()))
        if eng.debug_delay_s > 0:
            time.sleep(eng.debug_delay_s)
        fetched = []
        for g in groups:
            arrays = ray.get([ref for _, ref in g["batches"]], timeout=timeout_s)
            batches = [(ids, arr) for (ids, _), arr in zip(g["batches"], arrays, strict=True)]
            fetched.append(
                Group(
                    methods=list(g["methods"]),
                    batches=batches,
                    dropped=list(g["dropped"]),
                    info=g["info"],
                    clients=list(g.get("clients", [])),
                )
            )
        prev = ray.get(prev_box[0], timeout=timeout_s) if prev_box else None
        t0 = time.perf_counter()
        out = self.workload.aggregate_round(trial, round_, fetched, prev)
        summary = {
            "methods": out.methods,
            "aggregator_s": time.perf_counter() - t0,
            "eval_clients": None if out.plan is None else list(out.plan.clients),
        }
        return summary, out.nexts, out.plan
