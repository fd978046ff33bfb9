"""Aggregator actor: attacks, aggregation and per-client metrics of one round.

The actor receives the references of the clients' update batches (never the values through the driver),
fetches them zero-copy, and for each trajectory group (all methods share the first round's updates; in
multi-round mode each method later has its own trajectory):

1. applies the contaminated clients' update attacks. The adversary is simulated here, after every honest
   update of the round exists, because ALIE and IPM are omniscient (they see the round's honest updates);
   each attack draws from its own (trial, round, client) seed;
2. excludes dropouts and non-finite updates (the latter flagged "non-finite"), so no NaN reaches a method;
3. runs each configured aggregator on the remaining clients and maps the results back to client ids;
4. computes per-client metrics against the truth (error, held-out MSE, energy outside U, detectability).

:func:`aggregate_round` is the plain-Python core (no Ray), so it is unit-testable.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from clair_ray import attacks
from clair_ray.aggregators import AggContext, get_aggregator
from clair_ray.config import ExperimentConfig, from_dict
from clair_ray.engine import seeds
from clair_ray.workloads import LinearWorkload, get_workload

NON_FINITE = "non-finite"


class MethodError(RuntimeError):
    """An aggregation method failed (its message says which, where, and why)."""


@dataclass
class Group:
    """The updates of one trajectory group.

    Attributes:
        methods: Methods evaluated on these updates.
        updates: (K, p, q) client updates, NaN rows for clients that did not report.
        dropped: Clients that raised (did not report).
    """

    methods: list[str]
    updates: np.ndarray
    dropped: list[int]


def n_attackers_assumed(cfg: ExperimentConfig, n_active: int) -> int:
    """Number of attackers that baselines assume: the configured fraction of the active clients.

    Rounded half up like ``attacks.select_contaminated``. Never the true count: it comes from config.
    """
    frac = cfg.aggregation.assumed_fraction
    if frac is None:
        frac = cfg.contamination.fraction
    return int(math.floor(frac * n_active + 0.5 + 1e-9))


def _noise_scale(cfg: ExperimentConfig, n: torch.Tensor, reported: np.ndarray) -> torch.Tensor | None:
    """(K,) the ``ctx.noise_scale`` chosen by ``aggregation.noise_scale``."""
    if cfg.aggregation.noise_scale == "none":
        return None
    if cfg.aggregation.noise_scale == "inv_sqrt_n":
        return 1.0 / torch.sqrt(n)
    # "reported": the scale each client computed from its own inputs; 1 where a client reported none.
    s = torch.as_tensor(np.nan_to_num(reported, nan=1.0), dtype=torch.float64)
    return s


def _attack_params(cfg: ExperimentConfig, kind: str, n_contaminated: int) -> dict[str, Any]:
    """Attack parameters from config, with defaults the attacker can know filled in."""
    params = dict(cfg.contamination.params.get(kind, {}))
    if kind == "alie" and params.get("z") is None:
        params.setdefault("num_clients", cfg.workload.num_clients)
        params.setdefault("num_attackers", max(n_contaminated, 1))
    if kind == "other_subspace" and params.get("rank") is None:
        params["rank"] = cfg.workload.r
    return params


def apply_attacks(
    cfg: ExperimentConfig,
    workload: LinearWorkload,
    trial: int,
    round_: int,
    updates: torch.Tensor,
    ok: np.ndarray,
) -> torch.Tensor:
    """Replaces contaminated reporting clients' updates by their attacks.

    Args:
        cfg: The config.
        workload: The workload (truth: who attacks how).
        trial: Trial index.
        round_: Round index.
        updates: (K, p, q) honest local updates (data attacks already inside).
        ok: (K,) clients that reported a finite update.

    Returns:
        (K, p, q) the updates the server receives.
    """
    prob = workload.problem(trial)
    honest_ids = [k for k in range(len(ok)) if ok[k] and k not in prob.attack]
    honest = updates[honest_ids] if honest_ids else None  # (H, p, q)
    out = updates.clone()
    for k, kind in prob.attack.items():
        if not ok[k] or attacks.is_data_attack(kind):
            continue
        g = seeds.torch_generator(seeds.derive_seed(cfg.seed, seeds.ATTACK, trial, round_, k))
        params = _attack_params(cfg, kind, len(prob.contaminated))
        out[k] = attacks.apply_update_attack(kind, updates[k], honest, g, **params)
    return out


def aggregate_round(
    cfg: ExperimentConfig,
    workload: LinearWorkload,
    trial: int,
    round_: int,
    groups: list[Group],
    noise: dict[str, np.ndarray],
    prev: dict[str, np.ndarray] | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Runs every method of every group on one round's updates.

    Args:
        cfg: The config.
        workload: The workload.
        trial: Trial index.
        round_: Round index.
        groups: The round's trajectory groups.
        noise: ``noise_level`` (K,) each client's noise level outside U (detection truth only) and
            ``noise_scale`` (K,) the relative noise level each client reported (NaN if it did not).
        prev: Method -> (K, p, q) the models clients started this round from (None: first round).

    Returns:
        Per method: per-client arrays (``flagged, reason, error, test_mse, update_norm, off_subspace,
        detectable, valid``) and ``subspace_error`` and ``agg_s``; and per method the (K, p, q) models
        clients continue from (a client without a valid result keeps its previous model; none after the
        last round).
    """
    prob = workload.problem(trial)
    K = cfg.workload.num_clients
    contaminated = np.zeros(K, dtype=bool)
    contaminated[prob.contaminated] = True
    n = torch.as_tensor(prob.n, dtype=torch.float64)
    metas: dict[str, dict[str, Any]] = {}
    nexts: dict[str, np.ndarray] = {}
    last = cfg.workload.mode == "one_shot" or round_ + 1 >= cfg.workload.rounds
    for group in groups:
        raw = torch.from_numpy(np.asarray(group.updates, dtype=np.float64))  # (K, p, q)
        reported = np.ones(K, dtype=bool)
        reported[group.dropped] = False
        finite = torch.isfinite(raw).flatten(1).all(dim=1).numpy() & reported  # (K,)
        sent = apply_attacks(cfg, workload, trial, round_, raw, finite)  # (K, p, q)
        valid = torch.isfinite(sent).flatten(1).all(dim=1).numpy() & reported  # (K,)
        active = np.flatnonzero(valid).tolist()
        off = workload.off_subspace_energy(trial, sent)  # (K,)
        detectable = contaminated & valid & (off > cfg.workload.truth_factor * noise["noise_level"])
        norms = torch.linalg.matrix_norm(sent).numpy()  # (K,)
        honest_active = [i for i, k in enumerate(active) if not contaminated[k]]
        scale = _noise_scale(cfg, n, noise["noise_scale"])
        ctx = AggContext(
            rank=cfg.aggregation.rank,
            n_attackers=n_attackers_assumed(cfg, len(active)),
            offset=cfg.workload.base_scale > 0,
            noise_scale=None if scale is None else scale[active],
            seed=seeds.derive_seed(cfg.seed, seeds.METHOD, trial, round_),
            honest=honest_active,
            true_subspace=prob.U,
        )
        for method in group.methods:
            t0 = time.perf_counter()
            try:
                agg = get_aggregator(method, **cfg.aggregation.params.get(method, {}))
                out = agg.aggregate(sent[active], ctx) if active else None
            except Exception as exc:
                raise MethodError(
                    f"trial {trial} round {round_}: method {method!r} failed on {len(active)} clients: {exc}"
                ) from exc
            agg_s = time.perf_counter() - t0
            result = torch.full_like(sent, float("nan"))  # (K, p, q)
            flagged = np.zeros(K, dtype=bool)
            reason = [""] * K
            for k in np.flatnonzero(reported & ~valid):
                flagged[k], reason[k] = True, NON_FINITE
            subspace = None
            if out is not None:
                result[active] = out.per_client.to(torch.float64)
                for j in out.flagged:
                    flagged[active[j]] = True
                    reason[active[j]] = str(out.reasons.get(j, method))
                subspace = out.subspace
            metrics = workload.errors(trial, result)
            if not last:  # the last round's models go nowhere: don't build K x p x q of them
                start = (
                    prev[method]
                    if prev is not None
                    else np.broadcast_to(workload.initial_model(), sent.shape)
                )
                nxt = np.where(valid[:, None, None], result.numpy(), start)  # (K, p, q)
                nexts[method] = np.ascontiguousarray(nxt)
            metas[method] = {
                "flagged": flagged,
                "reason": reason,
                "error": metrics["error"],
                "test_mse": metrics["test_mse"],
                "update_norm": norms,
                "off_subspace": off,
                "detectable": detectable,
                "valid": valid,
                "dropped": ~reported,
                "subspace_error": workload.subspace_error(trial, subspace),
                "agg_s": agg_s,
            }
    return metas, nexts


