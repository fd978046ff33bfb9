"""The LoRA knobs (``workload.lora``) and the section every LoRA workload's config extends.

Light on purpose (no torch, no peft): the driver and the aggregator actor validate and read these without
loading a model. One name per concept: the adapter rank is ``workload.lora.r`` and nothing else (CLAIR's
subspace rank is ``aggregation.rank``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clair_ray.clair.heldout import HELDOUT
from clair_ray.workloads.base import WorkloadConfig, check_fields

if TYPE_CHECKING:
    from clair_ray.config import ExperimentConfig

__all__ = [
    "CLAIR_INPUTS",
    "CLAIR_SIDES",
    "DEVICES",
    "ROUNDS_MODES",
    "LoRAWorkloadConfig",
    "LoraSpec",
    "check_lora",
    "held_back",
]

CLAIR_SIDES = ("column", "row", "both")
CLAIR_INPUTS = ("auto", "factors", "dense")
ROUNDS_MODES = ("global", "personalized")
DEVICES = ("cpu", "cuda")


@dataclass
class LoraSpec:
    """LoRA fine-tuning of a LoRA workload (``workload.lora``).

    Attributes:
        r: Adapter rank.
        alpha: LoRA alpha (effective update (alpha / r) · B A).
        targets: Target module-name suffixes (peft's ``target_modules``; empty: the workload's default:
            the copy task adapts every attention and MLP projection, a Hugging Face model gets peft's
            default for its architecture).
        init_seed: Adapter initialisation seed, the same for every client (so updates are comparable).
        steps: Local AdamW steps per round.
        early_steps: Steps of the early-stopped local baseline ``local_early`` (0: not recorded).
        lr: Local AdamW learning rate.
        batch: Sequences per local step.
        side: CLAIR's projection side for refinement: ``column``, ``row`` or ``both``.
        device: ``cpu`` or ``cuda`` for the client actors (bf16 on cuda).
        eval_every: Multi-round mode: evaluate held-out loss every this many rounds (0: the last round
            only; the last round is always evaluated). One-shot runs evaluate their single round.
        clair_input: What CLAIR sees per module: ``factors`` (default: the pairs (B_k, A_k), centred by a
            low-rank robust mean; never a dense update, so it scales to large modules), ``dense`` (the
            products B_k A_k, centred by a free offset), or ``auto`` (dense up to 65,536 entries per
            module, else factors). On the copy task factors and dense flag the same clients (measured).
        rounds_mode: Multi-round mode, CLAIR and the oracle: ``global`` (the next global adapter is the
            start plus the robust mean of the detected-honest round updates) or ``personalized`` (the
            paper's refinement carried over rounds: the mean goes into the shared base for everyone and
            each detected-honest sampled client keeps its own deviation projected on the refinement
            bases (``aggregation.refine``) in its own adapter, truncated to rank r).
        layers: Adapt the targets in these decoder layers only (peft's ``layers_to_transform``; empty:
            every layer). Backpropagation stops at the lowest adapted layer.
        reuse_prefix: With ``layers`` set, compute the frozen hidden states below the lowest adapted layer
            once per sequence and reuse them across local steps, rounds and every method's evaluation
            (exact; Llama-style decoders, others run the whole model).
        loss_chunk: Tokens per chunk of the output layer (0: whole logits at once). With a large
            vocabulary the logits of a grouped batch are the largest tensor of a step; chunked, only the
            labelled positions go through the output layer and at most this many at a time, recomputed
            in the backward pass instead of stored.
        holdout: Share of each client's local rows held back from training (its last
            ``ceil(holdout * n)`` rows, at least one row left to train on): the held-back loss by which
            ``aggregation.refine: heldout`` chooses CLAIR's and the oracle's refinement (0: none held back).
        refit: With ``holdout`` > 0 and ``refine: heldout``, each client trains twice: without its held-back
            rows (the update only the choice of the refinement is made on) and on all its rows (the update
            every method aggregates, so holding back costs no data, only client compute). false: one
            training without the held-back rows, aggregated by every method.
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
    rounds_mode: str = "global"
    layers: list[int] = field(default_factory=list)
    reuse_prefix: bool = True
    loss_chunk: int = 0
    holdout: float = 0.0
    refit: bool = True

    def __post_init__(self) -> None:
        ints = [
            (getattr(self, n), n, lo)
            for n, lo in (
                ("r", 1),
                ("init_seed", 0),
                ("steps", 1),
                ("early_steps", 0),
                ("batch", 1),
                ("eval_every", 0),
                ("loss_chunk", 0),
            )
        ]
        checks = [
            (not isinstance(v, bool) and isinstance(v, int) and v >= lo, n, v, f"must be an integer >= {lo}")
            for v, n, lo in ints
        ]
        checks += [
            (
                isinstance(getattr(self, n), (int, float))
                and math.isfinite(getattr(self, n))
                and getattr(self, n) > 0,
                n,
                getattr(self, n),
                "must be finite and > 0",
            )
            for n in ("lr", "alpha")
        ]
        checks += [
            (
                self.early_steps <= self.steps,
                "early_steps",
                self.early_steps,
                f"must be <= steps={self.steps}",
            ),
            (self.side in CLAIR_SIDES, "side", self.side, f"must be one of {list(CLAIR_SIDES)}"),
            (self.device in DEVICES, "device", self.device, f"must be one of {list(DEVICES)}"),
            (
                self.rounds_mode in ROUNDS_MODES,
                "rounds_mode",
                self.rounds_mode,
                f"must be one of {list(ROUNDS_MODES)}",
            ),
            (
                self.clair_input in CLAIR_INPUTS,
                "clair_input",
                self.clair_input,
                f"must be one of {list(CLAIR_INPUTS)}",
            ),
            (
                not isinstance(self.targets, str) and all(isinstance(t, str) and t for t in self.targets),
                "targets",
                self.targets,
                "must be a list of module names",
            ),
            (
                not isinstance(self.layers, (str, int))
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)
                and len(set(self.layers)) == len(self.layers),
                "layers",
                self.layers,
                "must be a list of distinct layer indices >= 0",
            ),
            (isinstance(self.reuse_prefix, bool), "reuse_prefix", self.reuse_prefix, "must be true or false"),
            (isinstance(self.refit, bool), "refit", self.refit, "must be true or false"),
            (
                isinstance(self.holdout, (int, float))
                and not isinstance(self.holdout, bool)
                and 0 <= self.holdout < 1,
                "holdout",
                self.holdout,
                "must be a number in [0, 1)",
            ),
        ]
        check_fields("workload.lora", checks)


