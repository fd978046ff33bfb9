"""The aggregator side of every LoRA workload: update attacks per module, every method, the evaluation plan.

:func:`aggregate_round` is :meth:`LoRAWorkload.aggregate_round`. It never needs the model: held-out
evaluation is returned as an :class:`~clair_ray.workloads.base.EvalPlan` (per method the shared dense
correction per module and each evaluated client's adapter), which the engine hands to the client
actors; called with ``evaluate=True`` (tests, no Ray) it evaluates in place instead.

One-shot mode runs every method of :func:`clair_ray.workloads.lora.methods.run_method` on the round's
factor pairs. Multi-round mode gives every method its own trajectory
(:mod:`clair_ray.workloads.lora.trajectory`): the round's sampled clients start from it, their round
updates (new adapter minus start, a factor pair of rank <= 2r) are attacked and aggregated, and the
method's next global adapter is the start plus its aggregate (``fedavg`` stays FedIT: the mean of the
B's and of the A's; ``local`` keeps each client's own adapter). Clients are evaluated every
``eval_every`` rounds (the round's sampled honest clients) and after the last one (every honest client).

Detection truth: every contaminated client except the in-subspace update attacks, which no subspace
method can see. A LoRA task has no known true subspace.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from clair_ray import attacks, seeds
from clair_ray.clair import heldout
from clair_ray.workloads.base import (
    EvalPlan,
    Group,
    MethodRound,
    RoundOutput,
    non_finite_flags,
    refine_scalars,
)
from clair_ray.workloads.lora import trajectory
from clair_ray.workloads.lora.methods import (
    REFINING,
    Factors,
    ModuleUpdates,
    Validate,
    run_method,
    zero_adapter,
)

if TYPE_CHECKING:
    from clair_ray.workloads.lora.workload import LoRAWorkload

__all__ = ["EVAL_METRICS", "aggregate_round", "collect", "nan_metrics"]

#: Held-out metrics recorded per client: result column -> key of the evaluation's answer.
EVAL_METRICS = {"test_loss": "loss", "exact_match": "exact_match", "token_accuracy": "token_accuracy"}


def nan_metrics(K: int) -> dict[str, np.ndarray]:
    """(K,) NaN per held-out metric column (filled in by evaluation)."""
    return {name: np.full(K, np.nan) for name in EVAL_METRICS}


def collect(
    K: int, group: Group, key: str = "final"
) -> tuple[list[str], list[Factors], list[Factors], np.ndarray]:
    """(module names, each client's ``key`` (final, or select) and early factors ({} if absent), (K,)
    finite & reported)."""
    batches = [(ids, pl) for ids, pl in group.batches if pl.get(key)]
    if not batches:
        raise RuntimeError(f"no client batch sent any update ({key})")
    names = list(batches[0][1][key])
    own: list[Factors] = [{} for _ in range(K)]
    own_early: list[Factors] = [{} for _ in range(K)]
    ok = np.zeros(K, dtype=bool)
    for ids, pl in batches:
        for j, k in enumerate(ids):
            # Copies: object-store arrays are read-only views, which torch warns about.
            own[k] = {n: (pl[key][n][0][j].copy(), pl[key][n][1][j].copy()) for n in names}
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
        prev: Multi-round: the previous round's ``nexts`` (method -> trajectory state; None in the first
            round), against which the round updates are formed.
        evaluate: Evaluate here (needs the model; tests without Ray) instead of returning a plan.

    Returns:
        Per method its results, the next round's global adapter per method (none one-shot), and the
        evaluation plan (None with ``evaluate=True``).
    """
    plan: dict[str, Any] = {}
    out = RoundOutput(methods={})
    if wl.multi_round:
        for group in groups:
            _multi_round(wl, trial, round_, group, prev, evaluate, plan, out)
    else:
        (group,) = groups
        _one_shot(wl, trial, round_, group, evaluate, plan, out)
    if plan:
        clients = sorted({k for p in plan.values() for k in p["clients"]})
        out.plan = EvalPlan(clients=clients, data=plan)
    return out


