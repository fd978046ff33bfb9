"""Typed experiment configs: OmegaConf structured dataclasses, each section validated in its own
``__post_init__``.

A config file is read, the ``plugins`` it names are imported (so their registrations exist), the
``workload.name`` it gives selects the workload's own section dataclass (registered with the workload:
``clair_ray.workloads.base.register_workload``), and the file and the ``key=value`` overrides are merged
onto that schema, so unknown keys and wrongly typed values are rejected by OmegaConf with the full key
named. Building the dataclasses runs every section's ``__post_init__``, which names the full key and the
bad value (``contamination.fraction=1.5: must be in [0, 1)``); the cross-section checks run in
:class:`ExperimentConfig`'s. Valid method, attack and workload names come from the registries, never from
a list kept here. Nothing starts before the config is valid.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clair_ray.aggregators import AGGREGATORS
from clair_ray.attacks import ATTACKS
from clair_ray.errors import ConfigError
from clair_ray.workloads import LinearConfig
from clair_ray.workloads.base import WorkloadConfig, check_fields, get_workload_class

__all__ = [
    "AggregationConfig",
    "build_config",
    "ConfigError",
    "ContaminationConfig",
    "EngineConfig",
    "ExperimentConfig",
    "RayConfig",
    "fingerprint",
    "from_dict",
    "import_plugins",
    "load_config",
    "plugin_paths",
    "replace_mappings",
    "to_dict",
    "to_yaml",
    "unlisted_registrations",
    "validate",
]

#: The built-in methods a config runs when it names none (any registered method may be named).
DEFAULT_METHODS = tuple("clair fedavg local oracle median trimmed_mean multi_krum geometric_median".split())
NOISE_SCALES = ("reported", "inv_sqrt_n", "none")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


@dataclass
class RayConfig:
    """How to reach Ray.

    Attributes:
        address: None starts Ray inside this process; ``auto`` or ``HOST:PORT`` attaches to a running
            cluster (then the local resource options below are ignored, as Ray requires).
        num_cpus: CPUs of the in-process Ray instance (None: all of the machine's).
        num_gpus: GPUs of the in-process Ray instance (None: detected).
        object_store_mb: Object store size of the in-process instance in MiB (None: Ray's default).
        include_dashboard: Start the dashboard with the in-process instance.
    """

    address: str | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    object_store_mb: int | None = None
    include_dashboard: bool = False

    def __post_init__(self) -> None:
        check_fields(
            "ray",
            [
                (
                    self.num_cpus is None or (_finite(self.num_cpus) and self.num_cpus > 0),
                    "num_cpus",
                    self.num_cpus,
                    "must be finite and > 0",
                ),
                (
                    self.num_gpus is None or (_finite(self.num_gpus) and self.num_gpus >= 0),
                    "num_gpus",
                    self.num_gpus,
                    "must be finite and >= 0",
                ),
                (
                    self.object_store_mb is None or self.object_store_mb >= 75,
                    "object_store_mb",
                    self.object_store_mb,
                    "must be >= 75 (Ray's minimum)",
                ),
            ],
        )


@dataclass
class EngineConfig:
    """Actors, timeouts and fault handling.

    Attributes:
        num_actors: Client actors; each serves many virtual clients.
        actor_num_cpus: CPUs reserved by each client actor (fractions allowed).
        actor_num_gpus: GPUs reserved by each client actor (fractions allowed).
        aggregator_num_cpus: CPUs reserved by the aggregator actor.
        batch_size: Virtual clients per actor call; batches are fixed by client id, not by actor.
        max_restarts: How often a dead client actor is restarted (its work is re-submitted).
        call_timeout_s: Every wait on an actor gives up after this many seconds.
        min_clients: A round fails unless at least this many clients report (0: at least one).
        checkpoint: Write a checkpoint after each round.
        debug_delay_s: Test hook: each client training call and each aggregation sleeps this long first.
        debug_marker_dir: Test hook: each client training call and each aggregation first writes a marker
            file (holding the actor's pid) here, so a test can tell a call is in flight.
        debug_fail_clients: Test hook: these client ids raise inside the actor.
        debug_nonfinite_clients: Test hook: these client ids send a non-finite update (any workload).
        debug_stop_after_round: Test hook: stop (as if the driver crashed) after checkpointing this round.
    """

    num_actors: int = 2
    actor_num_cpus: float = 0.5
    actor_num_gpus: float = 0.0
    aggregator_num_cpus: float = 0.5
    batch_size: int = 8
    max_restarts: int = 3
    call_timeout_s: float = 600.0
    min_clients: int = 0
    checkpoint: bool = True
    debug_delay_s: float = 0.0
    debug_marker_dir: str | None = None
    debug_fail_clients: list[int] = field(default_factory=list)
    debug_nonfinite_clients: list[int] = field(default_factory=list)
    debug_stop_after_round: int | None = None

    def __post_init__(self) -> None:
        check_fields(
            "engine",
            [
                (self.num_actors >= 1, "num_actors", self.num_actors, "must be >= 1"),
                (
                    _finite(self.actor_num_cpus) and self.actor_num_cpus > 0,
                    "actor_num_cpus",
                    self.actor_num_cpus,
                    "must be finite and > 0",
                ),
                (self.actor_num_gpus >= 0, "actor_num_gpus", self.actor_num_gpus, "must be >= 0"),
                (
                    self.aggregator_num_cpus > 0,
                    "aggregator_num_cpus",
                    self.aggregator_num_cpus,
                    "must be > 0",
                ),
                (self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1"),
                (self.max_restarts >= 0, "max_restarts", self.max_restarts, "must be >= 0"),
                (
                    _finite(self.call_timeout_s) and self.call_timeout_s > 0,
                    "call_timeout_s",
                    self.call_timeout_s,
                    "must be finite and > 0",
                ),
                (self.min_clients >= 0, "min_clients", self.min_clients, "must be >= 0"),
                (self.debug_delay_s >= 0, "debug_delay_s", self.debug_delay_s, "must be >= 0"),
            ],
        )


@dataclass
class ContaminationConfig:
    """Which clients are contaminated and how.

    Attributes:
        fraction: Fraction of clients contaminated, chosen by a seeded rule (default 0: a clean run).
        mix: Attack kind -> weight (registered update attacks and ``data_<kind>`` data attacks), split
            exactly by ``clair_ray.attacks.assign_attacks``. Empty by default so that a file's mix
            replaces it instead of merging.
        params: Attack kind -> keyword parameters for that attack.
    """

    fraction: float = 0.0
    mix: dict[str, float] = field(default_factory=dict)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(
            "contamination",
            [(0 <= self.fraction < 1, "fraction", self.fraction, "must be in [0, 1)")]
            + [(_finite(w) and w >= 0, f"mix.{k}", w, "must be finite and >= 0") for k, w in self.mix.items()]
            + [
                (
                    self.fraction == 0 or sum(self.mix.values()) > 0,
                    "mix",
                    dict(self.mix),
                    "needs a positive weight",
                )
            ],
        )


def _quarantine_ok(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict) or set(value) != {"q", "m"}:
        return False
    q, m = value["q"], value["m"]
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (q, m))
    return ints and 1 <= q <= m


@dataclass
class AggregationConfig:
    """Methods compared in a run.

    Attributes:
        methods: Methods run side by side on the same updates (registered aggregators, and methods a
            workload implements itself, such as the LoRA workloads' ``fedavg_honest`` and ``local_early``).
        rank: Rank of the detection subspace CLAIR uses (None: CLAIR chooses it from the data, the largest
            drop of the robust fit's residual, where the workload supports it).
        refine: How much of each detected-honest client's centred deviation CLAIR's refinement keeps (the
            oracle uses the same rule on the true honest set): ``auto`` (default) chooses per module and
            side from the data (parallel analysis, README "Choosing the refinement"); an integer j keeps
            the j leading directions (0: the detected-honest mean; the deviations' rank: local training);
            ``heldout`` (one-shot LoRA workloads with ``workload.lora.holdout`` > 0) chooses a rank and a
            shrinkage of the deviation from a small grid by the clients' loss on their held-back rows.
        assumed_fraction: Contamination fraction assumed by baselines that need a number of attackers
            (None: the configured ``contamination.fraction``). CLAIR never sees it.
        noise_scale: The per-client relative noise level given to methods (``ctx.noise_scale``):
            ``reported`` (default): what each client computed from its own inputs (linear workload:
            sqrt(tr((X_kᵀX_k)⁻¹)), exactly proportional to its OLS error); ``inv_sqrt_n``: 1/sqrt(n_k),
            which understates the noise of clients with n_k close to p; ``none``.
        params: Method -> keyword parameters for its constructor.
        quarantine: Multi-round LoRA runs: ``{q: .., m: ..}`` leaves a client out of CLAIR's aggregation
            while CLAIR flagged it in at least q of the last m rounds it took part in (reason
            ``quarantine``); null: each round on its own evidence.
    """

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    rank: int | None = None
    refine: int | str = "auto"
    assumed_fraction: float | None = None
    noise_scale: str = "reported"
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    quarantine: dict[str, int] | None = None

    def __post_init__(self) -> None:
        af = self.assumed_fraction
        check_fields(
            "aggregation",
            [
                (len(self.methods) >= 1, "methods", list(self.methods), "must name at least one method"),
                (
                    len(set(self.methods)) == len(self.methods),
                    "methods",
                    list(self.methods),
                    "has duplicates",
                ),
                (self.rank is None or self.rank >= 1, "rank", self.rank, "must be >= 1 (or null)"),
                (
                    self.refine in ("auto", "heldout")
                    or (
                        isinstance(self.refine, int)
                        and not isinstance(self.refine, bool)
                        and self.refine >= 0
                    ),
                    "refine",
                    self.refine,
                    "must be 'auto', 'heldout' or an integer >= 0",
                ),
                (af is None or 0 <= af < 0.5, "assumed_fraction", af, "must be in [0, 0.5)"),
                (
                    _quarantine_ok(self.quarantine),
                    "quarantine",
                    self.quarantine,
                    "must be null or {q, m} with integers 1 <= q <= m",
                ),
                (
                    self.noise_scale in NOISE_SCALES,
                    "noise_scale",
                    self.noise_scale,
                    f"must be one of {list(NOISE_SCALES)}",
                ),
            ],
        )


@dataclass
class ExperimentConfig:
    """One experiment.

    Attributes:
        name: Experiment name (used in the run directory name).
        seed: Root seed; every random number derives from it through numpy's SeedSequence.
        trials: Independent repetitions (trial t draws a fresh problem from (seed, t)).
        output_dir: Where results go (a run writes into this directory).
        resume: Continue from the last checkpoint in ``output_dir``.
        overwrite: Empty a non-empty ``output_dir`` first. Without ``resume`` or ``overwrite`` a run refuses
            an ``output_dir`` that holds files (results are never silently replaced).
        tensorboard: Also write every round's summary metrics (per method) as TensorBoard event files to
            ``output_dir/tensorboard`` (``tensorboard --logdir OUTPUT_DIR/tensorboard``).
        export_adapters: After each trial's last round, write every method's final models under
            ``output_dir/adapters/trial<t>/<method>/`` (LoRA workloads: peft adapter directories that
            ``PeftModel.from_pretrained`` loads, and the shared dense correction as
            ``correction.safetensors``; README "Federated fine-tuning over rounds").
        plugins: Python modules imported before the config is validated, in the driver and in every actor
            (each may register aggregators, attacks or workloads). Only the config file or command line
            a user gives names them; a results directory's saved config never imports anything.
        workload: The workload's own section (its dataclass is chosen by ``workload.name``).
        contamination: The contamination.
        aggregation: The methods.
        engine: Actors and fault handling.
        ray: How to reach Ray.
    """

    name: str = "experiment"
    seed: int = 0
    trials: int = 1
    output_dir: str = "results/run"
    resume: bool = False
    overwrite: bool = False
    tensorboard: bool = False
    export_adapters: bool = False
    plugins: list[str] = field(default_factory=list)
    workload: WorkloadConfig = field(default_factory=LinearConfig)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        K, g = self.workload.num_clients, self.engine
        checks = [
            (self.trials >= 1, "trials", self.trials, "must be >= 1"),
            (self.seed >= 0, "seed", self.seed, "must be >= 0"),
            (bool(self.output_dir), "output_dir", self.output_dir, "must not be empty"),
            (
                not (self.resume and self.overwrite),
                "overwrite",
                self.overwrite,
                "cannot be combined with resume=true",
            ),
            (g.min_clients <= K, "engine.min_clients", g.min_clients, f"must be <= workload.num_clients={K}"),
            (
                g.min_clients <= (self.workload.clients_per_round or K),
                "engine.min_clients",
                g.min_clients,
                f"must be <= workload.clients_per_round={self.workload.clients_per_round} (it applies to "
                "the round's sample)",
            ),
        ]
        for key in ("debug_fail_clients", "debug_nonfinite_clients"):
            checks += [
                (0 <= k < K, f"engine.{key}[{i}]", k, "must be a client id")
                for i, k in enumerate(getattr(g, key))
            ]
        bad = [f"{key}={value!r}: {rule}" for ok, key, value, rule in checks if not ok]
        if bad:
            raise ConfigError("invalid config:\n  " + "\n  ".join(bad))
        if isinstance(self.workload, WorkloadConfig) and type(self.workload) is not WorkloadConfig:
            get_workload_class(self.workload.name).check(self)


# ---------------------------------------------------------------------------------------------------------
# Plugins
# ---------------------------------------------------------------------------------------------------------


def unlisted_registrations(cfg: ExperimentConfig) -> list[str]:
    """Names the config uses that were registered by a module neither in the package nor in ``plugins``.

    The driver knows them (something imported that module), but actors are other processes that import
    only the package and the plugins, so a run must refuse them before any actor starts.

    Returns:
        One line per such name: the key, the name and the module that registered it.
    """

    def listed(module: str) -> bool:
        return module.startswith("clair_ray.") or any(
            module == p or module.startswith(p + ".") for p in cfg.plugins
        )

    used = [("workload.name", cfg.workload.name, get_workload_class(cfg.workload.name).__module__)]
    used += [
        (f"aggregation.methods[{i}]", m, AGGREGATORS[m].__module__)
        for i, m in enumerate(cfg.aggregation.methods)
        if m in AGGREGATORS
    ]
    used += [
        (f"contamination.mix.{k}", k, ATTACKS[k].module) for k, w in cfg.contamination.mix.items() if w > 0
    ]
    return [f"{key}={name!r} is registered by module {mod!r}" for key, name, mod in used if not listed(mod)]


def plugin_paths(names: list[str]) -> list[str]:
    """The ``sys.path`` entries that make the plugin modules importable (for processes started elsewhere).

    Args:
        names: Module names (importable in this process).

    Returns:
        For each module found outside the installed packages, the directory its top-level package sits
        in (client and aggregator actors put them on their path before importing the plugins).
    """
    out: list[str] = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin).resolve()
        depth = len(name.split(".")) + (1 if origin.name == "__init__.py" else 0)
        root = str(origin.parents[depth - 1])
        if "site-packages" not in root and root not in out:
            out.append(root)
    return out


def import_plugins(names: list[str], paths: list[str] | None = None) -> None:
    """Imports the plugin modules (their registrations run on import).

    Args:
        names: Module names from the ``plugins`` config key.
        paths: Directories to put on ``sys.path`` first (from :func:`plugin_paths` in the driver).

    Raises:
        ConfigError: A module cannot be imported (the message names it and the cause).
    """
    for p in paths or []:
        if p not in sys.path:
            sys.path.insert(0, p)
    for i, name in enumerate(names):
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ConfigError(
                f"invalid config:\n  plugins[{i}]={name!r}: cannot import it ({type(exc).__name__}: {exc})"
            ) from exc


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def build_config(parts: list[DictConfig], plugin_dirs: list[str] | None = None) -> ExperimentConfig:
    """Imports the plugins, picks the workload section's schema, merges ``parts`` onto it, validates.

    Args:
        parts: Config layers, later ones win (a file, then overrides).
        plugin_dirs: Directories the plugins are imported from (see :func:`plugin_paths`).

    Raises:
        ConfigError: As :func:`load_config`.
    """
    try:
        raw = OmegaConf.merge(*parts) if parts else OmegaConf.create({})
        plugins = list(raw.get("plugins") or [])
        wl_name = OmegaConf.select(raw, "workload.name", default=None)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc) from exc
    import_plugins([str(p) for p in plugins], plugin_dirs)
    schema = OmegaConf.structured(ExperimentConfig)
    if wl_name is not None:
        schema.workload = OmegaConf.structured(get_workload_class(str(wl_name)).config_class)
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(schema, *parts))
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc) from exc
    assert isinstance(cfg, ExperimentConfig)
    return cfg


def _omegaconf_error(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return ConfigError(f"{key}: {msg}" if key else msg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Loads a YAML config, applies ``key=value`` overrides and validates.

    Args:
        path: YAML file (None: the defaults).
        overrides: Dotlist overrides such as ``["workload.p=8", "engine.num_actors=3"]``.

    Returns:
        The validated config.

    Raises:
        ConfigError: Unknown key, wrongly typed value, value out of range, a malformed override or a
            plugin that cannot be imported.
    """
    parts: list[DictConfig] = []
    try:
        if path is not None:
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as exc:  # one line: where and what, not a parser traceback
                mark = getattr(exc, "problem_mark", None)
                where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
                raise ConfigError(
                    f"{path}: YAML syntax error at {where}: {getattr(exc, 'problem', exc)}"
                ) from exc
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path}: the top level must be a mapping")
            if not len(loaded):
                raise ConfigError(f"{path}: the file is empty (an experiment config needs at least its keys)")
            parts.append(loaded)
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value")
        if overrides:
            replace_mappings(parts, overrides)
            parts.append(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc) from exc
    return build_config(parts)


def replace_mappings(parts: list[DictConfig], overrides: list[str]) -> None:
    """Makes a mapping override (``contamination.mix={data_random: 1.0}``) replace the file's mapping.

    OmegaConf merges mappings key by key, so without this a user would get the file's attacks besides
    the ones the override lists. The key is removed from the earlier layers; the override then sets it.
    """
    for item in overrides:
        key, _, value = item.partition("=")
        if not value.strip().startswith("{"):
            continue
        parent, _, leaf = key.strip().rpartition(".")
        for part in parts:
            node = OmegaConf.select(part, parent) if parent else part
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what a run saves next to its results)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain containers (picklable, shipped to actors)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def from_dict(data: dict[str, Any], plugin_dirs: list[str] | None = None) -> ExperimentConfig:
    """Inverse of :func:`to_dict` (validated; the plugins it names are imported first).

    Args:
        data: Plain containers, as :func:`to_dict` makes them.
        plugin_dirs: Directories the plugins are imported from (see :func:`plugin_paths`).
    """
    return build_config([OmegaConf.create(data)], plugin_dirs)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Validates a config built or changed in code (every section's checks run again).

    Returns:
        A validated copy.

    Raises:
        ConfigError: Some value is out of range (every bad key of the failing section is named).
    """
    return from_dict(to_dict(cfg))


def fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """The part of a config that determines results (resume refuses a checkpoint from another one).

    Engine layout, Ray options, output location and debug hooks do not change any result number.
    """
    d = to_dict(cfg)
    for key in ("output_dir", "resume", "overwrite", "tensorboard", "export_adapters", "ray", "name"):
        d.pop(key, None)
    eng = d.pop("engine")
    d["engine"] = {
        "min_clients": eng["min_clients"],
        "debug_fail_clients": eng["debug_fail_clients"],
        "debug_nonfinite_clients": eng["debug_nonfinite_clients"],
    }
    return d
