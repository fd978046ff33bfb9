"""One-shot aggregation of LoRA updates per module: CLAIR, the oracle and the baselines (pure compute).

What the aggregator actor of a LoRA workload runs (:mod:`clair_ray.workloads.lora.rounds`), as plain
functions on numpy factor pairs, testable without Ray or a model.

Every method returns ONE shared dense correction per module (folded into one shared base copy for
evaluation) plus each honest client's own adapter as a factor pair, never a merged weight copy per client:

- ``clair``: :func:`run_clair` per module with ``offset=True`` (detection on the column side, or the row
  side with ``side`` row), evidence combined over modules (``clair_ray.clair.combine_modules``: the sum
  of squared standardised scores against its null). Refinement from the combined flags with ``side``
  both: mean_Ĉ + P_U (Δ_k − mean_Ĉ) P_V (column: no P_V; row: no P_U), U and V the leading directions of
  the centred detected-honest updates, as many as ``aggregation.refine`` says
  (``clair_ray.clair.refine.refinement_bases``: "auto" chooses per module and side; "heldout" chooses
  a rank and a share s of the deviation by the clients' held-back loss, ``clair_ray.clair.heldout``),
  applied as the shared correction mean_Ĉ − s P_U mean_Ĉ P_V and the adapter (s P_U B_k, A_k P_V).
- ``oracle``: the same refinement rule on the true honest set (so CLAIR vs oracle tests detection).
- ``fedavg``: mean over all clients (through the factors; in multi-round mode FedIT's mean of the B's and
  of the A's instead, :mod:`clair_ray.workloads.lora.trajectory`); ``fedavg_exact``: the mean of the
  products in both modes; ``fedavg_honest``: mean over the truly honest clients only; every other
  registered global aggregator (``median``, ``trimmed_mean``, ``multi_krum``, ``geometric_median``, a
  user's own): the aggregator on the dense per-module updates; all as the shared
  correction with no personal adapter.
- ``local``: the client's own adapter; ``local_early``: its adapter after ``early_steps``.

Dense (K, out, in) stacks of a module are built only when something needs them (:class:`ModuleUpdates`):
update attacks, the element-wise baselines, the oracle, or CLAIR with ``clair_input`` dense. CLAIR on
factor pairs with FedAvg, local training and the refinement never forms a client's dense update, so the
path scales to large modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from clair_ray.aggregators import AGGREGATORS, AggContext, get_aggregator
from clair_ray.clair import combine_modules, heldout
from clair_ray.clair.api import clair
from clair_ray.clair.refine import MEAN_CLIP, mean_weights, refinement_bases

__all__ = [
    "OWN_METHODS",
    "REFINING",
    "lora_methods",
    "ModuleUpdates",
    "as_pair",
    "fedavg_factors",
    "combine_evidence",
    "run_clair",
    "run_method",
]

#: Methods this module implements itself, beyond the registered aggregators it runs per module.
OWN_METHODS = ("fedavg_exact", "fedavg_honest", "local_early")
#: The methods that refine each honest client's adapter (CLAIR's rule; the oracle on the true honest set).
REFINING = ("clair", "oracle")
#: ``workload.lora.clair_input="auto"`` gives CLAIR dense products up to this many entries per module.
AUTO_DENSE_MAX_ENTRIES = 65_536
Pair = tuple[np.ndarray, np.ndarray]
#: Module name -> (B (out, r), A (r, in)): one client's adapter (= ``clair_ray.workloads.lora.Factors``;
#: spelled out here so this module loads without peft).
Factors = dict[str, Pair]
#: (shared corrections per module, adapters of the honest clients, flagged clients, reasons).
MethodResult = tuple[dict[str, np.ndarray], dict[int, Factors], list[int], dict[int, str]]
#: ``refine: heldout``'s judge: (clients, number of candidates, candidate index -> (correction per
#: module, client -> adapter)) -> the index of the chosen candidate (evaluates held-back rows).
Validate = Callable[[list[int], int, Callable[[int], tuple[dict[str, np.ndarray], dict[int, Factors]]]], int]


def lora_methods() -> tuple[str, ...]:
    """Methods a LoRA workload runs: CLAIR, the oracle, local, every registered global aggregator (per
    module, on the dense updates, as one shared correction) and :data:`OWN_METHODS`."""
    special = (*REFINING, "local")
    return (
        *special,
        *(n for n, c in AGGREGATORS.items() if n not in special and not c.personalized),
        *OWN_METHODS,
    )


def as_pair(dense: np.ndarray, tol: float = 1e-12) -> Pair:
    """An exact factor pair (B (out, r'), A (r', in)) of a dense update, r' its numerical rank."""
    u, s, vh = np.linalg.svd(dense, full_matrices=False)
    keep = max(1, int(np.sum(s > tol * max(float(s[0]) if s.size else 0.0, 1e-300))))
    return u[:, :keep] * s[:keep], vh[:keep]


