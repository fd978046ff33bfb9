"""Running one workload round without Ray (what the client and aggregator actors do), for tests."""

from __future__ import annotations

from typing import Any

from clair_ray.workloads.base import ClientJob, Group, Workload


def flat(res: Any) -> dict[str, dict[str, Any]]:
    """Method -> one dict of every per-method result (MethodRound fields, its metrics and scalars)."""
    return {m: {**vars(r), **r.metrics, **r.scalars} for m, r in res.methods.items()}


def one_round(
    wl: Workload,
    trial: int = 0,
    round_: int = 0,
    *,
    fail: tuple[int, ...] = (),
    nonfinite: tuple[int, ...] = (),
    methods: list[str] | None = None,
    start: Any = None,
    **kwargs: Any,
) -> Any:
    """Trains every client but ``fail`` in one batch, makes ``nonfinite`` non-finite, aggregates.

    Returns:
        The workload's RoundOutput.
    """
    jobs = [ClientJob(k, 0) for k in range(wl.K) if k not in fail]
    out = wl.train_batch(trial, round_, jobs, start)
    pos = [i for i, j in enumerate(jobs) if j.client_id in nonfinite]
    payload = wl.corrupt_updates(out.payload, pos) if pos else out.payload
    group = Group(
        methods=list(methods or wl.cfg.aggregation.methods),
        batches=[([j.client_id for j in jobs], payload)],
        dropped=sorted(fail),
        info={j.client_id: out.info[i] for i, j in enumerate(jobs)},
    )
    return wl.aggregate_round(trial, round_, [group], None, **kwargs)


def run_rounds(wl: Workload, trial: int = 0, methods: list[str] | None = None) -> list[Any]:
    """A whole multi-round trial without Ray, as the engine runs it: the round's seeded sample, one shared
    group in the first round, then one group per method trained from that method's state.

    Returns:
        Each round's RoundOutput (evaluated in place).
    """
    from clair_ray import seeds

    cfg = wl.cfg
    methods = list(methods or cfg.aggregation.methods)
    prev: Any = None
    outs = []
    for round_ in range(cfg.workload.n_rounds):
        sample = seeds.sample_clients(cfg.seed, trial, round_, wl.K, cfg.workload.clients_per_round)
        jobs = [ClientJob(k, seeds.derive_seed(cfg.seed, seeds.TRAIN, trial, round_, k)) for k in sample]
        groups = []
        for g in ["*"] if prev is None else methods:
            out = wl.train_batch(trial, round_, jobs, None if prev is None else prev[g])
            groups.append(
                Group(
                    methods=methods if prev is None else [g],
                    batches=[(sample, out.payload)],
                    dropped=[],
                    info={j.client_id: out.info[i] for i, j in enumerate(jobs)},
                    clients=sample,
                )
            )
        res = wl.aggregate_round(trial, round_, groups, prev, evaluate=True)
        outs.append(res)
        prev = res.nexts
    return outs