def _stamp(metas: dict[str, dict[str, Any]], seconds: float) -> None:
    """Records the aggregator's whole compute time of the round (methods, attacks, truth metrics) in
    every method's meta as ``aggregator_s``: the runner's timing split counts it as aggregation."""
    for m in metas.values():
        m["aggregator_s"] = seconds


@ray.remote
class AggregatorActor:
    """Runs :func:`aggregate_round` next to the object store; one per run."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        """Builds the workload truth once.

        Args:
            cfg_dict: The experiment config as plain containers.
        """
        torch.set_num_threads(1)
        self.cfg = from_dict(cfg_dict)
        self.workload = get_workload(self.cfg)

    def aggregate(
        self,
        trial: int,
        round_: int,
        groups: list[dict[str, Any]],
        noise: dict[str, np.ndarray],
        prev_box: list[Any],
        timeout_s: float,
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any] | None]:
        """Fetches the groups' update batches and aggregates.

        Args:
            trial: Trial index.
            round_: Round index.
            groups: Per group ``methods``, ``dropped`` and ``batches``: a list of (client_ids, ref of the
                (B, p, q) updates). Refs nested in a list arrive as refs, not values.
            noise: Per-client noise arrays (see :func:`aggregate_round`).
            prev_box: ``[ref]`` to the previous round's models (``[]`` in the first round).
            timeout_s: Timeout of every fetch.

        Returns:
            See :func:`aggregate_round`, plus the evaluation plan of a workload that evaluates on the client
            actors (None for the linear workload, which evaluates here).
        """
        own = getattr(self.workload, "aggregate_round", None)
        if own is not None:
            # Workloads with their own update format aggregate themselves; the payloads are fetched here,
            # zero-copy, as for the dense path. Their held-out evaluation is left to the client actors
            # (which hold the model already): the third return is the evaluation plan.
            fetched = []
            for g in groups:
                arrays = ray.get([ref for _, ref in g["batches"]], timeout=timeout_s)
                batches = [(ids, arr) for (ids, _), arr in zip(g["batches"], arrays, strict=True)]
                fetched.append({**g, "batches": batches})
            prev = ray.get(prev_box[0], timeout=timeout_s) if prev_box else None
            t0 = time.perf_counter()
            out = own(trial, round_, fetched, noise, prev, evaluate=False)
            _stamp(out[0], time.perf_counter() - t0)
            return out
        K, p, q = self.cfg.workload.num_clients, self.cfg.workload.p, self.cfg.workload.q
        plain: list[Group] = []
        for g in groups:
            updates = np.full((K, p, q), np.nan)  # (K, p, q)
            arrays = ray.get([ref for _, ref in g["batches"]], timeout=timeout_s)
            for (ids, _), arr in zip(g["batches"], arrays, strict=True):
                updates[ids] = arr
            plain.append(Group(methods=list(g["methods"]), updates=updates, dropped=list(g["dropped"])))
        prev = ray.get(prev_box[0], timeout=timeout_s) if prev_box else None
        t0 = time.perf_counter()
        metas, nexts = aggregate_round(self.cfg, self.workload, trial, round_, plain, noise, prev)
        _stamp(metas, time.perf_counter() - t0)
        return metas, nexts, None
