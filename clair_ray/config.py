"""Typed experiment configs: OmegaConf structured dataclasses, validated at load time.

A config file is merged onto the dataclass schema (so unknown keys and wrongly typed values are rejected by
OmegaConf with the full key named), then ``key=value`` overrides are merged as a dotlist, then every value
is range-checked by :func:`validate`, which names the full key and the bad value
(``contamination.fraction=1.5: must be in [0, 1)``). Nothing starts before the config is valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clair_ray.attacks import ATTACK_KINDS, DATA_ATTACK_KINDS

METHODS = ("clair", "fedavg", "local", "oracle", "median", "trimmed_mean", "multi_krum", "geometric_median")
# Update attacks act on a submitted update; data attacks (``data_<kind>``) corrupt a client's targets.
UPDATE_ATTACKS = ATTACK_KINDS
DATA_ATTACKS = DATA_ATTACK_KINDS
#: The copy-task workload adds two data corruptions of its own (clair_ray.workloads.copy_task) and two
#: workload-level baselines: FedAvg over the truly honest clients, and local training stopped early.
COPY_DATA_ATTACKS = (*DATA_ATTACK_KINDS, "data_reversed", "data_flip")
COPY_METHODS = (*METHODS, "fedavg_honest", "local_early")
WORKLOADS = ("linear", "copy_task", "hf_causal_lm")
#: Workloads whose clients fine-tune LoRA adapters (per-module factor pairs; ``workload.lora``).
LORA_WORKLOADS = ("copy_task", "hf_causal_lm")
#: Methods of a LoRA workload's multi-round mode: the global adapter's factors are averaged (FedIT).
LORA_ROUND_METHODS = ("fedavg",)
#: Client partitions of the hf_causal_lm workload (clair_ray.workloads.hf_causal_lm.PARTITIONS).
PARTITIONS = ("iid", "dirichlet", "quantity")
CLAIR_SIDES = ("column", "row", "both")
CLAIR_INPUTS = ["auto", "factors", "dense"]
DEVICES = ("cpu", "cuda")
ARCHS = ("gpt2", "llama")
MODES = ("one_shot", "multi_round")
NOISE_SCALES = ("reported", "inv_sqrt_n", "none")


class ConfigError(ValueError):
    """A config value is invalid; the message names the full key and the value."""


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
        debug_delay_s: Test hook: each client call sleeps this long before training.
        debug_marker_dir: Test hook: each client call first writes a marker file (holding the actor's pid)
            here, so a test can tell a call is in flight.
        debug_fail_clients: Test hook: these client ids raise inside the actor.
        debug_nonfinite_clients: Test hook: these client ids return a NaN update.
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


@dataclass
class LoraTrainConfig:
    """LoRA fine-tuning of every LoRA workload (``workload.name`` ``copy_task`` or ``hf_causal_lm``).

    Attributes:
        r: Adapter rank.
        alpha: LoRA alpha (effective update (alpha / r) · B A).
        targets: Target module names (empty: the workload's default: for the copy task every attention and
            MLP projection of its ``arch``; for a Hugging Face model peft's default for its architecture).
        init_seed: Adapter initialisation seed, the same for every client.
        steps: Local AdamW steps per round.
        early_steps: Steps of the early-stopped local baseline ``local_early`` (0: not recorded).
        lr: Local AdamW learning rate.
        batch: Sequences per local step.
        side: CLAIR's projection side for refinement: ``column``, ``row`` or ``both``.
        device: ``cpu`` or ``cuda`` for the client actors (bf16 on cuda); evaluation runs on CPU.
        eval_every: Multi-round mode: evaluate held-out loss every this many rounds (0: the last round
            only; the last round is always evaluated). One-shot runs evaluate their single round.
        clair_input: What CLAIR sees per module: ``factors`` (default: the pairs (B_k, A_k), centred by a
            low-rank robust mean; never a dense update, so it scales to large modules), ``dense`` (the
            products B_k A_k, centred by a free offset), or ``auto`` (dense up to 65,536 entries per
            module, else factors). On the copy task factors and dense flag the same clients (measured).
    """

    r: int = 4
    alpha: float = 8.0
    targets: list[str] = field(default_factory=list)
    init_seed: int = 0
    steps: int = 60
    early_steps: int = 20
    lr: float = 3e-3
    batch: int = 8
    side: str = "both"
    device: str = "cpu"
    eval_every: int = 1
    clair_input: str = "factors"


@dataclass
class CopyTaskWorkloadConfig:
    """The copy-task data and base model (``workload.name: copy_task``; see clair_ray/workloads/copy_task.py).

    The LoRA fine-tuning knobs are in ``workload.lora``.

    Attributes:
        arch: Base architecture, ``gpt2`` or ``llama``.
        vocab_size: V (content tokens 0..V-2, SEP = V-1).
        prefix_len: Tokens to copy.
        n_layer: Transformer blocks of the base.
        n_embd: Width of the base.
        n_head: Attention heads.
        base_steps: Full fine-tuning steps of the base on the identity copy (cached on disk by config hash).
        base_lr: Learning rate of the base training.
        base_batch_size: Sequences per base training step.
        base_seed: Seed of the base's initialisation and data.
        n_common: Substitutions every honest client needs (the shared component).
        n_personal: Tokens with cluster-dependent substitutions.
        n_clusters: Groups of honest clients whose personal substitutions conflict.
        heterogeneity: h in [0, 1]: fraction of personal tokens that conflict across clusters (0: all alike).
        task_seed: Seed of the substitution maps.
        n_sequences: Local training sequences per client (the data-size knob).
        test_sequences: Held-out sequences per honest client for evaluation.
        n_flips: Token pairs swapped by the ``data_flip`` corruption.
        cache_dir: Where the base is cached (None: ``$CLAIR_CACHE`` or ``~/.cache/clair_ray``).
    """

    arch: str = "gpt2"
    vocab_size: int = 32
    prefix_len: int = 8
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    base_steps: int = 300
    base_lr: float = 3e-3
    base_batch_size: int = 32
    base_seed: int = 0
    n_common: int = 6
    n_personal: int = 4
    n_clusters: int = 2
    heterogeneity: float = 1.0
    task_seed: int = 0
    n_sequences: int = 8
    test_sequences: int = 128
    n_flips: int = 2
    cache_dir: str | None = None


@dataclass
class HFCausalLMWorkloadConfig:
    """Any Hugging Face causal LM on local text data (``workload.name: hf_causal_lm``).

    See clair_ray/workloads/hf_causal_lm.py; the LoRA fine-tuning knobs are in ``workload.lora``.

    Attributes:
        name_or_path: A local directory written by ``save_pretrained`` (or a hub id where a hub is
            reachable) holding the model and its tokenizer.
        data_path: A ``.jsonl`` / ``.parquet`` file or a directory of them.
        text_column: Column with the text.
        label_column: Column with a label (needed by the ``dirichlet`` partition).
        max_length: Tokens per sequence (truncated / padded).
        partition: ``iid``, ``dirichlet`` (over ``label_column``) or ``quantity`` (skewed client sizes).
        partition_alpha: Dirichlet concentration of ``dirichlet`` / ``quantity`` (smaller: more skewed).
        min_size: Fewest samples a client may get.
        test_fraction: Share of each client's samples held out for its evaluation.
        max_samples: Use at most this many samples of the data (0: all), taken before partitioning.
    """

    name_or_path: str = ""
    data_path: str = ""
    text_column: str = "text"
    label_column: str | None = None
    max_length: int = 64
    partition: str = "iid"
    partition_alpha: float = 0.5
    min_size: int = 2
    test_fraction: float = 0.25
    max_samples: int = 0


@dataclass
class WorkloadConfig:
    """The linear-regression workload: Y_k = X_k W_k + noise, W_k = W_0 + U V_kᵀ.

    Attributes:
        name: Workload name: ``linear``, or a LoRA workload, ``copy_task`` or ``hf_causal_lm``, which read
            ``num_clients``, ``mode``, ``rounds``, ``lora`` and their own section and ignore the linear
            fields.
        num_clients: K.
        p: Rows of W (input features of the regression; the shared side, U is p × r).
        q: Columns of W (outputs).
        r: Rank of the shared subspace.
        signal_scale: Standard deviation of the entries of the common V̄.
        heterogeneity: Spread of honest V_k around V̄ (V_k = V̄ + heterogeneity · G_k); 0 = all alike.
        n_median: Median client sample size n_k.
        quantity_skew: Log-normal sigma of n_k around n_median (0: every client has n_median samples).
        n_min: Smallest allowed n_k (at least p + 2 so OLS is defined with finite noise).
        noise_std: Noise standard deviation σ of Y.
        base_scale: Entry std of the common offset W_0 (0: no offset; > 0: CLAIR runs with offset=True).
        mode: ``one_shot`` (local OLS, aggregate once) or ``multi_round`` (local gradient steps).
        rounds: Rounds in multi-round mode (one-shot always runs one).
        local_steps: Full-batch gradient steps per round in multi-round mode.
        lr: Gradient step size in multi-round mode.
        truth_factor: A contaminated client counts as detectable when its update's energy outside U
            exceeds this multiple of its own noise level there. An honest client's ratio is a chi-type
            variable with (p - r)·q degrees of freedom, 1 ± 0.03 for the default shapes, so 1.2 is far
            above any honest fluctuation yet still counts a weak ALIE attacker (about 1.3) as visible.
        lora: LoRA fine-tuning of the LoRA workloads.
        copy_task: The copy-task data and base (``name: copy_task``).
        hf_causal_lm: The Hugging Face model and data (``name: hf_causal_lm``).
    """

    name: str = "linear"
    num_clients: int = 50
    p: int = 64
    q: int = 16
    r: int = 4
    signal_scale: float = 1.0
    heterogeneity: float = 0.5
    n_median: int = 200
    quantity_skew: float = 0.0
    n_min: int = 80
    noise_std: float = 0.5
    base_scale: float = 0.0
    mode: str = "one_shot"
    rounds: int = 1
    local_steps: int = 5
    lr: float = 0.3
    truth_factor: float = 1.2
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    copy_task: CopyTaskWorkloadConfig = field(default_factory=CopyTaskWorkloadConfig)
    hf_causal_lm: HFCausalLMWorkloadConfig = field(default_factory=HFCausalLMWorkloadConfig)


@dataclass
class ContaminationConfig:
    """Which clients are contaminated and how.

    Attributes:
        fraction: Fraction of clients contaminated, chosen by ``attacks.select_contaminated`` (default 0:
            a clean run).
        mix: Attack kind -> weight (update attacks and ``data_<kind>`` data attacks), split exactly by
            ``assign_attacks``. Empty by default so that a file's mix replaces it instead of merging.
        params: Attack kind -> keyword parameters for that attack.
    """

    fraction: float = 0.0
    mix: dict[str, float] = field(default_factory=dict)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class AggregationConfig:
    """Methods compared in a run.

    Attributes:
        methods: Aggregators run side by side on the same updates.
        rank: Rank given to CLAIR and the oracle (None: CLAIR chooses).
        assumed_fraction: Contamination fraction assumed by baselines that need a number of attackers
            (None: the configured ``contamination.fraction``). CLAIR never sees it.
        noise_scale: The per-client relative noise level given to methods (``ctx.noise_scale``):
            ``reported`` (default): what each client computed from its own inputs (linear workload:
            sqrt(tr((X_kᵀX_k)⁻¹)), exactly proportional to its OLS error); ``inv_sqrt_n``: 1/sqrt(n_k),
            which understates the noise of clients with n_k close to p; ``none``.
        params: Method -> keyword parameters for ``get_aggregator``.
    """

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    rank: int | None = None
    assumed_fraction: float | None = None
    noise_scale: str = "reported"
    params: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    """One experiment.

    Attributes:
        name: Experiment name (used in the run directory name).
        seed: Root seed; every random number derives from it through numpy's SeedSequence.
        trials: Independent repetitions (trial t draws a fresh problem from (seed, t)).
        output_dir: Where results go (a run writes into this directory).
        resume: Continue from the last checkpoint in ``output_dir``.
        workload: The workload.
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
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def _check(errors: list[str], ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        errors.append(f"{key}={value!r}: {rule}")


def _validate_lora(e: list[str], cfg: ExperimentConfig) -> None:
    """Range checks of ``workload.lora`` (and what every LoRA workload needs elsewhere)."""
    t, key = cfg.workload.lora, "workload.lora"
    for name, lo in (("r", 1), ("init_seed", 0), ("steps", 1), ("early_steps", 0), ("batch", 1)):
        v = getattr(t, name)
        _check(e, v >= lo, f"{key}.{name}", v, f"must be >= {lo}")
    _check(e, t.early_steps <= t.steps, f"{key}.early_steps", t.early_steps, f"must be <= steps={t.steps}")
    _check(e, t.eval_every >= 0, f"{key}.eval_every", t.eval_every, "must be >= 0")
    for name in ("lr", "alpha"):
        v = getattr(t, name)
        _check(e, math.isfinite(v) and v > 0, f"{key}.{name}", v, "must be finite and > 0")
    _check(e, t.side in CLAIR_SIDES, f"{key}.side", t.side, f"must be one of {list(CLAIR_SIDES)}")
    _check(e, t.device in DEVICES, f"{key}.device", t.device, f"must be one of {list(DEVICES)}")
    _check(
        e,
        t.clair_input in CLAIR_INPUTS,
        f"{key}.clair_input",
        t.clair_input,
        f"must be one of {CLAIR_INPUTS}",
    )
    if t.device == "cuda":  # Ray hides every GPU from an actor that reserved none
        g = cfg.engine.actor_num_gpus
        _check(e, g > 0, "engine.actor_num_gpus", g, "must be > 0 with workload.lora.device=cuda")
    methods = cfg.aggregation.methods
    if cfg.workload.mode == "multi_round":
        bad = [m for m in methods if m not in LORA_ROUND_METHODS]
        _check(
            e,
            not bad,
            "aggregation.methods",
            list(methods),
            f"{cfg.workload.name} in multi_round mode runs {list(LORA_ROUND_METHODS)} only (got {bad})",
        )
        upd = [k for k, v in cfg.contamination.mix.items() if v > 0 and not k.startswith("data_")]
        _check(
            e,
            not upd,
            "contamination.mix",
            dict(cfg.contamination.mix),
            f"{cfg.workload.name} in multi_round mode takes data attacks only (got {upd})",
        )
    if "local_early" in methods:
        _check(
            e, t.early_steps >= 1, f"{key}.early_steps", t.early_steps, "must be >= 1 for method local_early"
        )
    if cfg.aggregation.rank is not None:
        _check(
            e,
            1 <= cfg.aggregation.rank <= t.r,
            "aggregation.rank",
            cfg.aggregation.rank,
            f"must be in [1, workload.lora.r={t.r}]",
        )


def _validate_copy_task(e: list[str], cfg: ExperimentConfig) -> None:
    """Range checks of ``workload.copy_task``."""
    t = cfg.workload.copy_task
    key = "workload.copy_task"
    _check(e, t.arch in ARCHS, f"{key}.arch", t.arch, f"must be one of {list(ARCHS)}")
    for name, lo in (
        ("vocab_size", 4),
        ("prefix_len", 1),
        ("n_layer", 1),
        ("n_embd", 2),
        ("n_head", 1),
        ("base_steps", 0),
        ("base_batch_size", 1),
        ("base_seed", 0),
        ("n_common", 0),
        ("n_personal", 0),
        ("n_clusters", 1),
        ("task_seed", 0),
        ("n_sequences", 1),
        ("test_sequences", 1),
        ("n_flips", 1),
    ):
        v = getattr(t, name)
        _check(e, v >= lo, f"{key}.{name}", v, f"must be >= {lo}")
    _check(
        e,
        t.n_head >= 1 and t.n_embd % t.n_head == 0,
        f"{key}.n_head",
        t.n_head,
        f"must divide n_embd={t.n_embd}",
    )
    _check(
        e,
        t.n_common + t.n_personal <= t.vocab_size - 1,
        f"{key}.n_common",
        t.n_common,
        f"n_common + n_personal must be <= vocab_size - 1 = {t.vocab_size - 1}",
    )
    _check(e, 0.0 <= t.heterogeneity <= 1.0, f"{key}.heterogeneity", t.heterogeneity, "must be in [0, 1]")
    _check(
        e, 2 * t.n_flips <= t.vocab_size - 1, f"{key}.n_flips", t.n_flips, "must be <= (vocab_size - 1) / 2"
    )
    v = t.base_lr
    _check(e, math.isfinite(v) and v > 0, f"{key}.base_lr", v, "must be finite and > 0")


def _validate_hf_causal_lm(e: list[str], cfg: ExperimentConfig) -> None:
    """Range checks of ``workload.hf_causal_lm`` (files are checked when the workload loads them)."""
    t, key = cfg.workload.hf_causal_lm, "workload.hf_causal_lm"
    _check(e, bool(t.name_or_path), f"{key}.name_or_path", t.name_or_path, "must name a model dir or hub id")
    _check(e, bool(t.data_path), f"{key}.data_path", t.data_path, "must name a .jsonl/.parquet file or dir")
    _check(e, bool(t.text_column), f"{key}.text_column", t.text_column, "must name a column")
    _check(e, t.max_length >= 2, f"{key}.max_length", t.max_length, "must be >= 2")
    _check(
        e, t.partition in PARTITIONS, f"{key}.partition", t.partition, f"must be one of {list(PARTITIONS)}"
    )
    _check(
        e,
        t.partition != "dirichlet" or bool(t.label_column),
        f"{key}.label_column",
        t.label_column,
        "must name a column with partition=dirichlet",
    )
    a = t.partition_alpha
    _check(e, math.isfinite(a) and a > 0, f"{key}.partition_alpha", a, "must be finite and > 0")
    _check(e, t.min_size >= 2, f"{key}.min_size", t.min_size, "must be >= 2 (a client needs train and test)")
    _check(e, 0 < t.test_fraction < 1, f"{key}.test_fraction", t.test_fraction, "must be in (0, 1)")
    _check(e, t.max_samples >= 0, f"{key}.max_samples", t.max_samples, "must be >= 0 (0: all)")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Range-checks every value; raises one ConfigError listing each bad key and value.

    Args:
        cfg: The config to check.

    Returns:
        The same config.

    Raises:
        ConfigError: Some value is out of range.
    """
    e: list[str] = []
    w, c, a, g, r = cfg.workload, cfg.contamination, cfg.aggregation, cfg.engine, cfg.ray
    _check(e, cfg.trials >= 1, "trials", cfg.trials, "must be >= 1")
    _check(e, cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")
    _check(e, bool(cfg.output_dir), "output_dir", cfg.output_dir, "must not be empty")
    _check(e, w.name in WORKLOADS, "workload.name", w.name, f"must be one of {list(WORKLOADS)}")
    copy = w.name in LORA_WORKLOADS
    methods_known = COPY_METHODS if copy else METHODS
    if copy:
        _validate_lora(e, cfg)
    if w.name == "copy_task":
        _validate_copy_task(e, cfg)
    if w.name == "hf_causal_lm":
        _validate_hf_causal_lm(e, cfg)
    _check(e, w.num_clients >= 2, "workload.num_clients", w.num_clients, "must be >= 2")
    for key in ("p", "q", "r"):
        _check(e, getattr(w, key) >= 1, f"workload.{key}", getattr(w, key), "must be >= 1")
    _check(e, w.r <= min(w.p, w.q), "workload.r", w.r, f"must be <= min(p, q) = {min(w.p, w.q)}")
    _check(
        e, w.n_min >= w.p + 2, "workload.n_min", w.n_min, f"must be >= p + 2 = {w.p + 2} (OLS needs n > p)"
    )
    _check(e, w.n_median >= w.n_min, "workload.n_median", w.n_median, f"must be >= workload.n_min={w.n_min}")
    for key in ("signal_scale", "heterogeneity", "quantity_skew", "noise_std", "base_scale"):
        v = getattr(w, key)
        _check(e, math.isfinite(v) and v >= 0, f"workload.{key}", v, "must be finite and >= 0")
    _check(e, w.mode in MODES, "workload.mode", w.mode, f"must be one of {list(MODES)}")
    _check(e, w.rounds >= 1, "workload.rounds", w.rounds, "must be >= 1")
    _check(e, w.local_steps >= 1, "workload.local_steps", w.local_steps, "must be >= 1")
    _check(e, 0 < w.lr < 2, "workload.lr", w.lr, "must be in (0, 2) (gradient steps on whitened inputs)")
    _check(e, w.truth_factor > 0, "workload.truth_factor", w.truth_factor, "must be > 0")
    _check(e, 0 <= c.fraction < 1, "contamination.fraction", c.fraction, "must be in [0, 1)")
    known = UPDATE_ATTACKS + (COPY_DATA_ATTACKS if w.name == "copy_task" else DATA_ATTACKS)
    for kind, weight in c.mix.items():
        _check(e, kind in known, f"contamination.mix.{kind}", weight, f"unknown attack; known: {list(known)}")
        _check(e, weight >= 0, f"contamination.mix.{kind}", weight, "must be >= 0")
    if c.fraction > 0:
        _check(e, sum(c.mix.values()) > 0, "contamination.mix", dict(c.mix), "needs a positive weight")
    for kind in c.params:
        _check(e, kind in known, f"contamination.params.{kind}", c.params[kind], "unknown attack")
    _check(e, len(a.methods) >= 1, "aggregation.methods", list(a.methods), "must name at least one method")
    for i, m in enumerate(a.methods):
        _check(e, m in methods_known, f"aggregation.methods[{i}]", m, f"must be one of {list(methods_known)}")
    _check(e, len(set(a.methods)) == len(a.methods), "aggregation.methods", list(a.methods), "has duplicates")
    for m in a.params:
        _check(
            e,
            m in methods_known,
            f"aggregation.params.{m}",
            a.params[m],
            f"must be one of {list(methods_known)}",
        )
    if a.rank is not None and not copy:
        _check(e, 1 <= a.rank <= min(w.p, w.q), "aggregation.rank", a.rank, "must be in [1, min(p, q)]")
    if a.assumed_fraction is not None:
        _check(
            e,
            0 <= a.assumed_fraction < 0.5,
            "aggregation.assumed_fraction",
            a.assumed_fraction,
            "must be in [0, 0.5)",
        )
    _check(
        e,
        a.noise_scale in NOISE_SCALES,
        "aggregation.noise_scale",
        a.noise_scale,
        f"must be one of {list(NOISE_SCALES)}",
    )
    _check(e, g.num_actors >= 1, "engine.num_actors", g.num_actors, "must be >= 1")
    _check(e, g.actor_num_cpus > 0, "engine.actor_num_cpus", g.actor_num_cpus, "must be > 0")
    _check(e, g.actor_num_gpus >= 0, "engine.actor_num_gpus", g.actor_num_gpus, "must be >= 0")
    _check(e, g.aggregator_num_cpus > 0, "engine.aggregator_num_cpus", g.aggregator_num_cpus, "must be > 0")
    _check(e, g.batch_size >= 1, "engine.batch_size", g.batch_size, "must be >= 1")
    _check(e, g.max_restarts >= 0, "engine.max_restarts", g.max_restarts, "must be >= 0")
    _check(e, g.call_timeout_s > 0, "engine.call_timeout_s", g.call_timeout_s, "must be > 0")
    _check(
        e,
        0 <= g.min_clients <= w.num_clients,
        "engine.min_clients",
        g.min_clients,
        f"must be in [0, workload.num_clients={w.num_clients}]",
    )
    _check(e, g.debug_delay_s >= 0, "engine.debug_delay_s", g.debug_delay_s, "must be >= 0")
    for key in ("debug_fail_clients", "debug_nonfinite_clients"):
        for i, k in enumerate(getattr(g, key)):
            _check(e, 0 <= k < w.num_clients, f"engine.{key}[{i}]", k, "must be a client id")
    if r.num_cpus is not None:
        _check(e, r.num_cpus > 0, "ray.num_cpus", r.num_cpus, "must be > 0")
    if r.object_store_mb is not None:
        _check(
            e,
            r.object_store_mb >= 75,
            "ray.object_store_mb",
            r.object_store_mb,
            "must be >= 75 (Ray's minimum)",
        )
    if e:
        raise ConfigError("invalid config:\n  " + "\n  ".join(e))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Loads a YAML config, applies ``key=value`` overrides and validates.

    Args:
        path: YAML file (None: the defaults).
        overrides: Dotlist overrides such as ``["workload.p=8", "engine.num_actors=3"]``.

    Returns:
        The validated config.

    Raises:
        ConfigError: Unknown key, wrongly typed value, value out of range, or a malformed override.
    """
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        parts: list[DictConfig] = [schema]
        if path is not None:
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path}: the top level must be a mapping")
            parts.append(loaded)
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value")
        if overrides:
            parts.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*parts)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from exc
    assert isinstance(cfg, ExperimentConfig)
    return validate(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what a run saves next to its results)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain containers (picklable, shipped to actors)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Inverse of :func:`to_dict` (validated)."""
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), data))
    assert isinstance(cfg, ExperimentConfig)
    return validate(cfg)


def fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """The part of a config that determines results (resume refuses a checkpoint from another one).

    Engine layout, Ray options, output location and debug hooks do not change any result number.
    """
    d = to_dict(cfg)
    for key in ("output_dir", "resume", "ray", "name"):
        d.pop(key, None)
    eng = d.pop("engine")
    d["engine"] = {
        "min_clients": eng["min_clients"],
        "debug_fail_clients": eng["debug_fail_clients"],
        "debug_nonfinite_clients": eng["debug_nonfinite_clients"],
    }
    return d
