"""Running a sweep on Ray Tune (one full simulation per trial) and gathering its trial directories."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from omegaconf import DictConfig, ListConfig, OmegaConf

from clair_ray import results
from clair_ray.config import ExperimentConfig, from_dict, to_dict, to_yaml
from clair_ray.engine import run_experiment
from clair_ray.engine.session import ray_session
from clair_ray.sweep.spec import (
    Sweep,
    SweepConfig,
    SweepError,
    _column_type,
    candidate_points,
    trial_config,
)


def bundles(cfg: ExperimentConfig, driver_cpus: float) -> list[dict[str, float]]:
    """A trial's placement-group bundles: its driver, each client actor, the aggregator."""
    e = cfg.engine
    actor = {"CPU": e.actor_num_cpus, **({"GPU": e.actor_num_gpus} if e.actor_num_gpus > 0 else {})}
    return (
        [{"CPU": driver_cpus}] + [dict(actor) for _ in range(e.num_actors)] + [{"CPU": e.aggregator_num_cpus}]
    )


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _run_trial(config: dict[str, Any], base: dict[str, Any], keys: list[str], experiment_dir: str) -> None:
    """The Tune trainable: one full simulation with this trial's parameters.

    Its files go straight to the trial's directory under ``storage_path``, not to Tune's
    ``get_trial_dir()``: that is a staging copy in Ray's session dir, synced only when the trial ends, so an
    interrupted trial's engine checkpoint (and any progress a user looks for) would not be there.
    """
    from ray import tune

    ctx = tune.get_context()
    trial_dir = Path(experiment_dir) / f"trial_{ctx.get_trial_id()}"  # = _trial_dirname(trial)
    trial_dir.mkdir(parents=True, exist_ok=True)
    params = {k: _plain(config[k]) for k in keys}
    (trial_dir / "trial.json").write_text(json.dumps({"trial_id": ctx.get_trial_id(), "params": params}))
    cfg = trial_config(from_dict(base), params)
    cfg.output_dir = str(trial_dir / "run")
    cfg.resume = True  # a retried attempt continues after the engine's last checkpoint of the failed one
    run_dir = Path(cfg.output_dir)
    if results.is_complete(run_dir) and (run_dir / "config.yaml").read_text() == to_yaml(cfg):
        # Finished before an interruption that Tune's saved state does not know about yet: reuse.
        summary = pq.read_table(run_dir / "summary.parquet").to_pandas()
    else:
        with open(trial_dir / "attempts.log", "a") as f:  # one line per execution: retries and resumes
            f.write(f"{time.time():.3f} pid={os.getpid()}\n")
        summary = run_experiment(cfg).summary
    last = summary[summary["round"] == summary["round"].max()]
    metrics: dict[str, float] = {}
    for method, g in last.groupby("method"):
        for col in (c for c in g.columns if c.startswith("honest_mean_")):  # the workload's honest means
            metrics[f"{col.removeprefix('honest_mean_')}_{method}"] = float(g[col].mean())
        metrics[f"f1_{method}"] = float(g["f1"].mean())
        if "honest_mean_test_loss" in g:  # LM workloads report a loss, not a parameter error
            metrics[f"loss_{method}"] = float(g["honest_mean_test_loss"].mean())
    tune.report(metrics)


def _complete_trials(exp_dir: Path) -> set[str]:
    """Ids of the trials whose results are complete on disk (what a resumed sweep need not run again)."""
    return {
        tj.parent.name.removeprefix("trial_")
        for tj in exp_dir.glob("*/trial.json")
        if results.is_complete(tj.parent / "run")
    }


