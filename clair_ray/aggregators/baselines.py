"""Baseline aggregators: fedavg, local, oracle, median, trimmed_mean, multi_krum, geometric_median.

The robust global methods (fedavg, median, trimmed_mean, multi_krum, geometric_median) give every finite
client the same aggregated update, FedAvg-style. ``local`` does not aggregate; ``oracle`` is CLAIR's
refinement rule with the true honest set (CLAIR with perfect detection).

Conventions shared by all of them:

- A client whose update is not finite is excluded before any arithmetic, flagged with reason
  "non-finite", and keeps its input unchanged in ``per_client``: one NaN never spreads to the others.
- float32 and float64 inputs give outputs of the same dtype. Distances and the Weiszfeld iterations run in
  float64, so near-ties do not depend on float32 round-off.
- Baselines that need the number of attackers (trimmed_mean, multi_krum) read ``ctx.n_attackers``, which
  comes from config, never from the ground truth. Their parameters come from the constructor
  (``get_aggregator(name, **params)``); ``ctx.params`` belongs to CLAIR and is ignored here.
"""

from __future__ import annotations

import torch

from clair_ray.aggregators._common import (
    NON_FINITE,
    check_updates,
    checked_inputs,
    finite_mask,
    global_output,
    non_finite_clients,
)
from clair_ray.aggregators.base import AggContext, AggOutput, register_aggregator
from clair_ray.clair.refine import (
    check_refine,
    mean_weights,
    refine_dense,
    refinement_bases,
)

__all__ = [
    "FedAvg",
    "GeometricMedian",
    "Local",
    "Median",
    "MultiKrum",
    "Oracle",
    "TrimmedMean",
    "coordinate_median",
    "geometric_median",
    "krum_scores",
    "trimmed_mean",
]


