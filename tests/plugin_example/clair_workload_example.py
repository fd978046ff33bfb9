"""An example clair_ray plugin: a whole workload with its own config section and metric columns.

Mean estimation: client k's samples are mu + noise (drawn from its data seed); its update is its local
estimate (one-shot) or a step towards it (multi-round). The server runs every configured registered
aggregator on the round's (attacked) updates; ``toy_metric`` (per client, with an honest mean in the
summary) is ‖result − mu‖_F and ``toy_n_kept`` (per method) the number of clients a method kept::

    plugins: [clair_workload_example]
    workload: {name: toy_mean, num_clients: 9, p: 3, q: 2}
    aggregation: {methods: [fedavg, median]}

``tests/test_contract.py`` runs it on the engine and checks every number against a separate simulation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clair_ray import attacks, seeds
from clair_ray.aggregators import AggContext, get_aggregator
from clair_ray.aggregators._common import finite_mask
from clair_ray.attacks import AttackContext
from clair_ray.config import ExperimentConfig
from clair_ray.workloads.base import (
    ClientJob,
    Column,
    Group,
    MethodRound,
    RoundOutput,
    TrainOutput,
    Workload,
    WorkloadConfig,
    check_fields,
    register_workload,
)

NON_FINITE = "non-finite"


@dataclass
class ToyMeanConfig(WorkloadConfig):
    """The toy workload (``workload.name: toy_mean``): every client estimates one (p, q) mean.

    Attributes:
        p: Rows of the mean.
        q: Columns of the mean.
        n_samples: Samples per client (its local estimate is their mean).
        noise_std: Standard deviation of a sample around the true mean.
        step: Multi-round mode: a client moves this fraction of the way from the model it continues from
            to its local estimate (one-shot: its update is the local estimate).
    """

    name: str = "toy_mean"
    p: int = 3
    q: int = 2
    n_samples: int = 4
    noise_std: float = 0.5
    step: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(
            "workload",
            [(getattr(self, k) >= 1, k, getattr(self, k), "must be >= 1") for k in ("p", "q", "n_samples")]
            + [
                (
                    math.isfinite(self.noise_std) and self.noise_std >= 0,
                    "noise_std",
                    self.noise_std,
                    "must be finite and >= 0",
                ),
                (0 < self.step <= 1, "step", self.step, "must be in (0, 1]"),
            ],
        )


@register_workload("toy_mean")
class ToyMeanWorkload(Workload):
    """Mean estimation: client k's samples are mu + noise (its data seed), its update its local estimate
    (one-shot) or a step towards it (multi-round); ``toy_metric`` is ‖result − mu‖_F."""

    config_class = ToyMeanConfig
    columns = (Column("toy_metric", honest_mean=True), Column("toy_n_kept", level="method"))
    data_attacks = ()  # no data pipeline: only update attacks

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.w: ToyMeanConfig = cfg.workload  # type: ignore[assignment]

    def truth(self, trial: int) -> np.ndarray:
        """(p, q) the true mean of ``trial``."""
        rng = np.random.default_rng(seeds.derive_seed(self.cfg.seed, seeds.PROBLEM, trial))
        return rng.standard_normal((self.w.p, self.w.q))

    def local_mean(self, trial: int, k: int) -> np.ndarray:
        """(p, q) client k's estimate: the mean of its samples."""
        rng = np.random.default_rng(seeds.derive_seed(self.cfg.seed, seeds.DATA, trial, -1, k))
        noise = self.w.noise_std * rng.standard_normal((self.w.n_samples, self.w.p, self.w.q))
        return self.truth(trial) + noise.mean(axis=0)

    def train_batch(self, trial: int, round_: int, jobs: list[ClientJob], start: Any) -> TrainOutput:
        """(B, p, q) updates; ``start`` is the trajectory's (K, p, q) models (None in the first round)."""
        del round_
        out = np.empty((len(jobs), self.w.p, self.w.q))
        for i, job in enumerate(jobs):
            m = self.local_mean(trial, job.client_id)
            if self.w.mode == "one_shot":
                out[i] = m
            else:
                s = np.zeros_like(m) if start is None else np.asarray(start[job.client_id])
                out[i] = s + self.w.step * (m - s)
        info = [{"n_samples": self.w.n_samples, "bytes_sent": int(out[0].nbytes)} for _ in jobs]
        return TrainOutput(payload=out, info=info)

    def corrupt_updates(self, payload: np.ndarray, positions: list[int]) -> np.ndarray:
        out = np.array(payload, copy=True)
        out[positions] = np.nan
        return out

    def aggregate_round(self, trial: int, round_: int, groups: list[Group], prev: Any) -> RoundOutput:
        K, w, c = self.K, self.w, self.cfg
        plan, mu = self.contamination(trial), self.truth(trial)
        out = RoundOutput(methods={})
        last = round_ + 1 >= w.n_rounds
        for group in groups:
            arr = np.full((K, w.p, w.q), np.nan)
            for ids, payload in group.batches:
                arr[ids] = payload
            reported = np.ones(K, dtype=bool)
            reported[group.dropped] = False
            sent = torch.from_numpy(arr)  # (K, p, q)
            finite = finite_mask(sent).numpy() & reported
            honest_ids = [k for k in range(K) if finite[k] and k not in plan.attack]
            actx = AttackContext(K, len(plan.contaminated), 1)
            for k, kind in plan.update_attackers().items():
                if finite[k]:
                    g = seeds.torch_generator(seeds.derive_seed(c.seed, seeds.ATTACK, trial, round_, k))
                    honest = sent[honest_ids] if honest_ids else None
                    params = c.contamination.params.get(kind, {})
                    sent[k] = attacks.apply_update_attack(kind, sent[k].clone(), honest, g, actx, **params)
            valid = finite_mask(sent).numpy() & reported
            active = np.flatnonzero(valid).tolist()
            detectable = np.isin(np.arange(K), plan.contaminated) & valid
            norms = torch.linalg.matrix_norm(sent).numpy()  # (K,)
            ctx = AggContext(
                n_attackers=attacks.assumed_attackers(
                    c.aggregation.assumed_fraction, c.contamination.fraction, len(active)
                ),
                seed=seeds.derive_seed(c.seed, seeds.METHOD, trial, round_),
                honest=[i for i, k in enumerate(active) if k not in plan.attack],
            )
            for method in group.methods:
                t0 = time.perf_counter()
                res = get_aggregator(method, **c.aggregation.params.get(method, {})).aggregate(
                    sent[active], ctx
                )
                result = np.full((K, w.p, w.q), np.nan)
                result[active] = res.per_client.double().numpy()
                flagged, reason = np.zeros(K, dtype=bool), [""] * K
                for k in np.flatnonzero(reported & ~valid):
                    flagged[k], reason[k] = True, NON_FINITE
                for j in res.flagged:
                    flagged[active[j]], reason[active[j]] = True, res.reasons.get(j, method)
                if not last:
                    start = prev[method] if prev is not None else np.zeros_like(result)
                    out.nexts[method] = np.where(valid[:, None, None], result, start)
                out.methods[method] = MethodRound(
                    flagged=flagged,
                    reason=reason,
                    detectable=detectable,
                    dropped=~reported,
                    update_norm=norms,
                    metrics={"toy_metric": np.linalg.norm(result - mu, axis=(1, 2))},
                    scalars={"toy_n_kept": float(len(active) - len(res.flagged))},
                    agg_s=time.perf_counter() - t0,
                )
        return out
