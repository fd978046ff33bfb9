"""Ray Tune sweeps over experiment configs: ``clair-ray sweep CONFIG [key=value ...]``.

A sweep file is an experiment config (the same schema as ``clair-ray run``; ``base: other.yaml`` merges the
given keys onto another config file, resolved next to the sweep file) plus a ``sweep:`` section::

    base: linear_small.yaml
    workload: {num_clients: 12}
    sweep:
      name: small
      storage_path: results/sweeps
      num_samples: 1            # repeats of every grid point (random parameters are drawn per sample)
      max_failures: 1           # retries of a failing trial
      params:
        contamination.fraction: {grid: [0.1, 0.3]}
        workload.noise_std: {loguniform: [0.05, 0.5]}

Every trial runs one full simulation (:func:`clair_ray.engine.run_experiment`) on its own client and
aggregator actors. Tune reserves a placement group per trial with one bundle for the trial's driver and one
per actor; actors created inside the trial land in that group (Tune captures child tasks), so a trial
either gets all of its actors or does not start, trials never deadlock, and as many run at once as the
cluster has room for. Every trial's config is built and validated before Tune starts.

Faults: a failing trial is retried up to ``sweep.max_failures`` times and resumes from its engine
checkpoint. Ctrl+C lets Tune stop (running trials end, no new ones start) and the command exits 1;
``sweep.resume=true`` then restores the Tune experiment and runs what did not finish. A trial whose results
are complete on disk is never simulated again, even where Tune's saved state missed its end.

Output, all under ``sweep.storage_path``:

- ``<name>/``: Tune's experiment directory, one ``trial_<id>/`` per trial holding ``trial.json`` (its
  parameters), ``attempts.log`` (one line per execution) and ``run/`` (the engine's run directory; a
  retried attempt resumes from the engine's last checkpoint there);
- ``<name>-results/``: the gathered dataset: ``clients/``, ``summary/`` and ``detection/`` (Parquet, hive
  partitioned by ``sweep_trial``, the single-run schema plus one column per swept parameter, named by its
  dotted key), ``trials.parquet`` (one row per trial: status, attempts, error, parameters) and
  ``sweep.yaml`` (the resolved sweep). :func:`clair_ray.report.read_sweep` loads it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clair_ray.config import ConfigError, ExperimentConfig, to_dict, to_yaml, validate

TABLES = ("clients", "summary", "detection")
PARTITION = "sweep_trial"
KINDS = ("grid", "choice", "uniform", "loguniform")
# Sweeping these would not change a result, or would break the trial layout.
NOT_SWEEPABLE = ("output_dir", "resume", "name", "ray")


class SweepError(RuntimeError):
    """The sweep cannot start or did not complete (what and why in the message)."""


@dataclass
class ParamSpec:
    """How one config key varies: exactly one of the fields is set.

    Attributes:
        grid: Every value, crossed with the other grid parameters.
        choice: Values drawn uniformly at random per sample.
        uniform: [low, high], drawn uniformly per sample.
        loguniform: [low, high] with 0 < low, drawn log-uniformly per sample.
    """

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: list[float] | None = None
    loguniform: list[float] | None = None


@dataclass
class SweepConfig:
    """The ``sweep:`` section.

    Attributes:
        name: Tune experiment name (the directory under ``storage_path``).
        storage_path: Where Tune's experiment directory and the gathered results go (made absolute).
        params: Dotted config key -> how it varies.
        num_samples: Repeats of the grid (random parameters are drawn anew for each).
        max_failures: How often a failing trial is retried (it resumes from its engine checkpoint).
        max_concurrent_trials: Upper bound on trials at once (None: as many as the resources allow).
        resume: Restore an interrupted sweep of the same name and run only the trials that did not finish.
        driver_cpus: CPUs reserved for each trial's driver (the function that runs the round loop).
        seed: Seed of Tune's random sampling (random search is reproducible).
    """

    name: str = "sweep"
    storage_path: str = "results/sweeps"
    params: dict[str, ParamSpec] = field(default_factory=dict)
    num_samples: int = 1
    max_failures: int = 1
    max_concurrent_trials: int | None = None
    resume: bool = False
    driver_cpus: float = 0.25
    seed: int = 0


@dataclass
class Sweep:
    """A loaded, validated sweep.

    Attributes:
        base: The experiment config every trial starts from (its ``output_dir``/``resume`` are replaced).
        sweep: The sweep section.
        source: The file it came from.
    """

    base: ExperimentConfig
    sweep: SweepConfig
    source: Path | None = None

    @property
    def experiment_dir(self) -> Path:
        """Tune's experiment directory."""
        return Path(self.sweep.storage_path) / self.sweep.name

    @property
    def results_dir(self) -> Path:
        """The gathered Parquet dataset, beside the experiment directory."""
        return Path(self.sweep.storage_path) / f"{self.sweep.name}-results"


