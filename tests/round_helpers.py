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