def _progress_callback(progress: Callable[[str], None], total: int, exp_dir: Path) -> Any:
    """A Tune callback that prints one line per trial event (Tune's own banner is switched off).

    The done count is of distinct trials complete on disk, so a resumed sweep counts on from the trials that
    finished before (also those that finished while Tune was stopping) and reaches the total.
    Defined in a function so that importing this module does not import Ray Tune (2 s).
    """
    from ray import tune

    class Impl(tune.Callback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.done: set[str] = _complete_trials(exp_dir)
            self.started: dict[str, float] = {}

        def _params(self, trial: Any) -> str:
            return ", ".join(f"{k}={v}" for k, v in trial.config.items())

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started[trial.trial_id] = time.perf_counter()
            progress(f"[sweep {self._elapsed()}] start  {trial.trial_id} ({self._params(trial)})")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done.add(trial.trial_id)
            took = time.perf_counter() - self.started.get(trial.trial_id, self.t0)
            r = trial.last_result or {}
            errors = {k[6:]: v for k, v in r.items() if k.startswith("error_")}
            what = "error"
            if all(math.isnan(v) for v in errors.values()):  # LM workloads: no parameter error, a loss
                errors, what = {k[5:]: v for k, v in r.items() if k.startswith("loss_")}, "test loss"
            best = ", ".join(f"{m} {v:.3g}" for m, v in errors.items())
            progress(
                f"[sweep {self._elapsed()}] done   {trial.trial_id} in {took:.0f}s "
                f"({len(self.done)}/{total}); honest {what}: {best}"
            )

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            progress(f"[sweep {self._elapsed()}] retry  {trial.trial_id} after a failure")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            progress(f"[sweep {self._elapsed()}] FAILED {trial.trial_id} (no retries left)")

        def _elapsed(self) -> str:
            return f"{time.perf_counter() - self.t0:5.0f}s"

    return Impl()


def _n_trials(sc: SweepConfig) -> int:
    n = sc.num_samples
    for s in sc.params.values():
        if s.grid is not None:
            n *= len(s.grid)
    return n


def check_experiment_owner(exp_dir: Path) -> None:
    """Refuses to restore a Tune experiment that another user could have written.

    ``Tuner.restore`` unpickles ``tuner.pkl`` and cloudpickled blobs inside the experiment state, and
    unpickling runs code, so a file there that another user owns or can write could run anything as
    this user. Every file and directory under ``exp_dir`` must be this user's and writable by nobody
    else (group-writable only by the user's own primary group, as under a user-private-group umask).

    Raises:
        SweepError: Naming the first path that fails the check.
    """
    uid, gid = os.getuid(), os.getgid()
    for p in [exp_dir, *sorted(exp_dir.rglob("*"))]:
        st = p.lstat()
        shared = st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid != gid)
        if st.st_uid != uid or shared:
            who = "owned by another user" if st.st_uid != uid else "writable by other users"
            raise SweepError(
                f"sweep.resume=true: {p} is {who}; restoring the sweep would unpickle its state (running "
                "code as you). Resume only sweeps you ran, from storage only you can write, or start a "
                "new one (sweep.overwrite=true or another sweep.name)"
            )


def _check_cluster(sw: Sweep) -> None:
    import ray

    have = ray.cluster_resources()
    for point in candidate_points(sw.sweep):
        need: dict[str, float] = {}
        for b in bundles(trial_config(sw.base, point), sw.sweep.driver_cpus):
            for k, v in b.items():
                need[k] = need.get(k, 0.0) + v
        for k, v in need.items():
            if v > have.get(k, 0.0) + 1e-9:
                raise SweepError(
                    f"one trial reserves {v:g} {k} (sweep.driver_cpus + engine.num_actors x "
                    f"engine.actor_num_cpus + engine.aggregator_num_cpus) at {point}, but the Ray cluster "
                    f"has {have.get(k, 0.0):g}: no trial could ever start"
                )