def _multi_round(
    wl: LoRAWorkload,
    trial: int,
    round_: int,
    group: Group,
    prev: dict[str, Any] | None,
    evaluate: bool,
    plan: dict,
    out: RoundOutput,
) -> None:
    """One round of every method of ``group`` (all of them in the first round, one afterwards).

    The round updates are factor pairs against each client's start in the group's trajectory
    (:func:`~clair_ray.workloads.lora.trajectory.round_pairs`); update attacks act on them (ALIE and IPM
    over the round's honest updates); each method then moves its own trajectory
    (:func:`_next_state`). Evaluation, when due: the round's sampled honest clients, and every honest
    client after the last round.
    """
    K, contamination, cfg = wl.K, wl.contamination(trial), wl.cfg
    sample = group.clients or list(range(K))
    state = None if prev is None else prev[group.methods[0]]  # methods share a group in the first round
    names, own, _, finite = collect(K, group)
    in_sample = np.zeros(K, dtype=bool)
    in_sample[sample] = True
    reported = in_sample.copy()
    reported[list(group.dropped)] = False
    starts = [trajectory.start_of(state, k) for k in range(K)]
    ups = ModuleUpdates(
        {
            n: [trajectory.round_pairs(own[k], starts[k])[n] if own[k] else None for k in range(K)]
            for n in names
        }
    )
    attacked = _attack_updates(wl, trial, round_, ups, finite)
    valid = reported & ups.finite()
    active = np.flatnonzero(valid).tolist()
    contaminated = np.zeros(K, dtype=bool)
    contaminated[contamination.contaminated] = True
    detectable = _detectable(contamination.attack, valid)
    norms = ups.norms()  # (K,) NaN outside the sample
    honest_active = [k for k in active if not contaminated[k]]
    last = round_ + 1 == wl.rounds
    every = wl.lw.eval_every
    due = last or (every > 0 and (round_ + 1) % every == 0)
    eval_ids = [k for k in range(K) if not contaminated[k]] if last else honest_active
    method_seed = seeds.derive_seed(cfg.seed, seeds.METHOD, trial, round_)
    n_att = attacks.assumed_attackers(
        cfg.aggregation.assumed_fraction, cfg.contamination.fraction, len(active)
    )
    zero = zero_adapter(ups)  # a client that never trained (``local``)
    for method in group.methods:
        t0 = time.perf_counter()
        flagged, reason = non_finite_flags(reported, valid)
        mstate = None if prev is None else prev[method]
        choices: dict[str, Any] = {}
        nxt, fl, why = _next_state(
            wl, method, mstate, ups, own, starts, attacked, active, honest_active, method_seed, n_att, choices
        )
        for k in fl:
            flagged[k], reason[k] = True, why.get(k, method)
        agg_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics = nan_metrics(K)
        if due:
            adapters = {k: trajectory.start_of(nxt, k) or zero for k in eval_ids}
            if evaluate:
                metrics = wl.evaluate_clients(trial, eval_ids, nxt["corr"], adapters)
            else:
                plan[method] = {
                    "corr": nxt["corr"],
                    "shared": None,
                    "adapters": adapters,
                    "clients": eval_ids,
                }
        out.methods[method] = MethodRound(
            flagged=flagged,
            reason=reason,
            detectable=detectable,
            dropped=in_sample & ~reported,
            update_norm=norms,
            metrics=metrics,
            scalars=refine_scalars(choices) if choices else {},
            agg_s=agg_s,
            eval_s=time.perf_counter() - t1,
        )
        if not last or wl.cfg.export_adapters:  # the last round's state is only needed for the export
            out.nexts[method] = nxt