def fedavg_factors(factors: Sequence[Factors], weights: Sequence[float] | None = None) -> Factors:
    """FedIT's aggregate of LoRA adapters: the (weighted) mean of the B factors and of the A factors.

    Args:
        factors: Per client: module name -> (B (out, r), A (r, in)), all with the same modules and shapes.
        weights: Optional per-client weights (e.g. sample counts); default equal.

    Returns:
        Module name -> (mean B (out, r), mean A (r, in)), float64.
    """
    if not factors:
        raise ValueError("fedavg_factors: need at least one client's factors")
    w = np.full(len(factors), 1.0) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(factors),) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError(f"fedavg_factors: weights must be {len(factors)} finite values with a positive sum")
    w = w / w.sum()
    out: Factors = {}
    for name in factors[0]:
        b = sum(wi * np.asarray(f[name][0], dtype=np.float64) for wi, f in zip(w, factors, strict=True))
        a = sum(wi * np.asarray(f[name][1], dtype=np.float64) for wi, f in zip(w, factors, strict=True))
        out[name] = (np.asarray(b), np.asarray(a))
    return out


class ModuleUpdates:
    """The K clients' updates of every module, as factor pairs, with dense stacks built on demand.

    Args:
        pairs: Module name -> K entries, each (B (out, r'), A (r', in)) or None (no update).
    """

    def __init__(self, pairs: dict[str, list[Pair | None]]) -> None:
        self.pairs = pairs
        self.names = list(pairs)
        self.K = len(next(iter(pairs.values())))
        self._dense: dict[str, torch.Tensor] = {}

    def shape(self, n: str) -> tuple[int, int]:
        """(out, in) of module n."""
        b, a = next(p for p in self.pairs[n] if p is not None)
        return b.shape[0], a.shape[1]

    def dense(self, n: str) -> torch.Tensor:
        """(K, out, in) float64 dense updates of module n (NaN for clients without one); cached."""
        if n not in self._dense:
            out, inn = self.shape(n)
            arr = np.full((self.K, out, inn), np.nan)
            for k, p in enumerate(self.pairs[n]):
                if p is not None:
                    arr[k] = p[0] @ p[1]
            self._dense[n] = torch.from_numpy(arr)
        return self._dense[n]

    def set_dense(self, n: str, k: int, update: torch.Tensor) -> None:
        """Replaces client k's update of module n (an attacked update) in both forms."""
        self.dense(n)[k] = update
        self.pairs[n][k] = as_pair(update.numpy())

    def scale(self, n: str, k: int, factor: float) -> None:
        """Multiplies client k's update of module n by ``factor`` (its factor pair keeps its rank)."""
        b, a = self.pairs[n][k]  # type: ignore[misc]
        self.pairs[n][k] = (factor * b, a)
        if n in self._dense:
            self._dense[n][k] *= factor

    def mean(self, n: str, ids: list[int], weights: np.ndarray | None = None) -> np.ndarray:
        """(out, in) mean update of module n over ``ids`` (through the factors unless dense exists).

        ``weights`` (len(ids),), summing to 1, gives a weighted mean (CLAIR's robust honest mean).
        """
        w = np.full(len(ids), 1.0 / len(ids)) if weights is None else np.asarray(weights, dtype=np.float64)
        if n in self._dense:
            return np.einsum("h,hpq->pq", w, self._dense[n][ids].numpy())
        b = np.concatenate([self.pairs[n][k][0] for k in ids], axis=1)  # (out, N)
        a = np.concatenate(
            [self.pairs[n][k][1] * wk for k, wk in zip(ids, w, strict=True)], axis=0
        )  # (N, in)
        return b @ a

    def norms(self) -> np.ndarray:
        """(K,) ‖update‖_F over all modules, ‖B A‖_F² = tr((BᵀB)(AAᵀ)) (NaN without an update)."""
        out = np.zeros(self.K)
        for n in self.names:
            for k, p in enumerate(self.pairs[n]):
                if p is None:
                    out[k] = np.nan
                else:
                    b, a = p
                    out[k] += float(np.sum((b.T @ b) * (a @ a.T)))
        return np.sqrt(np.maximum(out, 0.0))

    def finite(self) -> np.ndarray:
        """(K,) clients whose every module's update is present and finite."""
        ok = np.ones(self.K, dtype=bool)
        for n in self.names:
            for k, p in enumerate(self.pairs[n]):
                ok[k] &= p is not None and bool(np.isfinite(p[0]).all() and np.isfinite(p[1]).all())
        return ok


