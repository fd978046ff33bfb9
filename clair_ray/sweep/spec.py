"""A sweep file: its typed ``sweep:`` section, parsing, and validation of every trial's config before Tune
starts (see :mod:`clair_ray.sweep` for the file format)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clair_ray.config import ConfigError, ExperimentConfig, build_config, replace_mappings, validate

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
        overwrite: Delete an existing sweep of the same name (its experiment and gathered directories)
            first. Without ``resume`` or ``overwrite`` an existing sweep directory is refused.
        driver_cpus: CPUs reserved for each trial's driver (the function that runs the round loop).
        seed: Seed of Tune's random sampling (random search is reproducible).
        tune_loggers: Keep Ray Tune's own per-trial loggers (CSV, JSON and TensorBoard files in each trial's
            directory under ``storage_path/name``; ``tensorboard --logdir STORAGE_PATH/NAME``).
    """

    name: str = "sweep"
    storage_path: str = "results/sweeps"
    params: dict[str, ParamSpec] = field(default_factory=dict)
    num_samples: int = 1
    max_failures: int = 1
    max_concurrent_trials: int | None = None
    resume: bool = False
    overwrite: bool = False
    driver_cpus: float = 0.25
    seed: int = 0
    tune_loggers: bool = False


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
    if sc.resume and sc.overwrite:
        errors.append("sweep.overwrite=true: cannot be combined with sweep.resume=true")
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
    if any(o.split("=", 1)[0].strip() == "output_dir" for o in base_over):
        raise ConfigError(
            "output_dir: a sweep writes every trial under sweep.storage_path/<sweep.name> (and gathers to "
            "<sweep.name>-results there); set sweep.storage_path=DIR instead"
        )
    new_base = [o.split("=", 1)[1] for o in overrides or [] if o.startswith("base=")]
    section = raw.pop("sweep", None)
    if section is None:
        raise ConfigError(f"{path}: no sweep: section (use clair-ray run for a single experiment)")
    base_file = new_base[-1] if new_base else raw.pop("base", None)  # base=FILE swaps the base config
    raw.pop("base", None)
    try:
        parts: list[Any] = []
        if base_file is not None:
            bpath = Path(str(base_file))
            if not bpath.is_absolute() and (path.parent / bpath).exists():
                bpath = path.parent / bpath
            if not bpath.exists():
                raise ConfigError(f"base={base_file!r}: no such file (looked next to {path} and in the cwd)")
            parts.append(OmegaConf.load(bpath))
        parts.append(raw)
        if base_over:
            replace_mappings(parts, base_over)
            parts.append(OmegaConf.from_dotlist(base_over))
    except OmegaConfBaseException as exc:
        raise _config_error(exc) from exc
    base = build_config(parts)
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