def _config_error(exc: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return ConfigError(f"{prefix}{key}: {msg}" if key else f"{prefix}{msg}")


def trial_config(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The base config with one trial's parameter values set (type-checked by the schema, validated).

    Args:
        base: The base experiment config.
        params: Dotted key -> value.

    Returns:
        The validated trial config.

    Raises:
        ConfigError: Unknown key, wrong type or out-of-range value (the message names the trial's values).
    """
    node = OmegaConf.structured(base)
    try:
        for key, value in params.items():
            OmegaConf.update(node, key, value, merge=False)
        cfg = OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        raise _config_error(exc, f"sweep.params {params}: ") from exc
    assert isinstance(cfg, ExperimentConfig)
    try:
        return validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"sweep.params {params}: {exc}") from exc


def _check_params(sc: SweepConfig) -> list[str]:
    errors = []
    for key, spec in sc.params.items():
        where = f"sweep.params.{key}"
        if key.split(".")[0] in NOT_SWEEPABLE:
            errors.append(f"{where}: {key.split('.')[0]} cannot be swept (it changes no result)")
        set_kinds = [k for k in KINDS if getattr(spec, k) is not None]
        if len(set_kinds) != 1:
            errors.append(f"{where}: give exactly one of {list(KINDS)} (got {set_kinds or 'none'})")
            continue
        kind = set_kinds[0]
        values = list(getattr(spec, kind))
        if kind in ("grid", "choice") and not values:
            errors.append(f"{where}.{kind}={values}: must not be empty")
        if kind in ("uniform", "loguniform"):
            ok = (
                len(values) == 2 and all(isinstance(v, int | float) for v in values) and values[0] < values[1]
            )
            if not ok:
                errors.append(f"{where}.{kind}={values}: must be [low, high] with low < high")
            elif kind == "loguniform" and values[0] <= 0:
                errors.append(f"{where}.{kind}={values}: low must be > 0")
    if sc.num_samples < 1:
        errors.append(f"sweep.num_samples={sc.num_samples}: must be >= 1")
    if sc.max_failures < 0:
        errors.append(f"sweep.max_failures={sc.max_failures}: must be >= 0")
    if sc.max_concurrent_trials is not None and sc.max_concurrent_trials < 1:
        errors.append(f"sweep.max_concurrent_trials={sc.max_concurrent_trials}: must be >= 1 (or null)")
    if not (sc.driver_cpus > 0):
        errors.append(f"sweep.driver_cpus={sc.driver_cpus}: must be > 0")
    if not sc.name or "/" in sc.name:
        errors.append(f"sweep.name={sc.name!r}: must be a non-empty directory name")
    return errors


def candidate_points(sc: SweepConfig) -> list[dict[str, Any]]:
    """Parameter sets that cover every value a trial can get.

    Every grid point, and at the first grid point each choice value and each range end of the random
    parameters, one at a time (ranges are intervals: their ends bound what validation sees in between).
    """
    grid_keys = [k for k, s in sc.params.items() if s.grid is not None]
    rand = {k: s for k, s in sc.params.items() if s.grid is None}
    first_rand = {k: (s.choice or s.uniform or s.loguniform)[0] for k, s in rand.items()}  # type: ignore[index]
    grid = [
        dict(zip(grid_keys, vals, strict=True))
        for vals in itertools.product(*(sc.params[k].grid for k in grid_keys))
    ]  # type: ignore[misc]
    points = [{**g, **first_rand} for g in grid]
    for k, s in rand.items():
        for v in s.choice or s.uniform or s.loguniform or []:
            points.append({**grid[0], **first_rand, k: v})
    return points


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Loads a sweep file, applies overrides and validates every trial's config before anything runs.

    Args:
        path: The sweep YAML.
        overrides: ``key=value``; keys under ``sweep.`` set the sweep section, ``base=FILE`` replaces the
            base config file, other keys set the base config.

    Returns:
        The sweep, with ``storage_path`` absolute.

    Raises:
        ConfigError: Any bad key or value, in the sweep section or in any trial's config.
    """
    path = Path(path)
    raw = OmegaConf.load(path)
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
    # sweep.params.<dotted.config.key>={grid: [...]}: the whole rest is ONE parameter name (a dotlist
    # would nest it), so these are set on the params mapping directly, replacing the file's spec.
    param_over = [o for o in overrides or [] if o.startswith("sweep.params.")]
    sweep_over = [o for o in overrides or [] if o.startswith("sweep.") and o not in param_over]
    base_over = [o for o in overrides or [] if not o.startswith(("sweep.", "base="))]
    new_base = [o.split("=", 1)[1] for o in overrides or [] if o.startswith("base=")]
    section = raw.pop("sweep", None)
    if section is None:
        raise ConfigError(f"{path}: no sweep: section (use clair-ray run for a single experiment)")
    base_file = new_base[-1] if new_base else raw.pop("base", None)  # base=FILE swaps the base config
    raw.pop("base", None)
    try:
        parts: list[Any] = [OmegaConf.structured(ExperimentConfig)]
        if base_file is not None:
            bpath = Path(str(base_file))
            if not bpath.is_absolute() and (path.parent / bpath).exists():
                bpath = path.parent / bpath
            if not bpath.exists():
                raise ConfigError(f"base={base_file!r}: no such file (looked next to {path} and in the cwd)")
            parts.append(OmegaConf.load(bpath))
        parts.append(raw)
        if base_over:
            parts.append(OmegaConf.from_dotlist(base_over))
        base = OmegaConf.to_object(OmegaConf.merge(*parts))
    except OmegaConfBaseException as exc:
        raise _config_error(exc) from exc
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), section)
        if sweep_over:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([o[len("sweep.") :] for o in sweep_over]))
        for item in param_over:
            key, value = item[len("sweep.params.") :].split("=", 1)
            spec = yaml.safe_load(value)
            if not isinstance(spec, dict):
                raise ConfigError(f"override {item!r}: expected sweep.params.KEY={{grid: [...]}} (a mapping)")
            merged.params.pop(key, None)  # replace the file's spec, do not merge into it
            merged = OmegaConf.merge(
                merged, {"params": {key: OmegaConf.merge(OmegaConf.structured(ParamSpec), spec)}}
            )
        sc = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _config_error(exc, "sweep.") from exc
    assert isinstance(base, ExperimentConfig) and isinstance(sc, SweepConfig)
    validate(base)
    errors = _check_params(sc)
    if errors:
        raise ConfigError("invalid sweep:\n  " + "\n  ".join(errors))
    sc.storage_path = str(Path(sc.storage_path).expanduser().resolve())  # Tune needs an absolute path
    for point in candidate_points(sc):
        trial_config(base, point)
    return Sweep(base=base, sweep=sc, source=path)