@dataclass
class LoRAWorkloadConfig(WorkloadConfig):
    """What every LoRA workload's section has besides its task: the LoRA knobs.

    Attributes:
        lora: LoRA fine-tuning (``workload.lora``).
    """

    lora: LoraSpec = field(default_factory=LoraSpec)


def held_back(n: int, share: float) -> int:
    """How many of a client's ``n`` local rows ``workload.lora.holdout = share`` holds back.

    Raises:
        ValueError: When holding back would leave no row to train on (naming the key and the size).
    """
    h = math.ceil(share * n) if share > 0 else 0
    if h >= n:
        raise ValueError(
            f"workload.lora.holdout={share}: a client with {n} local rows would hold back {h} and train on "
            "none (lower holdout or give the clients more rows)"
        )
    return h


def check_lora(cfg: ExperimentConfig) -> None:
    """A LoRA workload's cross-section checks: the device, the multi-round mode's limits, CLAIR's rank,
    the quarantine and ``refine: heldout``'s needs.

    Raises:
        ConfigError: Naming the key and the bad value.
    """
    lw, methods, rank = cfg.workload.lora, cfg.aggregation.methods, cfg.aggregation.rank  # type: ignore[attr-defined]
    name = cfg.workload.name
    multi = cfg.workload.mode == "multi_round"
    bad = [m for m in methods if m == "local_early"]
    # Ray hides every GPU from an actor that reserved none.
    gpu_ok = lw.device != "cuda" or cfg.engine.actor_num_gpus > 0
    check_fields(
        "engine",
        [
            (
                gpu_ok,
                "actor_num_gpus",
                cfg.engine.actor_num_gpus,
                "must be > 0 with workload.lora.device=cuda",
            )
        ],
    )
    needs_rank = [m for m in methods if m == "clair"]
    check_fields(
        "aggregation",
        [
            (
                not multi or not bad,
                "methods",
                list(methods),
                f"{name}: local_early is one-shot only (the early snapshot of a single round)",
            ),
            (
                rank is not None or not needs_rank,
                "rank",
                rank,
                f"must be set for {needs_rank} on LoRA workloads (the detection rank is not chosen "
                "from the data there yet)",
            ),
            (rank is None or 1 <= rank <= lw.r, "rank", rank, f"must be in [1, workload.lora.r={lw.r}]"),
            (
                "side" not in cfg.aggregation.params.get("clair", {}),
                "params.clair.side",
                cfg.aggregation.params.get("clair", {}).get("side"),
                "a LoRA workload's side is workload.lora.side",
            ),
        ],
    )
    check_fields(
        "aggregation",
        [
            (
                cfg.aggregation.quarantine is None or (multi and "clair" in methods),
                "quarantine",
                cfg.aggregation.quarantine,
                "needs workload.mode=multi_round and method clair (a flag history over rounds)",
            ),
            (
                cfg.aggregation.refine != HELDOUT or (not multi and lw.holdout > 0 and lw.device == "cpu"),
                "refine",
                cfg.aggregation.refine,
                "needs workload.mode=one_shot, workload.lora.holdout > 0 (the rows it is judged on) and "
                "workload.lora.device=cpu (the aggregator evaluates the candidates)",
            ),
        ],
    )
    early_ok = "local_early" not in methods or lw.early_steps >= 1
    check_fields(
        "workload.lora",
        [(early_ok, "early_steps", lw.early_steps, "must be >= 1 for method local_early")],
    )
