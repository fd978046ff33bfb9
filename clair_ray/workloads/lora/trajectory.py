"""Multi-round LoRA: what each method's clients continue from, and how one round moves it (pure numpy).

Every method has its own trajectory over the rounds. Its state (the opaque "start" the engine carries from
the aggregator to the client actors, :data:`RoundState`) is a plain dict of numpy arrays:

- ``corr``: module -> (out, in) dense correction folded into the shared base (what a rank-r adapter
  cannot hold; empty at first);
- ``shared``: the global adapter (module -> (B (out, r), A (r, in)), ``alpha / r`` folded into B) that
  every client starts from, or None for the common peft initialisation (B = 0);
- ``personal``: client -> its own adapter, for methods whose clients keep their own (``local``); a client
  not in it starts from ``shared``;
- ``history``: client -> its CLAIR flags in the rounds it took part in (newest last), for ``quarantine``.

So a client's model is base + ``corr`` + its start adapter, and its round update (new adapter minus
start) is the factor pair [B_k, -B_s][A_k; A_s] of rank <= 2r (:func:`round_pairs`).

A global method aggregates the round updates into one dense update M per module (the mean of products,
not FedIT's mean of the B's and of the A's, which is a different matrix); :func:`advance` adds M to the
global product and re-factorises it to rank r, folding the residual into ``corr``, so that
base + corr' + B'A' = base + corr + B_s A_s + M exactly. The new A' has orthonormal rows (the leading
right singular vectors) and B' = U S carries the magnitude, like peft's start (A random, B = 0): a
balanced split would shrink both factors of a small update and with them every LoRA gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clair_ray.workloads.lora.methods import fedavg_factors

__all__ = [
    "RoundState",
    "adapter_product",
    "advance",
    "fedit",
    "personalize",
    "rank_r",
    "round_pairs",
    "start_of",
]

Pair = tuple[np.ndarray, np.ndarray]
Factors = dict[str, Pair]
#: A method's trajectory state (see the module docstring).
RoundState = dict[str, Any]


def start_of(state: RoundState | None, k: int) -> Factors | None:
    """The adapter client k starts its round from (None: the common peft initialisation)."""
    if state is None:
        return None
    personal = state.get("personal") or {}
    return personal.get(k, state.get("shared"))


def adapter_product(f: Factors, name: str) -> np.ndarray:
    """(out, in) float64 B A of one module of an adapter."""
    b, a = f[name]
    return np.asarray(b, dtype=np.float64) @ np.asarray(a, dtype=np.float64)


def round_pairs(final: Factors, start: Factors | None) -> Factors:
    """A client's round update per module as a factor pair: [B_k, -B_s][A_k; A_s] (rank <= 2r).

    Args:
        final: The client's adapter after its local steps.
        start: The adapter it started from (None: peft's initialisation, whose product is 0).

    Returns:
        Module -> (B (out, r'), A (r', in)) with B A = B_k A_k - B_s A_s exactly.
    """
    if start is None:
        return dict(final)
    out: Factors = {}
    for n, (b, a) in final.items():
        bs, as_ = start[n]
        out[n] = (np.concatenate([b, -np.asarray(bs)], axis=1), np.concatenate([a, np.asarray(as_)], axis=0))
    return out


def rank_r(product: np.ndarray, r: int) -> tuple[Pair, np.ndarray]:
    """The best rank-r factor pair of a dense matrix and what it leaves out.

    Args:
        product: (out, in) float64.
        r: The adapter rank (<= min(out, in)).

    Returns:
        ((B (out, r) = U_r S_r, A (r, in) = V_rᵀ with orthonormal rows), (out, in) residual).
    """
    u, s, vh = np.linalg.svd(product, full_matrices=False)
    b = u[:, :r] * s[:r]  # (out, r)
    a = vh[:r]  # (r, in)
    return (b, a), product - b @ a


def advance(state: RoundState | None, update: dict[str, np.ndarray], r: int) -> RoundState:
    """A global method's next state: the global product plus the aggregated round update, at rank r.

    Args:
        state: This round's state (None: the common initialisation, product 0, no correction).
        update: Module -> (out, in) aggregated round update M.
        r: The adapter rank.

    Returns:
        The next state (``personal`` empty): ``shared`` = rank-r part of B_s A_s + M, ``corr`` += the rest.
    """
    corr_prev = {} if state is None else state.get("corr", {})
    shared_prev = None if state is None else state.get("shared")
    corr: dict[str, np.ndarray] = {}
    shared: Factors = {}
    for n, m in update.items():
        total = np.asarray(m, dtype=np.float64)
        if shared_prev is not None:
            total = total + adapter_product(shared_prev, n)
        shared[n], residual = rank_r(total, r)
        corr[n] = residual + corr_prev[n] if n in corr_prev else residual
    return {"corr": corr, "shared": shared, "personal": {}, "history": _history(state)}


def personalize(
    state: RoundState | None,
    mean: dict[str, np.ndarray],
    projected: dict[int, dict[str, np.ndarray]],
    r: int,
) -> RoundState:
    """The personalized (paper's) refinement carried over rounds.

    Everyone gets the round's mean m through the shared correction; each client in ``projected`` keeps
    its own refined deviation P_U (Δ_k − m) P_V on top of its start, in its own adapter at rank r (the
    rest of a sum of rank > r is dropped: a client's dense remainder is never kept). So a refined client's
    model is base + corr + m + start_k + P_U (Δ_k − m) P_V: the one-shot refinement applied to its round
    update; any other client's is its previous model plus m.

    Args:
        state: This round's state (None: the common initialisation).
        mean: Module -> (out, in) robust mean m of the detected-honest round updates.
        projected: Client -> module -> (out, in) P_U (Δ_k − m) P_V.
        r: The adapter rank.

    Returns:
        The next state (``shared`` unchanged: clients never refined start from it).
    """
    corr_prev = {} if state is None else state.get("corr", {})
    corr = {n: m + corr_prev[n] if n in corr_prev else np.array(m, dtype=np.float64) for n, m in mean.items()}
    personal = dict({} if state is None else state.get("personal") or {})
    for k, dev in projected.items():
        start = start_of(state, k)
        total = {n: d if start is None else d + adapter_product(start, n) for n, d in dev.items()}
        personal[k] = {n: rank_r(t, r)[0] for n, t in total.items()}
    shared = None if state is None else state.get("shared")
    return {"corr": corr, "shared": shared, "personal": personal, "history": _history(state)}


def fedit(state: RoundState | None, adapters: list[Factors]) -> RoundState:
    """FedIT's next state: the mean of the clients' B factors and of their A factors (``corr`` kept).

    Args:
        state: This round's state.
        adapters: The aggregated clients' adapters (rank r each).

    Returns:
        The next state.
    """
    corr = {} if state is None else dict(state.get("corr", {}))
    return {"corr": corr, "shared": fedavg_factors(adapters), "personal": {}, "history": _history(state)}


def _history(state: RoundState | None) -> dict[int, list[bool]]:
    return {} if state is None else {k: list(v) for k, v in state.get("history", {}).items()}