def bundles(cfg: ExperimentConfig, driver_cpus: float) -> list[dict[str, float]]:
    """A trial's placement-group bundles: its driver, each client actor, the aggregator."""
    e = cfg.engine
    actor = {"CPU": e.actor_num_cpus, **({"GPU": e.actor_num_gpus} if e.actor_num_gpus > 0 else {})}
    return (
        [{"CPU": driver_cpus}] + [dict(actor) for _ in range(e.num_actors)] + [{"CPU": e.aggregator_num_cpus}]
    )


def _column_type(spec: ParamSpec) -> pa.DataType:
    values = spec.grid if spec.grid is not None else spec.choice
    if values is None:
        return pa.float64()
    if all(isinstance(v, bool) for v in values):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return pa.int64()
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return pa.float64()
    if all(isinstance(v, str) for v in values):
        return pa.string()
    return pa.string()  # lists and mappings, as JSON


def _column_value(value: Any, dtype: pa.DataType) -> Any:
    if dtype == pa.string() and not isinstance(value, str):
        return json.dumps(value, sort_keys=True)
    if dtype == pa.float64():
        return float(value)
    return value


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def _complete(run_dir: Path) -> bool:
    """Whether a run directory holds all result tables (the engine writes them last, each atomically)."""
    return all((run_dir / f"{n}.parquet").exists() for n in TABLES)


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _run_trial(config: dict[str, Any], base: dict[str, Any], keys: list[str], experiment_dir: str) -> None:
    """The Tune trainable: one full simulation with this trial's parameters.

    Its files go straight to the trial's directory under ``storage_path``, not to Tune's
    ``get_trial_dir()``: that is a staging copy in Ray's session dir, synced only when the trial ends, so an
    interrupted trial's engine checkpoint (and any progress a user looks for) would not be there.
    """
    from ray import tune

    from clair_ray.config import from_dict
    from clair_ray.engine import run_experiment

    ctx = tune.get_context()
    trial_dir = Path(experiment_dir) / f"trial_{ctx.get_trial_id()}"  # = _trial_dirname(trial)
    trial_dir.mkdir(parents=True, exist_ok=True)
    params = {k: _plain(config[k]) for k in keys}
    (trial_dir / "trial.json").write_text(json.dumps({"trial_id": ctx.get_trial_id(), "params": params}))
    cfg = trial_config(from_dict(base), params)
    cfg.output_dir = str(trial_dir / "run")
    cfg.resume = True  # a retried attempt continues after the engine's last checkpoint of the failed one
    run_dir = Path(cfg.output_dir)
    if _complete(run_dir) and (run_dir / "config.yaml").read_text() == to_yaml(cfg):
        # Finished before an interruption that Tune's saved state does not know about yet: reuse.
        summary = pq.read_table(run_dir / "summary.parquet").to_pandas()
    else:
        with open(trial_dir / "attempts.log", "a") as f:  # one line per execution: retries and resumes
            f.write(f"{time.time():.3f} pid={os.getpid()}\n")
        summary = run_experiment(cfg).summary
    last = summary[summary["round"] == summary["round"].max()]
    metrics: dict[str, float] = {}
    for method, g in last.groupby("method"):
        metrics[f"error_{method}"] = float(g["honest_mean_error"].mean())
        metrics[f"f1_{method}"] = float(g["f1"].mean())
        if "honest_mean_test_loss" in g:  # LM workloads report a loss, not a parameter error
            metrics[f"loss_{method}"] = float(g["honest_mean_test_loss"].mean())
    tune.report(metrics)