def run_sweep(sw: Sweep, progress: Callable[[str], None] | None = None) -> Path:
    """Runs (or resumes) the sweep and gathers the results.

    Args:
        sw: The loaded sweep.
        progress: Called with one line per trial event (None: silent).

    Returns:
        The gathered results directory.

    Raises:
        SweepError: The sweep cannot start, or some trial failed for good (results of the others are
            gathered first).
    """
    # Before Ray or Tune start: trials must not chdir (relative paths break),
    # and Tune's banner and default loggers are noise here; our callback prints the progress.
    for k, v in (
        ("RAY_CHDIR_TO_TRIAL_DIR", "0"),
        ("RAY_AIR_NEW_OUTPUT", "0"),
        ("RAY_USAGE_STATS_ENABLED", "0"),
    ):
        os.environ.setdefault(k, v)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0" if sw.sweep.tune_loggers else "1"
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    say = progress or (lambda _m: None)
    sc = sw.sweep
    exp_dir = sw.experiment_dir
    if exp_dir.exists() and sc.overwrite:
        for d in (exp_dir, sw.results_dir):
            shutil.rmtree(d, ignore_errors=True)
    if exp_dir.exists() and not sc.resume:
        raise SweepError(
            f"{exp_dir} exists: set sweep.resume=true to continue that sweep, sweep.overwrite=true to "
            "replace it, or choose another sweep.name"
        )
    keys = list(sc.params)
    base = to_dict(sw.base)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=base, keys=keys, experiment_dir=str(exp_dir)),
        lambda config: tune.PlacementGroupFactory(
            bundles(trial_config(sw.base, {k: _plain(config[k]) for k in keys}), sc.driver_cpus)
        ),
    )
    with ray_session(sw.base):
        _check_cluster(sw)
        callbacks = [_progress_callback(say, _n_trials(sc), exp_dir)]
        if sc.resume and tune.Tuner.can_restore(str(exp_dir)):
            check_experiment_owner(exp_dir)
            say(f"resuming {exp_dir}: finished trials are kept, the others run")
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, restart_errored=True)
            # restore() brings back the callbacks pickled by the first run (printing through that process's
            # progress function); Tuner has no public way to replace them, so swap in this run's.
            tuner._local_tuner._run_config.callbacks = callbacks  # noqa: SLF001
        else:
            if sc.resume:
                say(f"sweep.resume=true but {exp_dir} holds no sweep to restore: starting it")
            space = {}
            for k, s in sc.params.items():
                if s.grid is not None:
                    space[k] = tune.grid_search(list(s.grid))
                elif s.choice is not None:
                    space[k] = tune.choice(list(s.choice))
                elif s.uniform is not None:
                    space[k] = tune.uniform(*s.uniform)
                else:
                    space[k] = tune.loguniform(*s.loguniform)  # type: ignore[misc]
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    num_samples=sc.num_samples,
                    # Tune ignores max_concurrent_trials when given a BasicVariantGenerator: set it there
                    search_alg=BasicVariantGenerator(
                        random_state=sc.seed, max_concurrent=sc.max_concurrent_trials or 0
                    ),
                    trial_dirname_creator=_trial_dirname,
                    trial_name_creator=lambda t: t.trial_id,
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=sc.name,
                    storage_path=sc.storage_path,
                    failure_config=tune.FailureConfig(max_failures=sc.max_failures),
                    callbacks=callbacks,
                    verbose=0,
                ),
            )
        say(f"sweep {sc.name}: {_n_trials(sc)} trial(s), experiment dir {exp_dir}")
        grid = tuner.fit()
    failed = [r for r in grid if r.error is not None]
    out = gather(sw)
    if failed:
        raise SweepError(
            f"{len(failed)} trial(s) failed after sweep.max_failures={sc.max_failures} retries; results of "
            f"the others are in {out}; first error: {str(failed[0].error).strip().splitlines()[-1]}"
        )
    trials = pq.read_table(out / "trials.parquet").to_pandas()
    if len(trials) < _n_trials(sc) or (trials["status"] != "complete").any():
        # Tune returns normally after a Ctrl+C; say so instead of pretending the sweep is done.
        done = int((trials["status"] == "complete").sum())
        raise SweepError(
            f"the sweep stopped with {done} of {_n_trials(sc)} trials complete (interrupted?); results so "
            f"far are in {out}; run it again with sweep.resume=true to finish the others"
        )
    return out


def gather(sw: Sweep) -> Path:
    """Writes the sweep's gathered dataset from its trial directories (:func:`clair_ray.results.gather`).

    Returns:
        The results directory.
    """
    dtypes = {k: _column_type(s) for k, s in sw.sweep.params.items()}
    base = OmegaConf.create(to_yaml(sw.base))
    doc = OmegaConf.create({"sweep": OmegaConf.structured(sw.sweep), "base": base})
    return results.gather(sw.experiment_dir, sw.results_dir, dtypes, OmegaConf.to_yaml(doc))
