"""The LoRA knobs (``workload.lora``) and the section every LoRA workload's config extends.

Light on purpose (no torch, no peft): the driver and the aggregator actor validate and read these without
loading a model. One name per concept: the adapter rank is ``workload.lora.r`` and nothing else (CLAIR's
subspace rank is ``aggregation.rank``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from clair_ray.workloads.base import WorkloadConfig, check_fields

__all__ = ["CLAIR_INPUTS", "CLAIR_SIDES", "DEVICES", "ROUNDS_MODES", "LoRAWorkloadConfig", "LoraSpec"]

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
        ]
        check_fields("workload.lora", checks)


@dataclass
class LoRAWorkloadConfig(WorkloadConfig):
    """What every LoRA workload's section has besides its task: the LoRA knobs.

    Attributes:
        lora: LoRA fine-tuning (``workload.lora``).
    """

    lora: LoraSpec = field(default_factory=LoraSpec)
