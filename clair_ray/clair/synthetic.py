"""Synthetic instances of CLAIR's linear model, for tests, the demo and theory checks.

Honest client k: W_k = W_0 + U V_k^T with U (p, r) orthonormal and shared, V_k = V_bar + h G_k (h the
heterogeneity knob: 0 = all alike). Contaminated clients get Delta_k of one of several kinds:

    dense_noise     Gaussian p x q noise
    other_subspace  U' V'^T with U' a random rank-r subspace (not U)
    sign_flip       -U V_k^T (inside U: no subspace method can see it)
    scaled          s U V_k^T (inside U)
    partial         half inside U, half in another subspace

Every contaminated update is rescaled to the median honest update norm, so no kind is detectable by its
size alone. The preliminary estimate is M_k = W_k + E_k, with E_k Gaussian of std sigma (``make_instance``)
or the OLS error of a multi-response regression Y_k = X_k W_k + noise on n_k samples
(``make_regression``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

CONTAMINATION_KINDS = ("dense_noise", "other_subspace", "sign_flip", "scaled", "partial")
IN_SUBSPACE_KINDS = ("sign_flip", "scaled")


@dataclass
class Instance:
    """A synthetic CLAIR instance.

    Attributes:
        estimates: (K, p, q) preliminary estimates M_k (what CLAIR sees).
        truth: (K, p, q) true W_k (for contaminated clients, their corrupted W_k).
        base: (p, q) W_0.
        subspace: (p, r) true U.
        contaminated: Sorted contaminated client indices.
        kinds: Contamination kind of each contaminated client.
        noise_scale: (K,) relative noise level of each estimate (1 for Gaussian noise; for OLS
            sqrt(tr((X_k^T X_k)^-1))).
        sigma: Noise standard deviation.
    """

    estimates: torch.Tensor
    truth: torch.Tensor
    base: torch.Tensor
    subspace: torch.Tensor
    contaminated: list[int]
    kinds: dict[int, str]
    noise_scale: torch.Tensor
    sigma: float

    @property
    def honest(self) -> list[int]:
        """Indices of honest clients."""
        bad = set(self.contaminated)
        return [k for k in range(self.estimates.shape[0]) if k not in bad]

    def detectable(self) -> list[int]:
        """Contaminated clients with energy outside U (the ground truth for detection metrics)."""
        return [k for k in self.contaminated if self.kinds[k] not in IN_SUBSPACE_KINDS]


def _orthonormal(p: int, r: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(p, r, generator=gen, dtype=torch.float64))
    return q  # (p, r)


def _true_models(
    num_clients: int,
    p: int,
    q: int,
    rank: int,
    fraction: float,
    kinds: Sequence[str],
    heterogeneity: float,
    base_scale: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], dict[int, str]]:
    for kind in kinds:
        if kind not in CONTAMINATION_KINDS:
            raise ValueError(f"kinds: unknown contamination kind {kind!r}; valid: {CONTAMINATION_KINDS}")
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"fraction: must be in [0, 0.5), got {fraction!r}")
    if not 1 <= rank < p:
        raise ValueError(f"rank: must be in [1, p={p}), got {rank!r}")
    u = _orthonormal(p, rank, gen)  # (p, r)
    base = base_scale * torch.randn(p, q, generator=gen, dtype=torch.float64)  # (p, q)
    v_bar = torch.randn(q, rank, generator=gen, dtype=torch.float64)  # (q, r)
    deltas = []
    for _ in range(num_clients):
        v_k = v_bar + heterogeneity * torch.randn(q, rank, generator=gen, dtype=torch.float64)
        deltas.append(u @ v_k.T)  # (p, q)
    delta = torch.stack(deltas)  # (K, p, q)
    n_bad = round(fraction * num_clients)
    perm = torch.randperm(num_clients, generator=gen)
    contaminated = sorted(perm[:n_bad].tolist())
    kind_of = {k: kinds[i % len(kinds)] for i, k in enumerate(contaminated)}
    target = float(torch.linalg.vector_norm(delta, dim=(1, 2)).median())
    for k, kind in kind_of.items():
        if kind == "dense_noise":
            d = torch.randn(p, q, generator=gen, dtype=torch.float64)
        elif kind == "other_subspace":
            d = _orthonormal(p, rank, gen) @ torch.randn(rank, q, generator=gen, dtype=torch.float64)
        elif kind == "sign_flip":
            d = -delta[k]
        elif kind == "scaled":
            d = 3.0 * delta[k]
        else:  # partial
            other = _orthonormal(p, rank, gen) @ torch.randn(rank, q, generator=gen, dtype=torch.float64)
            d = delta[k] / torch.linalg.matrix_norm(delta[k]) + other / torch.linalg.matrix_norm(other)
        scale = 3.0 if kind == "scaled" else 1.0
        delta[k] = d * (scale * target / float(torch.linalg.matrix_norm(d)))
    return u, base, delta, contaminated, kind_of


def make_instance(
    num_clients: int = 30,
    p: int = 20,
    q: int = 5,
    rank: int = 3,
    *,
    fraction: float = 0.2,
    kinds: Sequence[str] = ("dense_noise", "other_subspace"),
    heterogeneity: float = 1.0,
    sigma: float = 0.0,
    base_scale: float = 0.0,
    seed: int = 0,
) -> Instance:
    """Linear model with Gaussian estimation noise: M_k = W_0 + Delta_k + E_k, E_k ~ N(0, sigma^2).

    Args:
        num_clients: K.
        p: Rows (the shared side).
        q: Columns (1 gives regression columns).
        rank: r.
        fraction: Contaminated fraction (the method is never told it).
        kinds: Contamination kinds, assigned round-robin.
        heterogeneity: Spread of honest V_k around their common mean.
        sigma: Noise standard deviation.
        base_scale: Std of the entries of W_0 (0: W_0 = 0, so updates are Delta_k and offset=False fits).
        seed: Seed.

    Returns:
        The instance.
    """
    gen = torch.Generator().manual_seed(seed)
    u, base, delta, bad, kind_of = _true_models(
        num_clients, p, q, rank, fraction, kinds, heterogeneity, base_scale, gen
    )
    truth = base + delta
    noise = sigma * torch.randn(num_clients, p, q, generator=gen, dtype=torch.float64)
    return Instance(
        truth + noise, truth, base, u, bad, kind_of, torch.ones(num_clients, dtype=torch.float64), sigma
    )


def make_regression(
    num_clients: int = 30,
    p: int = 20,
    q: int = 5,
    rank: int = 3,
    *,
    samples: Sequence[int] | int = 40,
    fraction: float = 0.2,
    kinds: Sequence[str] = ("dense_noise", "other_subspace"),
    heterogeneity: float = 1.0,
    sigma: float = 0.5,
    base_scale: float = 0.0,
    seed: int = 0,
) -> Instance:
    """Multi-response regression Y_k = X_k W_k + noise, X_k (n_k, p); M_k is the OLS estimate (p, q).

    The OLS error (X_k^T X_k)^-1 X_k^T noise has covariance sigma^2 (X_k^T X_k)^-1 per column, so its
    expected squared norm is sigma^2 q tr((X_k^T X_k)^-1); ``noise_scale`` is sqrt(tr((X_k^T X_k)^-1)),
    about sqrt(p / (n_k - p)) and far from 1/sqrt(n_k) when n_k is close to p (pass it to
    :func:`clair_ray.clair`).

    Args:
        num_clients: K.
        p: Features (the shared side).
        q: Responses.
        rank: r.
        samples: n_k, one for all or one per client (each >= p).
        fraction: Contaminated fraction.
        kinds: Contamination kinds, assigned round-robin.
        heterogeneity: Spread of honest V_k.
        sigma: Std of the response noise.
        base_scale: Std of the entries of W_0.
        seed: Seed.

    Returns:
        The instance.
    """
    n = [samples] * num_clients if isinstance(samples, int) else list(samples)
    if len(n) != num_clients:
        raise ValueError(f"samples: expected {num_clients} sizes, got {len(n)}")
    if min(n) < p:
        raise ValueError(f"samples: every n_k must be >= p={p} for OLS, got min {min(n)}")
    gen = torch.Generator().manual_seed(seed)
    u, base, delta, bad, kind_of = _true_models(
        num_clients, p, q, rank, fraction, kinds, heterogeneity, base_scale, gen
    )
    truth = base + delta
    estimates, scale = [], []
    for k in range(num_clients):
        x = torch.randn(n[k], p, generator=gen, dtype=torch.float64)  # (n_k, p)
        y = x @ truth[k] + sigma * torch.randn(n[k], q, generator=gen, dtype=torch.float64)  # (n_k, q)
        # gelsd: the default CPU driver (gelsy) differs in the last bits from run to run.
        estimates.append(torch.linalg.lstsq(x, y, driver="gelsd").solution)  # (p, q)
        scale.append(float(torch.linalg.inv(x.T @ x).trace().sqrt()))
    return Instance(
        torch.stack(estimates), truth, base, u, bad, kind_of, torch.tensor(scale, dtype=torch.float64), sigma
    )


def lora_factors(
    instance: Instance, lora_rank: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exact factor pairs (B_k, A_k) of each estimate's update M_k - W_0, padded to ``lora_rank``.

    Each update is factored by its SVD truncated at ``lora_rank`` (exact when its rank is at most that),
    then rotated by a random r' x r' orthogonal matrix so B_k is not already orthonormal.
    """
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for m in instance.estimates - instance.base:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        rot = _orthonormal(lora_rank, lora_rank, gen)
        b = (u[:, :lora_rank] * s[:lora_rank]) @ rot  # (p, r')
        a = rot.T @ vh[:lora_rank]  # (r', q)
        pairs.append((b, a))
    return pairs
