"""The Workload contract: everything the engine may ask of a workload, and the workload registry.

The engine knows Ray, not workloads; a workload knows its task, not Ray. The engine calls exactly these
members of a :class:`Workload` (and nothing else: no attribute probing):

======================  ==================  ===============================================================
member                  where it runs       what it does
======================  ==================  ===============================================================
``config_class``        driver (config)     the ``workload:`` section's dataclass, validated in its own
                                            ``__post_init__``
``columns``             driver (results)    the result columns it adds (:class:`Column`)
``check(cfg)``          driver (config)     cross-section checks (methods, attacks it cannot run)
``prepare(progress)``   driver              one-off work before any actor starts (build a cached model)
``contamination(t)``    anywhere            who is contaminated with what in trial t (pure, seeded)
``train_batch(...)``    client actor        local training of a batch of virtual clients
``corrupt_updates``     client actor        test hook: make some clients' updates non-finite
``aggregate_round``     aggregator actor    attacks, every method, per-client results of one round
``evaluate_batch``      client actor        held-out evaluation under an :class:`EvalPlan`, if one was
                                            returned (the aggregator need not hold a model)
``export``              driver              ``export_adapters``: writes the methods' final models
======================  ==================  ===============================================================

Payloads (updates, the models clients continue from, evaluation plans) are opaque to the engine: it moves
them between actors by reference and never looks inside. Per-client numbers travel as plain dicts and
numpy arrays. A new workload is one module with one class decorated with :func:`register_workload`; a
user's own workload is loaded through the ``plugins`` config key.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

from clair_ray import attacks, seeds
from clair_ray.aggregators import AGGREGATORS
from clair_ray.aggregators._common import NON_FINITE
from clair_ray.errors import ConfigError

if TYPE_CHECKING:  # the config module imports this one (it validates through the registry)
    from clair_ray.config import ExperimentConfig

__all__ = [
    "REFINE_COLUMNS",
    "refine_scalars",
    "MODES",
    "WORKLOADS",
    "ClientJob",
    "Column",
    "EvalPlan",
    "Group",
    "MethodRound",
    "RoundOutput",
    "TrainOutput",
    "Workload",
    "WorkloadConfig",
    "check_fields",
    "non_finite_flags",
    "get_workload_class",
    "register_workload",
]

MODES = ("one_shot", "multi_round")


def check_fields(prefix: str, checks: list[tuple[bool, str, Any, str]]) -> None:
    """Raises one ConfigError listing every failed check as ``prefix.key=value: rule``.

    Args:
        prefix: The section's key (``workload``, ``workload.lora``, ...; empty for top-level keys).
        checks: (ok, key, value, rule) per check.
    """
    bad = [
        f"{prefix + '.' if prefix else ''}{key}={value!r}: {rule}"
        for ok, key, value, rule in checks
        if not ok
    ]
    if bad:
        raise ConfigError("invalid config:\n  " + "\n  ".join(bad))


def non_finite_flags(reported: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """A method's starting flags: clients that reported an unusable (non-finite) update are flagged
    ``non-finite`` before any method sees the rest.

    Args:
        reported: (K,) bool, the client sent an update.
        valid: (K,) bool, it sent a finite one (attacks applied).

    Returns:
        ((K,) bool flagged, K reasons).
    """
    flagged = np.zeros(len(reported), dtype=bool)
    reason = [""] * len(reported)
    for k in np.flatnonzero(reported & ~valid):
        flagged[k], reason[k] = True, NON_FINITE
    return flagged, reason


@dataclass
class WorkloadConfig:
    """What every workload section has (a workload's own section subclasses this).

    Attributes:
        name: The registered workload name; it selects the section's dataclass.
        num_clients: K, the virtual clients.
        mode: ``one_shot`` (train once, aggregate once) or ``multi_round``.
        rounds: Rounds in multi-round mode (one-shot always runs one).
        clients_per_round: Multi-round mode: clients sampled per round (0: all K), a seeded sample per
            (trial, round) (:func:`clair_ray.seeds.sample_clients`); clients not sampled keep their state.
    """

    name: str = "linear"
    num_clients: int = 50
    mode: str = "one_shot"
    rounds: int = 1
    clients_per_round: int = 0

    def __post_init__(self) -> None:
        check_fields(
            "workload",
            [
                (self.num_clients >= 2, "num_clients", self.num_clients, "must be >= 2"),
                (self.mode in MODES, "mode", self.mode, f"must be one of {list(MODES)}"),
                (self.rounds >= 1, "rounds", self.rounds, "must be >= 1"),
                (
                    isinstance(self.clients_per_round, int)
                    and not isinstance(self.clients_per_round, bool)
                    and 0 <= self.clients_per_round <= self.num_clients,
                    "clients_per_round",
                    self.clients_per_round,
                    f"must be an integer in [0, num_clients={self.num_clients}] (0: every client)",
                ),
                (
                    self.clients_per_round in (0, self.num_clients) or self.mode == "multi_round",
                    "clients_per_round",
                    self.clients_per_round,
                    "client sampling needs mode=multi_round",
                ),
            ],
        )

    @property
    def n_rounds(self) -> int:
        """Rounds this run has (1 in one-shot mode)."""
        return 1 if self.mode == "one_shot" else self.rounds


@dataclass(frozen=True)
class Column:
    """A result column a workload adds.

    Attributes:
        name: Column name.
        dtype: Arrow type (float columns are NaN where a client has no value).
        level: ``client``: one value per client in ``clients.parquet`` (an array in
            :attr:`MethodRound.metrics`); ``method``: one value per method and round in ``summary.parquet``
            (a number in :attr:`MethodRound.scalars`).
        honest_mean: Client columns only: ``summary.parquet`` also gets ``honest_mean_<name>``, the mean
            over the honest clients that reported.
    """

    name: str
    dtype: pa.DataType = field(default_factory=pa.float64)
    level: str = "client"
    honest_mean: bool = False


#: Method-level columns where CLAIR and the oracle record their refinement (``aggregation.refine``):
#: the kept rank averaged over modules on the column and the row side, and per module as JSON.
REFINE_COLUMNS = (
    Column("refine_rank", level="method"),
    Column("refine_rank_row", level="method"),
    Column("refine", pa.string(), level="method"),
    Column("refine_shrink", level="method"),
)


def refine_scalars(choices: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float | str]:
    """:data:`REFINE_COLUMNS` values from module -> side -> ``RefineChoice.summary()``."""
    out: dict[str, float | str] = {}
    for side, col in (("column", "refine_rank"), ("row", "refine_rank_row")):
        ranks = [c[side]["rank"] for c in choices.values() if side in c]
        out[col] = float(np.mean(ranks)) if ranks else float("nan")
    out["refine"] = json.dumps(
        {m: {side: c[side]["rank"] for side in c} for m, c in choices.items()}, separators=(",", ":")
    )
    # Only refine: heldout shrinks the kept deviation; the projection rules keep it whole (NaN here).
    shrinks = [c[side]["shrink"] for c in choices.values() for side in c if "shrink" in c[side]]
    out["refine_shrink"] = float(np.mean(shrinks)) if shrinks else float("nan")
    return out


@dataclass(frozen=True)
class ClientJob:
    """One virtual client's work in a call: its id and the seed of its local randomness."""

    client_id: int
    seed: int


@dataclass
class TrainOutput:
    """What :meth:`Workload.train_batch` returns for a batch of jobs.

    Attributes:
        payload: The batch's updates in the workload's own format (numpy inside, so the object store
            shares it zero-copy); handed untouched to :meth:`Workload.aggregate_round`.
        info: Per job, in job order: numbers the workload's round reads (``n_samples`` and ``bytes_sent``
            are required: they are core result columns; ``finite``, whether the update is finite, lets
            the engine count usable updates against ``engine.min_clients`` before aggregating).
        failed: Job position -> traceback text of a client that raised (it becomes a dropout).
    """

    payload: Any
    info: list[dict[str, Any]]
    failed: dict[int, str] = field(default_factory=dict)


@dataclass
class Group:
    """One trajectory's updates of a round, as the aggregator actor hands them to the workload.

    Attributes:
        methods: Methods evaluated on these updates (all of them in a shared first round).
        batches: (client ids, payload) per client batch, in client-id order.
        dropped: Clients that did not report (raised, or were never trained).
        info: Client id -> its ``TrainOutput.info`` entry (reporting clients only).
        clients: The round's sampled clients (``workload.clients_per_round``; empty: all K).
    """

    methods: list[str]
    batches: list[tuple[list[int], Any]]
    dropped: list[int]
    info: dict[int, dict[str, Any]]
    clients: list[int] = field(default_factory=list)


@dataclass
class MethodRound:
    """One method's results of one round, over all K clients (client-id order).

    Attributes:
        flagged: (K,) bool, excluded as contaminated (or non-finite).
        reason: K strings, why ("" if not flagged).
        detectable: (K,) bool, detection truth.
        dropped: (K,) bool, no update this round.
        update_norm: (K,) ‖update the server received‖_F (NaN without one).
        metrics: Client-level workload column -> (K,) values.
        scalars: Method-level workload column -> value.
        agg_s: Seconds this method's aggregation took.
        eval_s: Seconds its held-out evaluation took where it ran (0 with an evaluation plan).
    """

    flagged: np.ndarray
    reason: list[str]
    detectable: np.ndarray
    dropped: np.ndarray
    update_norm: np.ndarray
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    agg_s: float = 0.0
    eval_s: float = 0.0


@dataclass
class EvalPlan:
    """Held-out evaluation the engine dispatches to the client actors.

    Attributes:
        clients: Every client to evaluate (under at least one method).
        data: Opaque to the engine: passed to :meth:`Workload.evaluate_batch` on the client actors.
    """

    clients: list[int]
    data: Any


@dataclass
class RoundOutput:
    """What :meth:`Workload.aggregate_round` returns.

    Attributes:
        methods: Method -> its results.
        nexts: Method -> what its clients continue from next round (opaque; after the last round empty,
            or each method's final state when ``export_adapters`` is set).
        plan: Evaluation for the client actors, or None when the round evaluated already.
    """

    methods: dict[str, MethodRound]
    nexts: dict[str, Any] = field(default_factory=dict)
    plan: EvalPlan | None = None


class Workload(abc.ABC):
    """What a virtual client trains, what the server aggregates, how both are judged.

    One instance per process (driver, each client actor, the aggregator actor), built from the validated
    config; anything expensive (a model, data) loads lazily where it is used.

    Args:
        cfg: The validated experiment config; ``cfg.workload`` is an instance of :attr:`config_class`.
    """

    #: The registered name (set by :func:`register_workload`).
    name: ClassVar[str] = ""
    #: The ``workload:`` section's dataclass.
    config_class: ClassVar[type[WorkloadConfig]] = WorkloadConfig
    #: Result columns the workload adds (client metrics and method-level numbers).
    columns: ClassVar[tuple[Column, ...]] = ()
    #: Data-attack kinds (``data_<kind>``) the workload's data pipeline implements.
    data_attacks: ClassVar[tuple[str, ...]] = attacks.DATA_ATTACK_KINDS
    #: Methods the workload implements itself (beyond registered aggregators it can run).
    own_methods: ClassVar[tuple[str, ...]] = ()
    #: Whether its rounds handle a sample of the clients (``workload.clients_per_round``).
    supports_sampling: ClassVar[bool] = False
    #: Whether it can write its methods' final models (``export_adapters``, :meth:`export`).
    supports_export: ClassVar[bool] = False

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.K = cfg.workload.num_clients
        self._plans: dict[int, attacks.Contamination] = {}

    # ---- config ---------------------------------------------------------------------------------------
    @classmethod
    def methods(cls) -> tuple[str, ...]:
        """Method names this workload can run (default: every registered aggregator and its own)."""
        return (*AGGREGATORS, *cls.own_methods)

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """Cross-section checks that need the workload (methods, attacks); raises ConfigError.

        The default checks the method names and the data attacks against what the workload runs; a
        workload extends it (``super().check(cfg)`` first).
        """
        n = cfg.workload.clients_per_round
        check_fields(
            "workload",
            [
                (
                    cls.supports_sampling or n in (0, cfg.workload.num_clients),
                    "clients_per_round",
                    n,
                    f"workload {cls.name!r} runs every client every round (must be 0)",
                )
            ],
        )
        check_fields(
            "",
            [
                (
                    cls.supports_export or not cfg.export_adapters,
                    "export_adapters",
                    cfg.export_adapters,
                    f"workload {cls.name!r} has no adapters to export",
                )
            ],
        )
        known = cls.methods()
        checks = [
            (m in known, f"methods[{i}]", m, f"must be one of {list(known)} for workload {cls.name!r}")
            for i, m in enumerate(cfg.aggregation.methods)
        ]
        checks += [
            (m in known, f"params.{m}", cfg.aggregation.params[m], f"must be one of {list(known)}")
            for m in cfg.aggregation.params
        ]
        check_fields("aggregation", checks)
        checks = []
        for m, params in cfg.aggregation.params.items():
            if m in AGGREGATORS and m in known:
                try:  # the constructor validates the parameter names (and values), before any training
                    AGGREGATORS[m](**params)
                except (TypeError, ValueError) as exc:
                    checks.append((False, f"params.{m}", dict(params), str(exc).splitlines()[0]))
        check_fields("aggregation", checks)
        ok_kinds = (*attacks.update_kinds(), *cls.data_attacks)
        bad_params = []
        for kind, params in cfg.contamination.params.items():
            spec = attacks.ATTACKS.get(kind)
            extra = sorted(set(params) - set(spec.defaults)) if spec is not None else []
            bad_params.append(
                (
                    not extra,
                    f"params.{kind}",
                    dict(params),
                    f"unknown parameter(s) {extra}; allowed: {sorted(spec.defaults) if spec else []}",
                )
            )
        check_fields(
            "contamination",
            [
                (
                    k in ok_kinds,
                    f"mix.{k}",
                    w,
                    f"unknown attack for workload {cls.name!r}; known: {list(ok_kinds)}",
                )
                for k, w in cfg.contamination.mix.items()
            ]
            + [
                (k in ok_kinds, f"params.{k}", v, "unknown attack")
                for k, v in cfg.contamination.params.items()
            ]
            + bad_params,
        )

    # ---- driver ---------------------------------------------------------------------------------------
    def prepare(self, progress: Callable[[str], None] | None = None) -> None:
        """One-off driver work before any actor starts (default: nothing)."""
        del progress

    def contamination(self, trial: int) -> attacks.Contamination:
        """Who is contaminated in ``trial`` and with what (the engine's seeded rule; cached)."""
        if trial not in self._plans:
            c = self.cfg.contamination
            sel = seeds.derive_seed(self.cfg.seed, seeds.SELECT, trial)
            self._plans[trial] = attacks.contamination_plan(self.K, c.fraction, c.mix, sel)
        return self._plans[trial]

    # ---- client actors --------------------------------------------------------------------------------
    @abc.abstractmethod
    def train_batch(self, trial: int, round_: int, jobs: list[ClientJob], start: Any) -> TrainOutput:
        """Trains a batch of virtual clients (in a client actor).

        Args:
            trial: Trial index.
            round_: Round index.
            jobs: The clients, in client-id order.
            start: What this trajectory's clients continue from (the previous round's ``nexts[method]``;
                None in the first round).

        Returns:
            The batch's payload and per-client info.
        """

    @abc.abstractmethod
    def corrupt_updates(self, payload: Any, positions: list[int]) -> Any:
        """Test hook (``engine.debug_nonfinite_clients``): the payload with the updates at ``positions``
        (job positions) made non-finite, as a diverged client would send them."""

    def evaluate_batch(self, trial: int, plan: Any, clients: list[int]) -> dict[str, dict[str, Any]]:
        """Held-out evaluation of ``clients`` under an :class:`EvalPlan`'s data (in a client actor).

        Returns:
            Method -> ``{"clients": [ids], <client column>: [values]}`` for the clients it evaluated.
        """
        raise NotImplementedError(f"workload {self.name!r} returned an evaluation plan but cannot evaluate")

    def export(self, trial: int, finals: dict[str, Any], out_dir: Path) -> list[Path]:
        """Writes each method's final models of a trial (``export_adapters``; on the driver).

        Args:
            trial: Trial index.
            finals: Method -> its final state (the last round's ``nexts``, which the workload's round
                returns when ``export_adapters`` is set).
            out_dir: ``output_dir/adapters/trial<t>``.

        Returns:
            The directories and files written.
        """
        raise NotImplementedError(f"workload {self.name!r} cannot export its models")

    # ---- aggregator actor -----------------------------------------------------------------------------
    @abc.abstractmethod
    def aggregate_round(self, trial: int, round_: int, groups: list[Group], prev: Any) -> RoundOutput:
        """Attacks, every method of every group, and per-client results of one round.

        Args:
            trial: Trial index.
            round_: Round index.
            groups: The round's trajectory groups (one shared group in the first round).
            prev: The previous round's ``nexts`` (None in the first round).

        Returns:
            Per-method results, what each method's clients continue from, and an optional plan.
        """


#: Name -> workload class (the only list of workload names; config reads it).
WORKLOADS: dict[str, type[Workload]] = {}


def register_workload(name: str) -> Callable[[type[Workload]], type[Workload]]:
    """Registers a workload class under ``name`` (``workload.name`` in a config); a class decorator."""

    def deco(cls: type[Workload]) -> type[Workload]:
        old = WORKLOADS.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"register_workload: {name!r} is registered already ({old.__qualname__})")
        cls.name = name
        WORKLOADS[name] = cls
        return cls

    return deco


def get_workload_class(name: str) -> type[Workload]:
    """The workload class registered as ``name``; ConfigError naming ``workload.name`` otherwise."""
    if name not in WORKLOADS:
        raise ConfigError(f"invalid config:\n  workload.name={name!r}: must be one of {list(WORKLOADS)}")
    return WORKLOADS[name]
