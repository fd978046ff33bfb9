"""The aggregator side of every LoRA workload: update attacks per module, every method, the evaluation plan.

:func:`aggregate_round` is :meth:`LoRAWorkload.aggregate_round`. It never needs the model: held-out
evaluation is returned as an :class:`~clair_ray.workloads.base.EvalPlan` (per method the shared dense
correction per module and each evaluated client's adapter), which the engine hands to the client
actors; called with ``evaluate=True`` (tests, no Ray) it evaluates in place instead.

One-shot mode runs every method of :func:`clair_ray.workloads.lora.methods.run_method` on the round's
factor pairs. Multi-round mode runs ``fedavg`` as FedIT does: the server averages the B factors and the
A factors (:func:`~clair_ray.workloads.lora.methods.fedavg_factors`) into the next global adapter, which
every client starts from the next round; clients are evaluated on the global adapter every
``eval_every`` rounds and in the last one. Update attacks need a dense update, so that mode takes data
attacks only.

Detection truth: every contaminated client except the in-subspace update attacks, which no subspace
method can see. A LoRA task has no known true subspace.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from clair_ray import attacks, seeds
from clair_ray.workloads.base import (
    EvalPlan,
    Group,
    MethodRound,
    RoundOutput,
    non_finite_flags,
    refine_scalars,
)
from clair_ray.workloads.lora.methods import Factors, ModuleUpdates, fedavg_factors, run_method

if TYPE_CHECKING:
    from clair_ray.workloads.lora.workload import LoRAWorkload

__all__ = ["EVAL_METRICS", "aggregate_round", "collect", "nan_metrics"]

#: Held-out metrics recorded per client: result column -> key of the evaluation's answer.
EVAL_METRICS = {"test_loss": "loss", "exact_match": "exact_match", "token_accuracy": "token_accuracy"}


def nan_metrics(K: int) -> dict[str, np.ndarray]:
    """(K,) NaN per held-out metric column (filled in by evaluation)."""
    return {name: np.full(K, np.nan) for name in EVAL_METRICS}


def collect(K: int, group: Group) -> tuple[list[str], list[Factors], list[Factors], np.ndarray]:
    """(module names, each client's final and early factors ({} if absent), (K,) finite & reported)."""
    batches = [(ids, pl) for ids, pl in group.batches if pl["final"]]
    if not batches:
        raise RuntimeError("no client batch sent any update")
    names = list(batches[0][1]["final"])
    own: list[Factors] = [{} for _ in range(K)]
    own_early: list[Factors] = [{} for _ in range(K)]
    ok = np.zeros(K, dtype=bool)
    for ids, pl in batches:
        for j, k in enumerate(ids):
            # Copies: object-store arrays are read-only views, which torch warns about.
            own[k] = {n: (pl["final"][n][0][j].copy(), pl["final"][n][1][j].copy()) for n in names}
            if pl["early"] is not None:
                own_early[k] = {n: (pl["early"][n][0][j].copy(), pl["early"][n][1][j].copy()) for n in names}
            ok[k] = all(np.isfinite(b).all() and np.isfinite(a).all() for b, a in own[k].values())
    ok[list(group.dropped)] = False
    return names, own, own_early, ok


def aggregate_round(
    wl: LoRAWorkload, trial: int, round_: int, groups: list[Group], prev: Any, evaluate: bool = False
) -> RoundOutput:
    """Attacks, every method per module, and (in place or as a plan) the honest clients' evaluation.

    Args:
        wl: The workload.
        trial: Trial index.
        round_: Round index.
        groups: One-shot: one group; multi-round: one group per method after the first round.
        prev: Unused (the global adapter travels to the clients, not back here).
        evaluate: Evaluate here (needs the model; tests without Ray) instead of returning a plan.

    Returns:
        Per method its results, the next round's global adapter per method (none one-shot), and the
        evaluation plan (None with ``evaluate=True``).
    """
    del prev
    plan: dict[str, Any] = {}
    out = RoundOutput(methods={})
    if wl.multi_round:
        for group in groups:
            _fedavg_round(wl, trial, round_, group, evaluate, plan, out)
    else:
        (group,) = groups
        _one_shot(wl, trial, round_, group, evaluate, plan, out)
    if plan:
        clients = sorted({k for p in plan.values() for k in p["clients"]})
        out.plan = EvalPlan(clients=clients, data=plan)
    return out


def _fedavg_round(
    wl: LoRAWorkload, trial: int, round_: int, group: Group, evaluate: bool, plan: dict, out: RoundOutput
) -> None:
    """Multi-round FedAvg (FedIT): average the factors, evaluate the global adapter when due."""
    K, contamination = wl.K, wl.contamination(trial)
    _, own, _, valid = collect(K, group)
    reported = np.ones(K, dtype=bool)
    reported[list(group.dropped)] = False
    active = np.flatnonzero(valid).tolist()
    t0 = time.perf_counter()
    glob = fedavg_factors([own[k] for k in active])
    agg_s = time.perf_counter() - t0
    names = list(next(f for f in own if f))
    norms = ModuleUpdates({n: [own[k][n] if valid[k] else None for k in range(K)] for n in names}).norms()
    every = wl.lw.eval_every
    due = round_ + 1 == wl.rounds or (every > 0 and (round_ + 1) % every == 0)
    t1 = time.perf_counter()
    honest = [k for k in active if k not in contamination.attack]
    metrics = nan_metrics(K)
    if due and evaluate:
        metrics = wl.evaluate_clients(trial, honest, {}, dict.fromkeys(honest, glob))
    eval_s = time.perf_counter() - t1
    flagged, reason = non_finite_flags(reported, valid)
    for method in group.methods:
        if due and not evaluate:
            plan[method] = {"corr": {}, "shared": glob, "adapters": {}, "clients": honest}
        out.methods[method] = MethodRound(
            flagged=flagged,
            reason=reason,
            detectable=np.zeros(K, dtype=bool),
            dropped=~reported,
            update_norm=norms,
            metrics=dict(metrics),
            agg_s=agg_s,
            eval_s=eval_s,
        )
        out.nexts[method] = glob


def _attack_updates(
    wl: LoRAWorkload, trial: int, round_: int, ups: ModuleUpdates, finite: np.ndarray
) -> None:
    """Update attacks, per module, after every honest update exists (ALIE and IPM are omniscient); they
    act on dense updates, and the server then holds an exact factorisation of each attacked one."""
    contamination, K = wl.contamination(trial), wl.K
    honest_ids = [k for k in range(K) if finite[k] and k not in contamination.attack]
    ctx = attacks.AttackContext(K, len(contamination.contaminated), wl.lw.r)
    for k, kind in contamination.update_attackers().items():
        if not finite[k]:
            continue
        g = seeds.torch_generator(seeds.derive_seed(wl.cfg.seed, seeds.ATTACK, trial, round_, k))
        params = wl.cfg.contamination.params.get(kind, {})
        for n in ups.names:
            dense = ups.dense(n)
            honest = dense[honest_ids] if honest_ids else None
            ups.set_dense(n, k, attacks.apply_update_attack(kind, dense[k].clone(), honest, g, ctx, **params))


def _one_shot(
    wl: LoRAWorkload, trial: int, round_: int, group: Group, evaluate: bool, plan: dict, out: RoundOutput
) -> None:
    K, contamination, cfg = wl.K, wl.contamination(trial), wl.cfg
    names, own, own_early, finite = collect(K, group)
    reported = np.ones(K, dtype=bool)
    reported[list(group.dropped)] = False
    ups = ModuleUpdates({n: [own[k][n] if own[k] else None for k in range(K)] for n in names})
    _attack_updates(wl, trial, round_, ups, finite)
    valid = reported & ups.finite()
    active = np.flatnonzero(valid).tolist()
    contaminated = np.zeros(K, dtype=bool)
    contaminated[contamination.contaminated] = True
    detectable = np.array(
        [
            valid[k] and k in contamination.attack and not _in_subspace(contamination.attack[k])
            for k in range(K)
        ]
    )
    norms = ups.norms()  # (K,)
    honest_eval = [k for k in active if not contaminated[k]]
    method_seed = seeds.derive_seed(cfg.seed, seeds.METHOD, trial, round_)
    n_att = attacks.assumed_attackers(
        cfg.aggregation.assumed_fraction, cfg.contamination.fraction, len(active)
    )
    for method in group.methods:
        t0 = time.perf_counter()
        flagged, reason = non_finite_flags(reported, valid)
        choices: dict[str, Any] = {}
        corr, adapters, fl, why = run_method(
            method,
            ups,
            own,
            own_early,
            active,
            honest_eval,
            rank=wl.rank,
            side=wl.lw.side,
            clair_mode=wl.lw.clair_input,
            params=cfg.aggregation.params,
            n_attackers=n_att,
            seed=method_seed,
            refine=cfg.aggregation.refine,
            choices=choices,
        )
        for k in fl:
            flagged[k], reason[k] = True, why.get(k, method)
        agg_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if evaluate:
            metrics = wl.evaluate_clients(trial, honest_eval, corr, adapters)
        else:
            metrics = nan_metrics(K)
            plan[method] = {"corr": corr, "shared": None, "adapters": adapters, "clients": honest_eval}
        out.methods[method] = MethodRound(
            flagged=flagged,
            reason=reason,
            detectable=detectable,
            dropped=~reported,
            update_norm=norms,
            metrics=metrics,
            scalars=refine_scalars(choices) if choices else {},
            agg_s=agg_s,
            eval_s=time.perf_counter() - t1,
        )


def _in_subspace(kind: str) -> bool:
    return kind in attacks.ATTACKS and attacks.ATTACKS[kind].in_subspace
