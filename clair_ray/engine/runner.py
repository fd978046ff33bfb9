"""The round loop: starts Ray and the actors, runs trials × rounds, survives failures, writes results.

Per round, the driver hands fixed batches of virtual clients (cut by client id, batch b to actor b mod A)
to the client actors, waits for their metadata (always with a timeout), re-submits the batches of an
actor that died (Ray restarts it, ``engine.max_restarts``; one death counted per actor), records clients
that raised as dropouts, checks ``engine.min_clients``, passes the update references to the aggregator
and turns its metrics into result rows in client-id order; then a checkpoint (Parquet, JSON, npz)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from clair_ray import results, seeds
from clair_ray.config import (
    ConfigError,
    ExperimentConfig,
    fingerprint,
    plugin_paths,
    to_dict,
    to_yaml,
    unlisted_registrations,
)
from clair_ray.engine import checkpoint, output
from clair_ray.engine.actors import AggregatorActor, ClientActor
from clair_ray.engine.output import RunResult
from clair_ray.engine.session import (
    EngineError,
    RunInterrupted,
    SimulatedCrash,
    check_resources,
    last_line,
    ray_session,
)
from clair_ray.workloads import get_workload

__all__ = ["EngineError", "RunInterrupted", "RunResult", "SimulatedCrash", "run_experiment"]

log = logging.getLogger("clair_ray.engine")
SHARED = "*"  # the group name when every method shares the round's updates (the first round)


@dataclass
class _Batch:
    actor: int
    group: str
    jobs: list[tuple[int, int]]
    attempts: int = 0
    unavailable_since: float | None = None  # when the actor was first seen restarting for this batch
    epoch: int = 0  # the actor's counted deaths when this batch was submitted
    meta_ref: Any = None
    upd_ref: Any = None


class Runner:
    """One experiment run (use :func:`run_experiment`)."""

    def __init__(self, cfg: ExperimentConfig, progress: Callable[[str], None] | None) -> None:
        self.cfg = cfg
        self.progress = progress or (lambda _msg: None)
        self.timeout = cfg.engine.call_timeout_s
        self.out_dir = Path(cfg.output_dir)
        self.restarts = 0
        self._deaths: dict[int, int] = {}  # client actor -> deaths counted so far
        self.dropouts: list[tuple[int, int, int]] = []
        self.rows: list[dict[str, Any]] = []
        self.extras: dict[tuple[int, str, int], dict[str, float]] = {}
        self.timings: list[dict[str, Any]] = []
        self._done: tuple[int, int] | None = None  # (trial, round) of the last checkpointed round
        self._done_rows = 0  # client rows of the checkpointed rounds
        self._tb: output.TensorBoard | None = None  # ``tensorboard: true``
        self.actors: list[Any] = []
        self.agg: Any = None
        self.pids: list[int] = []
        self.workload = get_workload(cfg)
        self.columns = self.workload.columns
        self.plugin_dirs = plugin_paths(list(cfg.plugins))

    def start_actors(self) -> None:
        e, cfg_dict = self.cfg.engine, to_dict(self.cfg)
        self.actors = [
            ClientActor.options(
                num_cpus=e.actor_num_cpus,
                num_gpus=e.actor_num_gpus,
                max_restarts=e.max_restarts,
                max_task_retries=0,  # we re-submit ourselves, so we can count and log restarts
            ).remote(cfg_dict, i, self.plugin_dirs)
            for i in range(e.num_actors)
        ]
        self.agg = AggregatorActor.options(
            num_cpus=e.aggregator_num_cpus, max_restarts=e.max_restarts
        ).remote(cfg_dict, self.plugin_dirs)
        try:
            infos = ray.get([a.info.remote() for a in self.actors], timeout=self.timeout)
        except GetTimeoutError as exc:
            raise EngineError(
                f"client actors did not start within engine.call_timeout_s={self.timeout}"
            ) from exc
        except RayActorError as exc:
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            raise EngineError(f"client actors failed to start: {lines[-1] if lines else exc}") from exc
        self.pids = [i["pid"] for i in infos]

    def _count_death(self, actor: int, epoch: int) -> bool:
        """Counts a death of client actor ``actor`` seen by a call submitted at ``epoch`` (its count of
        deaths then); True if new. Calls queued before a death that is counted already fail with that
        same death; a call submitted after it that fails saw a new one."""
        if epoch < self._deaths.get(actor, 0):
            return False
        self._deaths[actor] = epoch + 1
        self.restarts += 1
        return True

    def stop_actors(self) -> None:
        for a in [*self.actors, self.agg]:
            if a is not None:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)

    def _submit(self, b: _Batch, trial: int, round_: int, starts_ref: Any) -> None:
        box = [] if starts_ref is None else [starts_ref]
        b.epoch = self._deaths.get(b.actor, 0)
        b.meta_ref, b.upd_ref = (
            self.actors[b.actor]
            .train_from.options(num_returns=2)
            .remote(trial, round_, b.group, b.jobs, box, self.timeout)
        )

    def train_round(
        self, trial: int, round_: int, groups: list[str], starts_ref: Any, clients: list[int]
    ) -> dict[str, list]:
        """Runs every group's client batches over the round's sampled ``clients``; returns group ->
        [(client_ids, meta, updates_ref)]."""
        bs, A = self.cfg.engine.batch_size, self.cfg.engine.num_actors
        batches: list[_Batch] = []
        for group in groups:
            for b0 in range(0, len(clients), bs):  # batches cut by position in the sorted sample
                jobs = [
                    (k, seeds.derive_seed(self.cfg.seed, seeds.TRAIN, trial, round_, k))
                    for k in clients[b0 : b0 + bs]
                ]
                batches.append(_Batch(actor=len(batches) % A, group=group, jobs=jobs))
        for b in batches:
            self._submit(b, trial, round_, starts_ref)
        pending = {b.meta_ref: b for b in batches}
        metas: dict[int, list[dict[str, Any]]] = {}
        t0, last_note, done = time.perf_counter(), time.perf_counter(), 0
        total = len(clients) * len(groups)
        while pending:
            b = pending.pop(self._next_ready(pending, f"trial {trial} round {round_}: no client batch"))
            try:
                metas[id(b)] = ray.get(b.meta_ref, timeout=self.timeout)
            except RayActorError as exc:
                # A restartable actor that was killed answers ActorUnavailableError until Ray has restarted
                # it (seconds on a busy machine): that is one death, not one per re-submission, so only
                # the first unavailability counts; waiting for the restart is bounded by call_timeout_s.
                waiting = isinstance(exc, ActorUnavailableError) and b.unavailable_since is not None
                if waiting and time.perf_counter() - b.unavailable_since > self.timeout:
                    raise EngineError(
                        f"client actor {b.actor} did not come back within "
                        f"engine.call_timeout_s={self.timeout}s"
                    ) from exc
                if not waiting:
                    b.attempts += 1
                    if b.attempts > self.cfg.engine.max_restarts:
                        raise EngineError(
                            f"client actor {b.actor} died {b.attempts} times (engine.max_restarts="
                            f"{self.cfg.engine.max_restarts}) while training clients "
                            f"{b.jobs[0][0]}..{b.jobs[-1][0]}"
                        ) from exc
                    log.warning(
                        "client actor %d died in trial %d round %d (clients %d..%d): %s; re-submitting",
                        *(b.actor, trial, round_, b.jobs[0][0], b.jobs[-1][0], type(exc).__name__),
                    )
                    if self._count_death(b.actor, b.epoch):
                        self.progress(f"  client actor {b.actor} died; restarted, re-submitting its clients")
                b.unavailable_since = (
                    (b.unavailable_since or time.perf_counter())
                    if isinstance(exc, ActorUnavailableError)
                    else None
                )
                if b.unavailable_since is not None:
                    time.sleep(0.5)  # the restart is under way; don't spin
                self._submit(b, trial, round_, starts_ref)
                pending[b.meta_ref] = b
                continue
            done += len(b.jobs)
            if time.perf_counter() - last_note > 5.0 and pending:
                last_note = time.perf_counter()
                self.progress(
                    f"  trial {trial} round {round_}: {done}/{total} client updates, {last_note - t0:.1f}s"
                )
        out: dict[str, list] = {g: [] for g in groups}
        for b in batches:  # batch order = client-id order within each group
            out[b.group].append(([k for k, _ in b.jobs], metas[id(b)], b.upd_ref))
        return out

    def run_round(self, trial: int, round_: int, starts_ref: Any) -> Any:
        """Trains, aggregates and records one round; returns the ref of the next round's starts."""
        t0 = time.perf_counter()
        methods = list(self.cfg.aggregation.methods)
        groups = [SHARED] if starts_ref is None else methods
        K = self.cfg.workload.num_clients
        sample = seeds.sample_clients(self.cfg.seed, trial, round_, K, self.cfg.workload.clients_per_round)
        n_s = len(sample)
        of = f"{K}" if n_s == K else f"{n_s} sampled"
        trained = self.train_round(trial, round_, groups, starts_ref, sample)
        train_meta: dict[str, dict[int, dict[str, Any]]] = {}
        payload = []
        for g in groups:
            by_client = {m["client_id"]: m for _, metas, _ in trained[g] for m in metas}
            train_meta[g] = by_client
            dropped = sorted(k for k, m in by_client.items() if not m["ok"])
            for k in dropped:
                if g == groups[0]:
                    self.dropouts.append((trial, round_, k))
                log.warning(
                    "trial %d round %d: client %d dropped out (group %s):\n%s",
                    trial,
                    round_,
                    k,
                    g,
                    by_client[k]["traceback"],
                )
            reported = n_s - len(dropped)
            need = max(self.cfg.engine.min_clients, 1)
            if reported < need:
                cause = last_line(by_client[dropped[0]]["traceback"]) if dropped else ""
                raise EngineError(
                    f"trial {trial} round {round_}: only {reported} of {of} clients reported "
                    f"(engine.min_clients={self.cfg.engine.min_clients}); dropped: {dropped}"
                    + (f"; client {dropped[0]} raised: {cause}" if cause else "")
                )
            finite = sum(1 for m in by_client.values() if m["ok"] and m.get("finite", True))
            if finite == 0:
                raise EngineError(
                    f"trial {trial} round {round_}: all {reported} reported updates are non-finite (NaN or "
                    "inf: diverged local training? check the learning rate and the model)"
                )
            if finite < need:
                raise EngineError(
                    f"trial {trial} round {round_}: only {finite} of {of} clients sent a finite update "
                    f"(engine.min_clients={self.cfg.engine.min_clients}; {reported - finite} non-finite, "
                    f"{len(dropped)} dropped)"
                )
            batches = []
            for _, metas, ref in trained[g]:
                ids = [m["client_id"] for m in metas if m["trained"]]
                if ids:  # a batch whose whole call failed sent no payload
                    batches.append((ids, ref))
            payload.append(
                {
                    "methods": methods if g == SHARED else [g],
                    "dropped": dropped,
                    "info": {k: m for k, m in by_client.items() if m["ok"]},
                    "batches": batches,
                    "clients": sample,
                }
            )
        t_train = time.perf_counter() - t0
        box = [] if starts_ref is None else [starts_ref]
        summary, next_ref, plan_ref = self._aggregate(trial, round_, payload, box)
        agg_meta = summary["methods"]
        t_eval = time.perf_counter()
        if summary["eval_clients"]:
            self.evaluate_round(trial, round_, plan_ref, summary["eval_clients"], agg_meta)
        eval_wall = time.perf_counter() - t_eval
        round_s = time.perf_counter() - t0
        busy: dict[int, float] = {}  # actor -> seconds inside training calls (train_s is per client)
        for g in groups:
            for m in train_meta[g].values():
                busy[m["actor_id"]] = busy.get(m["actor_id"], 0.0) + float(m["train_s"])
        client_s = max(busy.values(), default=0.0)
        eval_s = sum(float(agg_meta[m].eval_s) for m in methods)  # inside the aggregator
        # The aggregator's whole compute (attacks, truth metrics, methods) counts as aggregation.
        agg_s = float(summary["aggregator_s"]) - eval_s
        eval_s += eval_wall
        self.timings.append(
            {
                "trial": trial,
                "round": round_,
                "clients": n_s,
                "round_s": round_s,
                "train_wall_s": t_train,
                "client_compute_s": client_s,
                "agg_s": agg_s,
                "eval_s": eval_s,
                "orchestration_s": round_s - client_s - agg_s - eval_s,
            }
        )
        first_row = len(self.rows)
        self._record(trial, round_, methods, groups, agg_meta, train_meta, round_s, set(sample))
        if self.cfg.tensorboard:
            if self._tb is None:
                self._tb = output.TensorBoard(self.out_dir / "tensorboard", self.columns)
            self._tb.write(trial, round_, self.rows[first_row:], self.extras)
        n_drop = len(payload[0]["dropped"])
        self.progress(
            f"trial {trial} round {round_} (of 0..{self._rounds() - 1}): {n_s - n_drop}/{of} clients"
            f"{f' ({n_drop} dropped)' if n_drop else ''}, train {t_train:.1f}s, "
            f"aggregate {round_s - t_train:.1f}s"
        )
        return next_ref

    def _record(
        self,
        trial: int,
        round_: int,
        methods: list[str],
        groups: list[str],
        agg_meta: dict[str, Any],
        train_meta: dict[str, dict[int, dict[str, Any]]],
        round_s: float,
        sampled: set[int],
    ) -> None:
        """One client row per (method, client) in client-id order: the core columns and the workload's
        (every client of the federation; ``sampled`` says who took part in the round)."""
        attack = self.workload.contamination(trial).attack
        K = self.cfg.workload.num_clients
        for method in methods:
            g = groups[0] if groups == [SHARED] else method
            am = agg_meta[method]
            self.extras[(trial, method, round_)] = results.method_extras(am, self.columns, round_s)
            self.rows.extend(
                results.round_rows(trial, round_, method, am, attack, train_meta[g], self.columns, K, sampled)
            )

    def _next_ready(self, pending: dict[Any, Any], what: str) -> Any:
        """The first of ``pending``'s refs to finish; EngineError after ``engine.call_timeout_s``."""
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout)
        if not ready:
            raise EngineError(
                f"{what} finished within engine.call_timeout_s={self.timeout}s ({len(pending)} pending)"
            )
        return ready[0]

    def evaluate_round(
        self, trial: int, round_: int, plan_ref: Any, clients: list[int], agg_meta: dict
    ) -> None:
        """Held-out evaluation on the client actors under the aggregator's plan, written into ``agg_meta``.

        The plan's clients are cut into batches by client id (``engine.batch_size``), batch b to actor
        b mod A, each call evaluating its clients under every method on the actor's resident state. A call
        whose actor died is re-submitted (the actor restarts), like training.
        """
        bs, A = self.cfg.engine.batch_size, len(self.actors)
        batches = [clients[i : i + bs] for i in range(0, len(clients), bs)]
        tries = dict.fromkeys(range(len(batches)), 0)
        since: dict[int, float] = {}  # batch -> when its actor was first seen restarting
        epochs = {i: self._deaths.get(i % A, 0) for i in range(len(batches))}  # as _Batch.epoch
        refs = {
            self.actors[i % A].evaluate_from.remote(trial, [plan_ref], b, self.timeout): i
            for i, b in enumerate(batches)
        }
        while refs:
            ref = self._next_ready(refs, f"trial {trial} round {round_}: no evaluation batch")
            i = refs.pop(ref)
            try:
                out = ray.get(ref, timeout=self.timeout)
            except RayActorError as exc:
                # As in training: a restarting actor answers ActorUnavailableError until it is back; that
                # is the same death, counted once and waited for within call_timeout_s.
                if isinstance(exc, ActorUnavailableError) and i in since:
                    if time.perf_counter() - since[i] > self.timeout:
                        raise EngineError(
                            f"client actor {i % A} did not come back within engine.call_timeout_s="
                            f"{self.timeout}s"
                        ) from exc
                else:
                    tries[i] += 1
                    if tries[i] > self.cfg.engine.max_restarts:
                        raise EngineError(f"evaluation of clients {batches[i]} failed: {exc}") from exc
                    self._count_death(i % A, epochs[i])
                    log.warning(
                        "client actor %d died evaluating trial %d round %d; re-submitting",
                        i % A,
                        trial,
                        round_,
                    )
                if isinstance(exc, ActorUnavailableError):
                    since.setdefault(i, time.perf_counter())
                else:
                    since.pop(i, None)
                time.sleep(0.5)  # the actor is restarting
                epochs[i] = self._deaths.get(i % A, 0)
                refs[self.actors[i % A].evaluate_from.remote(trial, [plan_ref], batches[i], self.timeout)] = i
                continue
            except RayTaskError as exc:
                cause = str(exc.as_instanceof_cause()).strip().splitlines()[-1]
                raise EngineError(f"evaluation of clients {batches[i]} failed: {cause}") from exc
            for method, r in out.items():
                metrics = agg_meta[method].metrics
                for name, values in r.items():
                    if name == "clients":
                        continue
                    col = np.array(
                        metrics.get(name, np.full(self.cfg.workload.num_clients, np.nan)), dtype=float
                    )
                    col[r["clients"]] = values
                    metrics[name] = col

    def _aggregate(self, trial: int, round_: int, payload: list, box: list) -> tuple:
        restarting = False  # the actor answered ActorUnavailableError: the death was counted already
        for attempt in range(self.cfg.engine.max_restarts + 1):
            meta_ref, next_ref, plan_ref = self.agg.aggregate.options(num_returns=3).remote(
                trial, round_, payload, box, self.timeout
            )
            try:
                return ray.get(meta_ref, timeout=self.timeout), next_ref, plan_ref
            except RayActorError as exc:
                self.restarts += not restarting
                restarting = isinstance(exc, ActorUnavailableError)
                log.warning(
                    "aggregator actor died in trial %d round %d (attempt %d); re-submitting",
                    trial,
                    round_,
                    attempt + 1,
                )
            except GetTimeoutError as exc:
                raise EngineError(
                    f"trial {trial} round {round_}: aggregation took longer than "
                    f"engine.call_timeout_s={self.timeout}s"
                ) from exc
            except RayTaskError as exc:
                cause = exc.as_instanceof_cause()
                raise EngineError(f"aggregation failed: {str(cause).strip().splitlines()[-1]}") from exc
        raise EngineError(
            f"aggregator actor died more than engine.max_restarts={self.cfg.engine.max_restarts} times"
        )

    def _rounds(self) -> int:
        return self.cfg.workload.n_rounds

    def run(self) -> RunResult:
        unlisted = unlisted_registrations(self.cfg)
        if unlisted:  # the actors (other processes) import only the package and the plugins
            raise EngineError(
                "the actors could not run these; add the modules to plugins: [...] in the config:\n  "
                + "\n  ".join(unlisted)
            )
        lock = output.DirLock(self.out_dir)
        with output.disk_errors(self.out_dir, before_start=True):
            lock.acquire()  # before anything is read or written there
        try:
            with output.disk_errors(self.out_dir, before_start=False):
                return self._run()
        finally:
            lock.release()

    def _run(self) -> RunResult:
        cfg, rounds = self.cfg, self._rounds()
        output.prepare_dir(self.out_dir, resume=self.cfg.resume, overwrite=self.cfg.overwrite)
        fp = fingerprint(cfg)
        trial0, round0, starts = 0, 0, None
        if cfg.resume:
            ck = checkpoint.load(self.out_dir)
            if ck is not None:
                if ck.fingerprint != fp:
                    raise EngineError(
                        f"resume=true but {self.out_dir / checkpoint.DIRNAME} was written by a "
                        f"different config (only output/engine/ray settings may change)"
                    )
                trial0, round0 = ck.next_position()
                starts = ck.starts if round0 > 0 else None
                self.rows, self.extras = list(ck.client_rows), dict(ck.extras)
                self.timings = list(ck.timings)  # rounds.parquet keeps the rounds before the resume
                self._done, self._done_rows = (ck.trial, ck.round), len(self.rows)
                if trial0 >= cfg.trials:
                    self.progress(
                        f"{self.out_dir} is finished already (all {cfg.trials} trial(s)): nothing to run"
                    )
                    return self.finish(write=not (self.out_dir / "summary.parquet").exists())
                self.progress(f"resuming at trial {trial0} round {round0} from {self.out_dir}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
        output.write_versions(self.out_dir)
        try:  # e.g. build a cached base model, read the data: before any actor starts
            self.workload.prepare(self.progress)
        except ConfigError:
            raise
        except (ValueError, FileNotFoundError) as exc:  # bad input (a data file, a model path): one line
            raise ConfigError(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)) from exc
        handler = logging.FileHandler(self.out_dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("clair_ray").addHandler(handler)
        try:
            with ray_session(cfg):
                check_resources(cfg)
                self.start_actors()
                try:
                    for trial in range(trial0, cfg.trials):
                        r_start = round0 if trial == trial0 else 0
                        starts_ref = ray.put(starts) if (starts is not None and r_start > 0) else None
                        for round_ in range(r_start, rounds):
                            starts_ref = self.run_round(trial, round_, starts_ref)
                            if cfg.export_adapters and round_ + 1 == rounds:  # before the trial is done
                                self._export(trial, starts_ref)
                            self._checkpoint(fp, trial, round_, rounds, starts_ref)
                    with contextlib.suppress(Exception):  # pids after any restarts (for the record)
                        infos = ray.get([a.info.remote() for a in self.actors], timeout=self.timeout)
                        self.pids = [i["pid"] for i in infos]
                finally:
                    self.stop_actors()
        except KeyboardInterrupt:
            # The rows of the checkpointed rounds are the completed ones: a resume starts after them.
            del self.rows[self._done_rows :]
            self.finish()
            raise RunInterrupted(self.out_dir, self._done) from None
        finally:
            logging.getLogger("clair_ray").removeHandler(handler)
            handler.close()
            if self._tb is not None:
                self._tb.close()
        return self.finish()

    def _export(self, trial: int, finals_ref: Any) -> None:
        """``export_adapters``: the workload writes each method's final models (on the driver)."""
        t0 = time.perf_counter()
        finals = ray.get(finals_ref, timeout=self.timeout)
        out = self.out_dir / "adapters" / f"trial{trial}"
        written = self.workload.export(trial, dict(finals), out)
        self.progress(
            f"trial {trial}: exported {len(written)} adapter(s) to {out} ({time.perf_counter() - t0:.1f}s)"
        )

    def _checkpoint(self, fp: dict, trial: int, round_: int, rounds: int, starts_ref: Any) -> None:
        last = round_ + 1 >= rounds
        if self.cfg.engine.checkpoint:
            methods = list(self.cfg.aggregation.methods)
            checkpoint.write_round(
                self.out_dir,
                trial,
                round_,
                self.rows[self._done_rows :],
                {m: self.extras[(trial, m, round_)] for m in methods},
                results.client_schema(self.columns),
                self.timings[-1] if self.timings else None,
            )
            starts = None if last else dict(ray.get(starts_ref, timeout=self.timeout))
            checkpoint.save(
                self.out_dir,
                checkpoint.Checkpoint(
                    fingerprint=fp, trial=trial, round=round_, rounds=rounds, starts=starts
                ),
            )
        self._done, self._done_rows = (trial, round_), len(self.rows)
        if self.cfg.engine.debug_stop_after_round == round_:
            raise SimulatedCrash(f"engine.debug_stop_after_round={round_}: stopping after the checkpoint")

    def finish(self, write: bool = True) -> RunResult:
        clients_t = results.table(self.rows, results.client_schema(self.columns))
        clients = clients_t.to_pandas()
        summary_rows, detection_rows = results.summarize(clients, self.extras, self.columns)
        summary_t = results.table(summary_rows, results.summary_schema(self.columns))
        detection_t = results.table(detection_rows, results.DETECTION_SCHEMA)
        if write:
            results.write_tables(
                self.out_dir, {"clients": clients_t, "summary": summary_t, "detection": detection_t}
            )
        rounds = pd.DataFrame(self.timings)
        if write and not rounds.empty:
            rounds.to_parquet(self.out_dir / "rounds.parquet", index=False)
        return RunResult(
            out_dir=self.out_dir,
            clients=clients,
            summary=summary_t.to_pandas(),
            detection=detection_t.to_pandas(),
            restarts=self.restarts,
            dropouts=self.dropouts,
            actor_pids=self.pids,
            rounds=rounds,
        )


def run_experiment(cfg: ExperimentConfig, progress: Callable[[str], None] | None = None) -> RunResult:
    """Runs an experiment end to end and writes its results to ``cfg.output_dir``.

    Args:
        cfg: The validated config.
        progress: Called with one line per progress event (None: silent).

    Returns:
        The result tables and fault-handling counters.

    Raises:
        EngineError: The run could not complete (what and why in the message).
    """
    return Runner(cfg, progress).run()