def _next_state(
    wl: LoRAWorkload,
    method: str,
    state: trajectory.RoundState | None,
    ups: ModuleUpdates,
    own: list[Factors],
    starts: list[Factors | None],
    attacked: set[int],
    active: list[int],
    honest: list[int],
    seed: int,
    n_attackers: int,
    choices: dict[str, Any],
) -> tuple[trajectory.RoundState, list[int], dict[int, str]]:
    """A method's next trajectory state from the round's updates; (state, flagged, reasons). A
    personalized refinement records its choice per module in ``choices``.

    - ``local``: every client that sent an update keeps its own adapter (no aggregation);
    - ``fedavg``: FedIT, the mean of the B's and of the A's of the clients' adapters. An update attacker
      must send a rank-r adapter too: the best rank-r approximation of start + its attacked update;
    - every other method: its aggregate of the round updates (``run_method`` with refinement 0: CLAIR's
      robust mean over the detected-honest clients, the oracle's over the true honest ones, a baseline's
      robust aggregate), added to the global product (:func:`~clair_ray.workloads.lora.trajectory.advance`);
    - CLAIR and the oracle with ``workload.lora.rounds_mode: personalized``: the one-shot refinement of the
      round updates (``aggregation.refine``) carried over
      (:func:`~clair_ray.workloads.lora.trajectory.personalize`).
    """
    r = wl.lw.r
    if method == "local":
        # Clients never sampled start from peft's initialisation (shared None).
        nxt = {"corr": {}, "shared": None, "personal": {}, "history": {}} if state is None else dict(state)
        personal = dict(nxt.get("personal") or {})
        personal.update({k: own[k] for k in active if k not in attacked})
        for k in attacked & set(active):
            personal[k] = _attacker_adapter(ups, k, starts[k], r)
        return {**nxt, "personal": personal}, [], {}
    if method == "fedavg":
        adapters = [_attacker_adapter(ups, k, starts[k], r) if k in attacked else own[k] for k in active]
        return trajectory.fedit(state, adapters), [], {}
    cfg = wl.cfg
    history = {} if state is None else state.get("history", {})
    quarantine = cfg.aggregation.quarantine if method == "clair" else None
    exclude = frozenset(_quarantined(quarantine, history, active))
    personalized = wl.lw.rounds_mode == "personalized" and method in REFINING
    means: dict[str, np.ndarray] = {}
    corr, adapters, fl, why = run_method(
        method,
        ups,
        own,
        [{}] * wl.K,
        active,
        # personalized CLAIR: every client it may refine (it does not know who is honest)
        active if personalized and method == "clair" else honest,
        **_config_args(wl),
        n_attackers=n_attackers,
        seed=seed,
        refine=cfg.aggregation.refine if personalized else 0,
        exclude=exclude,
        means=means,
        choices=choices if personalized else None,
    )
    if personalized:
        # corr + adapter_k = m + P_U (Δ_k − m) P_V, so the deviation is adapter_k − (m − corr).
        out_set = set(fl) | set(exclude)
        projected = {
            k: {n: trajectory.adapter_product(f, n) - (means[n] - corr[n]) for n in ups.names}
            for k, f in adapters.items()
            if k not in out_set
        }
        nxt = trajectory.personalize(state, means, projected, r)
    else:
        nxt = trajectory.advance(state, corr, r)
    if method == "clair":
        fl_set = set(fl)
        hist = {k: list(v) for k, v in history.items()}
        for k in active:
            hist.setdefault(k, []).append(k in fl_set)
        nxt["history"] = hist
        q = cfg.aggregation.quarantine
        for k in sorted(exclude - fl_set):
            fl.append(k)
            why[k] = f"quarantine: flagged in >= {q['q']} of its last {q['m']} rounds"  # type: ignore[index]
        fl.sort()
    return nxt, fl, why


def _quarantined(q: dict[str, int] | None, history: dict[int, list[bool]], active: list[int]) -> list[int]:
    """Clients CLAIR flagged in at least q of the last m rounds they took part in."""
    if not q:
        return []
    return [k for k in active if sum(history.get(k, [])[-q["m"] :]) >= q["q"]]


def _attacker_adapter(ups: ModuleUpdates, k: int, start: Factors | None, r: int) -> Factors:
    """The rank-r adapter closest to start + client k's (attacked) round update, per module."""
    out: Factors = {}
    for n in ups.names:
        b, a = ups.pairs[n][k]
        total = b @ a if start is None else b @ a + trajectory.adapter_product(start, n)
        out[n] = trajectory.rank_r(total, r)[0]
    return out