def _progress_callback(progress: Callable[[str], None], total: int) -> Any:
    """A Tune callback that prints one line per trial event (Tune's own banner is switched off).

    Defined in a function so that importing this module does not import Ray Tune (2 s).
    """
    from ray import tune

    class Impl(tune.Callback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.done = 0
            self.started: dict[str, float] = {}

        def _params(self, trial: Any) -> str:
            return ", ".join(f"{k}={v}" for k, v in trial.config.items())

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started[trial.trial_id] = time.perf_counter()
            progress(f"[sweep {self._elapsed()}] start  {trial.trial_id} ({self._params(trial)})")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            took = time.perf_counter() - self.started.get(trial.trial_id, self.t0)
            r = trial.last_result or {}
            errors = {k[6:]: v for k, v in r.items() if k.startswith("error_")}
            what = "error"
            if errors and all(math.isnan(v) for v in errors.values()):
                errors, what = {k[5:]: v for k, v in r.items() if k.startswith("loss_")}, "test loss"
            best = ", ".join(f"{m} {v:.3g}" for m, v in errors.items())
            progress(
                f"[sweep {self._elapsed()}] done   {trial.trial_id} in {took:.0f}s "
                f"({self.done}/{total}); honest {what}: {best}"
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
    # Before Ray or Tune start (RAY-NOTES "Ray Tune"): trials must not chdir (relative paths break),
    # and Tune's banner and default loggers are noise here; our callback prints the progress.
    for k, v in (
        ("RAY_CHDIR_TO_TRIAL_DIR", "0"),
        ("RAY_AIR_NEW_OUTPUT", "0"),
        ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"),
        ("RAY_USAGE_STATS_ENABLED", "0"),
    ):
        os.environ.setdefault(k, v)
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from clair_ray.engine.runner import ray_session

    say = progress or (lambda _m: None)
    sc = sw.sweep
    exp_dir = sw.experiment_dir
    if exp_dir.exists() and not sc.resume:
        raise SweepError(
            f"{exp_dir} exists: set sweep.resume=true to continue that sweep, or choose another sweep.name"
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
        callbacks = [_progress_callback(say, _n_trials(sc))]
        if sc.resume and tune.Tuner.can_restore(str(exp_dir)):
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
    """Writes the gathered dataset from the trial directories (re-gathering is idempotent).

    Returns:
        The results directory.
    """
    out = sw.results_dir
    out.mkdir(parents=True, exist_ok=True)
    dtypes = {k: _column_type(s) for k, s in sw.sweep.params.items()}
    rows = []
    for tj in sorted(sw.experiment_dir.glob("*/trial.json")):
        info = json.loads(tj.read_text())
        trial_id, params = info["trial_id"], info["params"]
        run_dir = tj.parent / "run"
        attempts_log = tj.parent / "attempts.log"
        attempts = len(attempts_log.read_text().splitlines()) if attempts_log.exists() else 0
        complete = _complete(run_dir)
        rows.append(
            {
                PARTITION: trial_id,
                "status": "complete" if complete else "incomplete",
                "attempts": attempts,
                "trial_dir": str(tj.parent),
                **{k: _column_value(params[k], dtypes[k]) for k in dtypes},
            }
        )
        if not complete:
            continue
        for name in TABLES:
            t = pq.read_table(run_dir / f"{name}.parquet")
            for k, dt in dtypes.items():
                t = t.append_column(pa.field(k, dt), pa.array([_column_value(params[k], dt)] * len(t), dt))
            part = out / name / f"{PARTITION}={trial_id}"
            part.mkdir(parents=True, exist_ok=True)
            tmp = part / ".part-0.parquet.tmp"
            pq.write_table(t, tmp)
            tmp.replace(part / "part-0.parquet")
    schema = pa.schema(
        [
            (PARTITION, pa.string()),
            ("status", pa.string()),
            ("attempts", pa.int64()),
            ("trial_dir", pa.string()),
        ]
        + [(k, dt) for k, dt in dtypes.items()]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "trials.parquet")
    doc = OmegaConf.create(
        {"sweep": OmegaConf.structured(sw.sweep), "base": OmegaConf.create(to_yaml(sw.base))}
    )
    (out / "sweep.yaml").write_text(OmegaConf.to_yaml(doc))
    return out