def run_clair(
    updates: Any, rank: int, side: str, *, seed: int, refine: int | str = "auto", **params: Any
) -> Any:
    """CLAIR on one module's updates, centred (``offset=True``).

    Args:
        updates: (K, out, in) float64 dense updates B_k A_k, or K factor pairs (B_k (out, r), A_k (r, in))
            (the core then centres by a low-rank robust mean and never forms a dense update).
        rank: Subspace rank per module.
        side: ``column``, ``row`` or ``both`` (detection on the column side, refinement on both).
        seed: The core's seed.
        refine: ``aggregation.refine`` (0 when only the detection is needed).
        **params: Further keyword arguments of ``clair_ray.clair`` (``aggregation.params.clair``:
            ``solver``, ``mad_k``, ``lam``, ``tau``).

    Returns:
        The :class:`clair_ray.ClairResult`.
    """
    reserved = sorted({"rank", "offset", "seed", "side", "refine"} & set(params))
    if reserved:
        raise ValueError(f"aggregation.params.clair must not set {reserved}: they come from the config")
    return clair(updates, rank=rank, refine=refine, offset=True, seed=seed, side=side, **params)


def combine_evidence(
    results: dict[str, Any], mad_k: float = 4.0
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Per-module evidence combined by ``clair_ray.clair.combine_modules``.

    Each module's score is standardised against its own honest majority (so no large module dominates);
    a client is flagged when the sum of its squared positive standardised scores is improbable under the
    null (at the one-module rule's level).

    Args:
        results: Module name -> ClairResult over the same clients.
        mad_k: CLAIR's ``mad_k``.

    Returns:
        ((K,) bool flagged, (K,) combined evidence, client -> reason).
    """
    det = combine_modules(results, mad_k=mad_k)
    evidence = det.scores.double().numpy()  # (K,)
    flagged = np.zeros(evidence.shape[0], dtype=bool)
    flagged[det.contaminated] = True
    return flagged, evidence, dict(det.reasons)


def clair_input(mode: str, shape: tuple[int, int]) -> str:
    """``factors`` or ``dense``: what CLAIR sees for a module of ``shape`` (``workload.lora.clair_input``)."""
    if mode == "auto":
        return "dense" if shape[0] * shape[1] <= AUTO_DENSE_MAX_ENTRIES else "factors"
    return mode


def zero_adapter(ups: ModuleUpdates) -> Factors:
    """An adapter whose product is 0 in every module (a global method's, or a client that never trained)."""
    return {n: (np.zeros((ups.shape(n)[0], 1)), np.zeros((1, ups.shape(n)[1]))) for n in ups.names}


def run_method(
    method: str,
    ups: ModuleUpdates,
    own: list[Factors],
    own_early: list[Factors],
    active: list[int],
    honest: list[int],
    *,
    rank: int,
    side: str,
    clair_mode: str,
    params: dict[str, dict[str, Any]],
    n_attackers: int,
    seed: int,
    refine: int | str | heldout.Candidate = "auto",
    choices: dict[str, Any] | None = None,
    exclude: frozenset[int] = frozenset(),
    means: dict[str, np.ndarray] | None = None,
    validate: Validate | None = None,
) -> MethodResult:
    """One method on one round's updates.

    Args:
        method: The method name.
        ups: Every module's (possibly attacked) updates.
        own: Each client's own final factors ({} without an update).
        own_early: Each client's factors after ``early_steps`` ({} if not recorded).
        active: Clients with a valid update.
        honest: The truly honest active clients (who are evaluated).
        rank: Subspace rank of CLAIR and the oracle.
        side: ``column``, ``row`` or ``both``.
        clair_mode: ``workload.lora.clair_input``.
        params: ``aggregation.params`` (method -> keyword arguments).
        n_attackers: Attackers assumed by the baselines that need a number.
        seed: The round's method seed.
        refine: ``aggregation.refine`` for CLAIR and the oracle.
        choices: If given, CLAIR and the oracle record their refinement per module here (module ->
            side -> {rank, spectrum, null}).
        exclude: CLAIR: clients left out of its mean and refinement whatever their evidence this round
            (quarantined); they are still scored.
        means: If given, CLAIR and the oracle store their (robust) mean update per module here.
        validate: ``refine="heldout"``: scores candidate refinements on the clients' held-back rows
            (:mod:`~clair_ray.clair.heldout`).

    Returns:
        (shared corrections per module, adapters of the honest clients, flagged, reasons).
    """
    names = ups.names
    if method == "local":
        return {}, {k: own[k] for k in honest}, [], {}
    if method == "local_early":
        return {}, {k: own_early[k] for k in honest}, [], {}
    if method == "fedavg_honest":
        return {n: ups.mean(n, honest) for n in names}, dict.fromkeys(honest, zero_adapter(ups)), [], {}
    if method in ("fedavg", "fedavg_exact"):
        return {n: ups.mean(n, active) for n in names}, dict.fromkeys(honest, zero_adapter(ups)), [], {}
    if method == "clair":
        clair_params = dict(params.get("clair", {}))
        # The exact ADMM path takes 15-35 s per module call at the copy task's size (feasibility script).
        clair_params.setdefault("solver", "fast")
        return _clair(
            ups,
            active,
            honest,
            rank,
            side,
            clair_mode,
            clair_params,
            seed,
            refine,
            choices,
            exclude,
            means,
            validate,
        )
    if method == "oracle":  # CLAIR's refinement rule on the true honest set (no detection)
        honest_set = set(honest)
        corr, adapters = _refined(
            ups, honest, honest, side, clair_mode, seed, refine, choices, means=means, validate=validate
        )
        return corr, adapters, [k for k in active if k not in honest_set], {}
    if method in AGGREGATORS and not AGGREGATORS[method].personalized:
        ctx = AggContext(n_attackers=n_attackers, seed=seed)
        agg = get_aggregator(method, **params.get(method, {}))
        corr, votes = {}, np.zeros(len(active))
        for n in names:
            out = agg.aggregate(ups.dense(n)[active], ctx)
            out_flagged = set(out.flagged)
            keep = [j for j in range(len(active)) if j not in out_flagged]
            corr[n] = out.per_client[keep[0]].double().numpy()  # global: the same for every kept client
            votes[out.flagged] += 1
        # A client counts as flagged when most modules excluded it (multi-Krum selects per module).
        fl = [active[j] for j in np.flatnonzero(votes > len(names) / 2)]
        why = {k: f"{method}: excluded in {int(votes[active.index(k)])}/{len(names)} modules" for k in fl}
        return corr, dict.fromkeys(honest, zero_adapter(ups)), fl, why
    raise ValueError(f"aggregation.methods: {method!r} is not available for LoRA workloads")


def _inputs(ups: ModuleUpdates, n: str, clients: list[int], mode: str) -> tuple[str, Any]:
    """What CLAIR sees of module ``n`` for ``clients``: ("factors", pairs) or ("dense", (C, out, in))."""
    if clair_input(mode, ups.shape(n)) == "factors":
        pairs = [tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in ups.pairs[n][k]) for k in clients]
        return "factors", pairs
    return "dense", ups.dense(n)[clients]


def _refined(
    ups: ModuleUpdates,
    keep: list[int],
    honest: list[int],
    side: str,
    mode: str,
    seed: int,
    refine: int | str | heldout.Candidate,
    choices: dict[str, Any] | None,
    mean_clip: float | None = MEAN_CLIP,
    means: dict[str, np.ndarray] | None = None,
    validate: Validate | None = None,
) -> tuple[dict[str, np.ndarray], dict[int, Factors]]:
    """The refinement rule (``refinement_bases``) per module over ``keep``, then :func:`project`.

    The mean over ``keep`` is CLAIR's robust one (``robust_weights``: clipped around the geometric
    median, exactly the plain mean when nobody sits far out), per module. With ``refine="heldout"`` the
    bases keep :data:`~clair_ray.clair.heldout.TOP_RANK` directions and ``validate`` picks the
    candidate (rank, shrink) by ``keep``'s held-back loss; ``refine`` may also be a
    :class:`~clair_ray.clair.heldout.Candidate` chosen before (on the updates trained without the
    held-back rows).
    """
    fixed = refine if isinstance(refine, heldout.Candidate) else None  # chosen on other updates
    by_heldout = refine == heldout.HELDOUT
    if by_heldout and validate is None:
        raise ValueError(
            "aggregation.refine='heldout' needs the clients' held-back rows: a one-shot LoRA workload with "
            "workload.lora.holdout > 0"
        )
    bases: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
    weights: dict[str, np.ndarray] = {}
    for n in ups.names:
        kind, inp = _inputs(ups, n, keep, mode)
        items = list(inp.unbind(0)) if kind == "dense" else inp
        pos = list(range(len(keep)))
        w, _ = mean_weights(kind, items, pos, mean_clip)
        weights[n] = w.numpy()
        rule = heldout.TOP_RANK if by_heldout or fixed else refine
        col, row = refinement_bases(kind, items, pos, side, rule, seed, w)
        bases[n] = tuple(None if c is None else c.basis.numpy() for c in (col, row))  # type: ignore[assignment]
        if choices is not None and not (by_heldout or fixed):
            choices[n] = {name: c.summary() for name, c in (("column", col), ("row", row)) if c is not None}
    shrink = 1.0
    if by_heldout or fixed:
        cands = heldout.candidates()

        def make(i: int) -> tuple[dict[str, np.ndarray], dict[int, Factors]]:
            c = cands[i]
            return project(ups, keep, keep, heldout.truncate(bases, c), weights, shrink=c.shrink)

        chosen = fixed or cands[validate(keep, len(cands), make)]  # type: ignore[misc]
        if choices is not None:
            choices.update(heldout.summary(bases, chosen, {n: ups.shape(n) for n in ups.names}))
        bases, shrink = heldout.truncate(bases, chosen), chosen.shrink
    return project(ups, keep, honest, bases, weights, means, shrink=shrink)


def _clair(
    ups: ModuleUpdates,
    active: list[int],
    honest: list[int],
    rank: int,
    side: str,
    mode: str,
    params: dict[str, Any],
    seed: int,
    refine: int | str | heldout.Candidate,
    choices: dict[str, Any] | None,
    exclude: frozenset[int] = frozenset(),
    means: dict[str, np.ndarray] | None = None,
    validate: Validate | None = None,
) -> MethodResult:
    """CLAIR per module, evidence combined over modules, refinement from the combined flags (and without
    the ``exclude``d clients)."""
    det_side = "row" if side == "row" else "column"
    runs = {
        n: run_clair(_inputs(ups, n, active, mode)[1], rank, det_side, seed=seed, refine=0, **params)
        for n in ups.names
    }
    flag_local, _, reasons = combine_evidence(runs, mad_k=float(params.get("mad_k", 4.0)))
    fl = [active[j] for j in np.flatnonzero(flag_local)]
    why = {active[j]: reasons[j] for j in np.flatnonzero(flag_local)}
    fl_set = set(fl) | set(exclude)
    # Everyone quarantined or flagged: this round's own evidence decides alone.
    keep = [k for k in active if k not in fl_set] or [k for k in active if k not in set(fl)]
    if not keep:  # every client flagged (a tiny round): no update to trust, the start stays as it is
        zero = zero_adapter(ups)
        return {n: np.zeros(ups.shape(n)) for n in ups.names}, dict.fromkeys(honest, zero), fl, why
    clip = params.get("mean_clip", MEAN_CLIP)
    corr, adapters = _refined(ups, keep, honest, side, mode, seed, refine, choices, clip, means, validate)
    return corr, adapters, fl, why


def project(
    ups: ModuleUpdates,
    keep: list[int],
    honest: list[int],
    bases: dict[str, tuple[np.ndarray | None, np.ndarray | None]],
    weights: dict[str, np.ndarray] | None = None,
    means: dict[str, np.ndarray] | None = None,
    shrink: float = 1.0,
) -> tuple[dict[str, np.ndarray], dict[int, Factors]]:
    """mean + s P_U (Δ_k − mean) P_V as one shared correction per module and a factored adapter each.

    With m = mean over ``keep`` and s = ``shrink``: the correction is m − s P_U m P_V (folded into the
    shared base) and client k's adapter is (s P_U B_k, A_k P_V) from its factor pair, so that
    correction + adapter = m + s P_U (Δ_k − m) P_V.

    Args:
        ups: The updates.
        keep: The clients the mean is over (CLAIR's unflagged clients, or the true honest set).
        honest: Clients that get an adapter.
        bases: Module -> (U (out, r) or None, V (in, r) or None).
        weights: Module -> (len(keep),) weights of the mean (None: the plain mean).
        means: If given, module -> the mean m is stored here.
        shrink: s, the share of the projected deviation kept (1: the projection rules).

    Returns:
        (module -> (out, in) correction, client -> module -> (B (out, r'), A (r', in))).
    """
    corr: dict[str, np.ndarray] = {}
    adapters: dict[int, Factors] = {k: {} for k in honest}
    for n in ups.names:
        m = ups.mean(n, keep, None if weights is None else weights[n])  # (out, in)
        u, v = bases[n]
        pm = m if u is None else u @ (u.T @ m)
        pm = pm if v is None else (pm @ v) @ v.T
        corr[n] = m - shrink * pm
        if means is not None:
            means[n] = m
        for k in honest:
            b, a = ups.pairs[n][k]
            pb = shrink * (b if u is None else u @ (u.T @ b))  # (out, r')
            pa = a if v is None else (a @ v) @ v.T  # (r', in)
            adapters[k][n] = (pb, pa)
    return corr, adapters