def _attack_updates(
    wl: LoRAWorkload, trial: int, round_: int, ups: ModuleUpdates, finite: np.ndarray
) -> set[int]:
    """Update attacks, per module, after every honest update exists (ALIE and IPM are omniscient over the
    round's honest updates); they act on dense updates, and the server then holds an exact factorisation
    of each attacked one. Returns the attacked clients."""
    contamination, K = wl.contamination(trial), wl.K
    honest_ids = [k for k in range(K) if finite[k] and k not in contamination.attack]
    ctx = attacks.AttackContext(K, len(contamination.contaminated), wl.lw.r)
    done: set[int] = set()
    for k, kind in contamination.update_attackers().items():
        if not finite[k]:
            continue
        done.add(k)
        g = seeds.torch_generator(seeds.derive_seed(wl.cfg.seed, seeds.ATTACK, trial, round_, k))
        params = wl.cfg.contamination.params.get(kind, {})
        for n in ups.names:
            dense = ups.dense(n)
            honest = dense[honest_ids] if honest_ids else None
            ups.set_dense(n, k, attacks.apply_update_attack(kind, dense[k].clone(), honest, g, ctx, **params))
    for k, kind in contamination.attack.items():  # a boosted data attack (model replacement): scaled update
        boost = (
            float(wl.cfg.contamination.params.get(kind, {}).get("boost", 1.0))
            if kind.startswith("data_")
            else 1.0
        )
        if boost != 1.0 and finite[k]:
            done.add(k)
            for n in ups.names:
                ups.scale(n, k, boost)
    return done


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
    detectable = _detectable(contamination.attack, valid)
    norms = ups.norms()  # (K,)
    honest_eval = [k for k in active if not contaminated[k]]
    method_seed = seeds.derive_seed(cfg.seed, seeds.METHOD, trial, round_)
    n_att = attacks.assumed_attackers(
        cfg.aggregation.assumed_fraction, cfg.contamination.fraction, len(active)
    )
    by_heldout = cfg.aggregation.refine == heldout.HELDOUT
    select = _select_updates(wl, trial, round_, group, reported) if wl.selects else None
    for method in group.methods:
        t0 = time.perf_counter()
        flagged, reason = non_finite_flags(reported, valid)
        choices: dict[str, Any] = {}
        refine: Any = cfg.aggregation.refine
        if select is not None and method in REFINING:
            refine = _heldout_choice(wl, trial, select, method, honest_eval, n_att, method_seed)
        corr, adapters, fl, why = run_method(
            method,
            ups,
            own,
            own_early,
            active,
            honest_eval,
            **_config_args(wl),
            n_attackers=n_att,
            seed=method_seed,
            refine=refine,
            choices=choices,
            validate=_validator(wl, trial) if by_heldout else None,
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
        if cfg.export_adapters:  # the one-shot models: the shared correction and each honest client's adapter
            out.nexts[method] = _one_shot_final(corr, adapters)
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


def _validator(wl: LoRAWorkload, trial: int) -> Validate:
    """``refine: heldout``'s judge: every candidate's held-back loss per client, then
    :func:`~clair_ray.clair.heldout.choose`."""

    def validate(clients: list[int], n: int, make: Any) -> int:
        losses = np.stack([wl.heldout_loss(trial, clients, *make(i))[clients] for i in range(n)])  # (C, H)
        return heldout.choose(losses)

    return validate


def _select_updates(
    wl: LoRAWorkload, trial: int, round_: int, group: Group, reported: np.ndarray
) -> tuple[ModuleUpdates, list[Factors], list[int]]:
    """(updates, factors, valid clients) of the trainings without the held-back rows (``refit``), attacked
    as the aggregated updates are; ``reported``: (K,) the clients that did not drop out."""
    names, sel, _, finite = collect(wl.K, group, "select")
    ups = ModuleUpdates({n: [sel[k][n] if sel[k] else None for k in range(wl.K)] for n in names})
    _attack_updates(wl, trial, round_, ups, finite)
    return ups, sel, np.flatnonzero(reported & ups.finite()).tolist()


def _heldout_choice(
    wl: LoRAWorkload,
    trial: int,
    select: tuple[ModuleUpdates, list[Factors], list[int]],
    method: str,
    honest: list[int],
    n_att: int,
    seed: int,
) -> heldout.Candidate:
    """``refine: heldout`` with ``refit``: the candidate ``method`` chooses on the updates trained without
    the held-back rows (:func:`_select_updates`), applied afterwards to the all-rows updates."""
    ups, sel, active = select
    judge, picked = _validator(wl, trial), []

    def validate(clients: list[int], n: int, make: Any) -> int:
        picked.append(judge(clients, n, make))
        return picked[-1]

    valid = set(active)
    honest_here = [k for k in honest if k in valid]
    run_method(
        method,
        ups,
        sel,
        sel,
        active,
        honest_here,
        **_config_args(wl),
        n_attackers=n_att,
        seed=seed,
        refine=heldout.HELDOUT,
        validate=validate,
    )
    # No validation happens when every client was flagged: the mean is all there is.
    return heldout.candidates()[picked[0]] if picked else heldout.candidates()[0]


def _one_shot_final(corr: dict[str, np.ndarray], adapters: dict[int, Factors]) -> dict[str, Any]:
    """A one-shot method's models as a trajectory state: a global method (every adapter's product 0) is
    its correction alone; a personalized one keeps each honest client's adapter."""
    personal = {k: f for k, f in adapters.items() if any(np.any(b) for b, _ in f.values())}
    return {"corr": corr, "shared": None, "personal": personal}


def _config_args(wl: LoRAWorkload) -> dict[str, Any]:
    """``run_method``'s keyword arguments that come from the config."""
    lw = wl.lw
    return {
        "rank": wl.rank,
        "side": lw.side,
        "clair_mode": lw.clair_input,
        "params": wl.cfg.aggregation.params,
    }


def _detectable(attack: dict[int, str], valid: np.ndarray) -> np.ndarray:
    """(K,) detection truth: a valid update of a contaminated client, unless its attack is in-subspace."""
    return np.array([valid[k] and k in attack and not _in_subspace(attack[k]) for k in range(len(valid))])


def _in_subspace(kind: str) -> bool:
    return kind in attacks.ATTACKS and attacks.ATTACKS[kind].in_subspace