# ---------------------------------------------------------------------------------------------------------
# Pure functions on finite stacks (N, p, q)
# ---------------------------------------------------------------------------------------------------------


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median; for an even count the mean of the two middle values.

    (``torch.median`` returns the lower middle value instead, which biases the result.)

    Args:
        x: (N, p, q) finite updates, N >= 1.

    Returns:
        (p, q) the median.
    """
    n = x.shape[0]
    s, _ = torch.sort(x, dim=0)  # (N, p, q)
    if n % 2 == 1:
        return s[n // 2]
    return 0.5 * (s[n // 2 - 1] + s[n // 2])


def trimmed_mean(x: torch.Tensor, trim: int) -> torch.Tensor:
    """Coordinate-wise trimmed mean: drops the ``trim`` largest and ``trim`` smallest values per coordinate.

    Args:
        x: (N, p, q) finite updates.
        trim: Values dropped from each side, 2 * trim < N.

    Returns:
        (p, q) the trimmed mean.
    """
    n = x.shape[0]
    if 2 * trim >= n:
        raise ValueError(f"trimmed_mean needs 2 * trim < number of clients ({n}), got trim={trim}")
    s, _ = torch.sort(x, dim=0)  # (N, p, q)
    return s[trim : n - trim].mean(dim=0)


def krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    """Krum scores (Blanchard et al. 2017): for each client, the sum of squared distances to its
    N - f - 2 nearest other clients.

    Args:
        x: (N, p, q) finite updates.
        f: Assumed number of Byzantine clients, N - f - 2 >= 1.

    Returns:
        (N,) float64 scores; lower = more central.
    """
    n = x.shape[0]
    k = n - f - 2
    if k < 1:
        raise ValueError(f"krum needs number of clients - n_attackers - 2 >= 1, got N={n}, n_attackers={f}")
    flat = x.reshape(n, -1).to(torch.float64)  # (N, d)
    sq = (flat * flat).sum(dim=1)  # (N,)
    # Gram form keeps memory at N x N instead of N x N x d; float64 makes the cancellation harmless.
    d2 = (sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T).clamp_min(0.0)  # (N, N)
    d2.fill_diagonal_(float("inf"))  # a client is not its own neighbour
    nearest, _ = torch.topk(d2, k, dim=1, largest=False)  # (N, k)
    return nearest.sum(dim=1)


def geometric_median(
    x: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-10, smoothing: float = 1e-12
) -> tuple[torch.Tensor, int]:
    """Geometric median by the smoothed Weiszfeld algorithm (Pillutla, Kakade & Harchaoui, RFA 2022).

    Iterates ``z <- sum_i w_i x_i / sum_i w_i`` with ``w_i = 1 / max(smoothing * scale, ||z - x_i||)``;
    the floor keeps the weights finite when z lands on a data point. Starts at the coordinate-wise median
    (already robust, so fewer iterations than from the mean). Stops after ``max_iter`` iterations or when a
    step moves z by at most ``tol * scale``, where ``scale`` is the mean norm of the inputs (so the
    tolerances are relative to the data, whatever its units).

    Args:
        x: (N, p, q) finite updates.
        max_iter: Maximum number of iterations.
        tol: Relative step tolerance.
        smoothing: Relative floor on distances.

    Returns:
        (p, q) float64 geometric median, and the number of iterations run.
    """
    n = x.shape[0]
    flat = x.reshape(n, -1).to(torch.float64)  # (N, d)
    scale = float(flat.norm(dim=1).mean())
    if scale == 0.0:
        return torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device), 0
    z = coordinate_median(flat[:, :, None])[:, 0]  # (d,)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        dist = (flat - z).norm(dim=1).clamp_min(smoothing * scale)  # (N,)
        w = 1.0 / dist  # (N,)
        z_new = (w[:, None] * flat).sum(dim=0) / w.sum()  # (d,)
        step = float((z_new - z).norm())
        z = z_new
        if step <= tol * scale:
            break
    return z.reshape(x.shape[1:]), it


# ---------------------------------------------------------------------------------------------------------
# Aggregators
# ---------------------------------------------------------------------------------------------------------


@register_aggregator("fedavg")
class FedAvg:
    """FedAvg: the mean of the finite updates, given to every client.

    Args:
        weighted: If True and ``ctx.noise_scale`` is given, weight client k by ``1 / noise_scale_k**2``
            (proportional to its sample count n_k when noise_scale = 1/sqrt(n_k), as in FedAvg proper).
            Default False: the plain mean.
    """

    def __init__(self, weighted: bool = False) -> None:
        self.weighted = bool(weighted)

    def aggregate(self, updates: torch.Tensor, ctx: AggContext) -> AggOutput:
        """Averages the finite updates (see class docstring)."""
        check_updates(updates)
        mask = finite_mask(updates)  # (K,)
        if not mask.any():
            return global_output(updates, mask, None)
        x = updates[mask]  # (N, p, q)
        if self.weighted and ctx.noise_scale is not None:
            ns = torch.as_tensor(ctx.noise_scale, dtype=torch.float64, device=updates.device).flatten()
            if ns.shape[0] != updates.shape[0] or not (torch.isfinite(ns).all() and (ns > 0).all()):
                raise ValueError(f"ctx.noise_scale must be (K={updates.shape[0]},) positive finite, got {ns}")
            w = 1.0 / ns[mask] ** 2  # (N,)
            agg = (w[:, None, None] * x.to(torch.float64)).sum(dim=0) / w.sum()  # (p, q)
        else:
            agg = x.mean(dim=0)  # (p, q)
        return global_output(updates, mask, agg)


@register_aggregator("local", personalized=True)
class Local:
    """No aggregation: every client keeps its own update (non-finite ones are still flagged)."""

    def aggregate(self, updates: torch.Tensor, ctx: AggContext) -> AggOutput:
        """Returns the inputs."""
        check_updates(updates)
        mask = finite_mask(updates)
        reasons = {i: NON_FINITE for i in non_finite_clients(mask)}
        return AggOutput(per_client=updates.clone(), flagged=list(reasons), reasons=reasons)


@register_aggregator("median")
class Median:
    """Coordinate-wise median of the finite updates (Yin et al. 2018), given to every client."""

    def aggregate(self, updates: torch.Tensor, ctx: AggContext) -> AggOutput:
        """Takes the coordinate-wise median."""
        check_updates(updates)
        mask = finite_mask(updates)
        agg = coordinate_median(updates[mask]) if mask.any() else None
        return global_output(updates, mask, agg)


@register_aggregator("trimmed_mean")
class TrimmedMean:
    """Coordinate-wise trimmed mean (Yin et al. 2018), trimming ``ctx.n_attackers`` from each side."""

    def aggregate(self, updates: torch.Tensor, ctx: AggContext) -> AggOutput:
        """Takes the trimmed mean.

        Raises:
            ValueError: If ``2 * ctx.n_attackers`` is not below the number of finite clients.
        """
        f, mask, n = checked_inputs(updates, ctx)
        if n == 0:
            return global_output(updates, mask, None)
        if 2 * f >= n:
            raise ValueError(
                f"trimmed_mean needs 2 * ctx.n_attackers < number of finite clients ({n}), "
                f"got ctx.n_attackers={f}"
            )
        return global_output(updates, mask, trimmed_mean(updates[mask], f))


@register_aggregator("multi_krum")
class MultiKrum:
    """Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018).

    With f = ``ctx.n_attackers`` and N finite clients, scores every client by Krum (sum of squared
    distances to its N - f - 2 nearest others), keeps the m = N - f lowest scores (ties: lower client id)
    and gives every client their mean. The others are flagged with their score.
    """

    def aggregate(self, updates: torch.Tensor, ctx: AggContext) -> AggOutput:
        """Selects and averages by Krum score.

        Raises:
            ValueError: If there are not more than ``2 * ctx.n_attackers + 2`` finite clients (Krum's
                condition).
        """
        f, mask, n = checked_inputs(updates, ctx)
        if n == 0:
            return global_output(updates, mask, None)
        if n <= 2 * f + 2:
            raise ValueError(
                f"multi_krum needs number of finite clients ({n}) > 2 * ctx.n_attackers + 2, "
                f"got ctx.n_attackers={f}"
            )
        idx = torch.nonzero(mask).flatten()  # (N,) original ids of the finite clients
        s = krum_scores(updates[mask], f)  # (N,)
        m = n - f
        order = torch.sort(s, stable=True).indices  # stable: equal scores keep client-id order
        keep = order[:m]
        agg = updates[idx[keep]].mean(dim=0)  # (p, q)
        scores = torch.full((updates.shape[0],), float("nan"), dtype=torch.float64, device=updates.device)
        scores[idx] = s
        cutoff = float(s[order[m - 1]])
        flagged = {
            int(idx[j]): f"krum score {float(s[j]):.4g} not among the {m} lowest (cut-off {cutoff:.4g})"
            for j in order[m:].tolist()
        }
        return global_output(updates, mask, agg, flagged=flagged, scores=scores)


@register_aggregator("geometric_median")
class GeometricMedian:
    """Geometric median of the finite updates (RFA), by smoothed Weiszfeld, given to every client.

    Args:
        max_iter: Maximum Weiszfeld iterations.
        tol: Step tolerance relative to the mean update norm.
        smoothing: Distance floor relative to the mean update norm.

    The output's ``scores`` are each client's distance to the geometric median (nothing is flagged
    besides non-finite clients: the method down-weights, it does not exclude).
    """

    def __init__(self, max_iter: int = 200, tol: float = 1e-10, smoothing: float = 1e-12) -> None:
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be > 0, got {tol!r}")
        if not (isinstance(smoothing, (int, float)) and smoothing > 0):
            raise ValueError(f"smoothing must be > 0, got {smoothing!r}")
        self.max_iter = max_iter
        self.tol = float(tol)
        self.smoothing = float(smoothing)

    def aggregate(self, updates: torch.Tensor, ctx: AggContext) -> AggOutput:
        """Computes the geometric median."""
        check_updates(updates)
        mask = finite_mask(updates)
        if not mask.any():
            return global_output(updates, mask, None)
        gm, _ = geometric_median(
            updates[mask], max_iter=self.max_iter, tol=self.tol, smoothing=self.smoothing
        )
        scores = torch.full((updates.shape[0],), float("nan"), dtype=torch.float64, device=updates.device)
        scores[mask] = (updates[mask].to(torch.float64) - gm).flatten(1).norm(dim=1)
        return global_output(updates, mask, gm, scores=scores)


@register_aggregator("oracle", personalized=True)
class Oracle:
    """CLAIR's refinement rule on the true honest set C (no detection: CLAIR vs oracle tests detection).

    Honest finite client k gets ``m + P (M_k - m) Q`` with m CLAIR's (robust) mean over the finite honest
    clients and P
    (Q) the projector on the leading directions of their centred updates, chosen by ``ctx.refine``
    exactly as CLAIR chooses them (:func:`clair_ray.clair.refine.refinement_bases`). The non-honest clients
    are flagged with reason "oracle" and keep their input. ``ctx.true_subspace``, when given, is only
    reported as the method's subspace.

    Args:
        side: Which side the refinement projects (``column``, ``row`` or ``both``), as CLAIR's ``side``.
    """

    def __init__(self, side: str = "column") -> None:
        if side not in ("column", "row", "both"):
            raise ValueError(f"side: must be 'column', 'row' or 'both', got {side!r}")
        self.side = side

    def aggregate(self, updates: torch.Tensor, ctx: AggContext) -> AggOutput:
        """Refines the honest clients with the true C.

        Raises:
            ValueError: If ``ctx.honest`` is missing or malformed.
        """
        check_updates(updates)
        k, p, _ = updates.shape
        if ctx.honest is None:
            raise ValueError("oracle needs ctx.honest (the true honest client ids), got None")
        honest = sorted({int(i) for i in ctx.honest})
        if any(i < 0 or i >= k for i in honest):
            raise ValueError(f"ctx.honest must hold client ids in [0, {k}), got {list(ctx.honest)!r}")
        check_refine(ctx.refine)
        mask = finite_mask(updates)  # (K,)
        honest_set = set(honest)
        reasons: dict[int, str] = {i: "oracle" for i in range(k) if i not in honest_set}
        for i in non_finite_clients(mask):
            reasons.setdefault(i, NON_FINITE)  # a non-honest client stays "oracle"
        use = [i for i in honest if bool(mask[i])]
        per_client = updates.clone()  # (K, p, q)
        info: dict = {}
        if use:
            blocks = list(updates.to(torch.float64).unbind(0))
            precision = None if ctx.noise_scale is None else 1.0 / ctx.noise_scale.double()[use] ** 2
            # CLAIR's honest mean, on the true honest set.
            weights, _ = mean_weights("dense", blocks, use, precision=precision)
            col, row = refinement_bases("dense", blocks, use, self.side, ctx.refine, ctx.seed, weights)
            bases = [None if c is None else c.basis for c in (col, row)]
            refined = refine_dense(blocks, bases[0], bases[1], use, weights)
            per_client[use] = torch.stack([refined[i] for i in use]).to(updates.dtype)
            info["refine"] = {n: c.summary() for n, c in (("column", col), ("row", row)) if c is not None}
        u = ctx.true_subspace
        subspace = None
        if isinstance(u, torch.Tensor) and u.ndim == 2 and u.shape[0] == p and bool(torch.isfinite(u).all()):
            subspace = torch.linalg.qr(u.to(torch.float64))[0].to(updates.dtype)  # (p, r)
        reasons = dict(sorted(reasons.items()))
        return AggOutput(
            per_client=per_client, flagged=list(reasons), reasons=reasons, subspace=subspace, info=info
        )
