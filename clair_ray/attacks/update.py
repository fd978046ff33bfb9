"""The built-in update attacks, as pure functions, each registered with its defaults.

``sign_flip``, ``gaussian_noise``, ``scaling``, ``alie`` (A Little Is Enough, Baruch et al. 2019),
``ipm`` (Inner Product Manipulation, Xie et al. 2020) and ``other_subspace``. ALIE and IPM are omniscient:
they see the honest updates of the round, as in the papers that define them. The registered entry of each
(``_registered_*``) adapts the public function to the dispatcher's signature
``(own, honest, generator, ctx, **params)``.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from clair_ray.attacks._checks import check_int, check_real
from clair_ray.attacks.registry import AttackContext, check_update, register_attack

_FLOAT_DTYPES = (torch.float32, torch.float64)


def sign_flip(update: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Sign-flip attack: sends ``-scale * update``.

    Lies in the client's own column space, so a subspace method cannot detect it.

    Args:
        update: (p, q) the client's honest update.
        scale: Positive magnitude of the flipped update (1 = plain sign flip).

    Returns:
        (p, q) ``-scale * update``, same dtype.
    """
    check_update("update", update, 2)
    scale = check_real("scale", scale, positive=True)
    return -scale * update  # (p, q)


def gaussian_noise(update: torch.Tensor, sigma: float | None, generator: torch.Generator) -> torch.Tensor:
    """Gaussian-noise attack: replaces the update by i.i.d. Gaussian noise.

    Args:
        update: (p, q) the client's honest update (only its shape, dtype, device and, when ``sigma`` is
            None, its norm are used).
        sigma: Standard deviation of each entry. None matches the update's own energy:
            ``sigma = ||update||_F / sqrt(p * q)``, so the noise has the same expected Frobenius norm and a
            norm check alone cannot spot it.
        generator: Source of randomness (on the update's device).

    Returns:
        (p, q) noise, same dtype and device as ``update``.
    """
    check_update("update", update, 2)
    if sigma is None:
        sigma = float(torch.linalg.norm(update)) / math.sqrt(max(update.numel(), 1))
    else:
        sigma = check_real("sigma", sigma, nonnegative=True)
    noise = torch.randn(update.shape, generator=generator, dtype=update.dtype, device=update.device)
    return sigma * noise  # (p, q)


def scaling(update: torch.Tensor, factor: float) -> torch.Tensor:
    """Scaling (boosting) attack: sends ``factor * update``.

    Stays in the client's own column space, so a subspace method cannot detect it; a large factor hurts
    plain averaging.

    Args:
        update: (p, q) the client's honest update.
        factor: Finite multiplier (e.g. 10 to boost, a negative value to also flip).

    Returns:
        (p, q) ``factor * update``, same dtype.
    """
    check_update("update", update, 2)
    factor = check_real("factor", factor)
    return factor * update  # (p, q)


def alie_z(num_clients: int, num_attackers: int) -> float:
    """The z of "A Little Is Enough" (Baruch et al. 2019, Algorithm 3).

    With n clients of which f are attackers, the attackers need s = floor(n/2 + 1) - f honest clients to
    side with them; the largest deviation that still leaves s honest clients farther from the mean is
    ``z = Φ⁻¹((n - s) / n)`` (standard normal quantile).

    Args:
        num_clients: Total number of clients n (>= 2).
        num_attackers: Number of attackers f (0 <= f < n, and small enough that (n - s) / n < 1).

    Returns:
        z (may be <= 0 when there are very few attackers).

    Raises:
        ValueError: If the arguments are out of range or the formula has no finite z.
    """
    n = check_int("num_clients", num_clients, 2)
    f = check_int("num_attackers", num_attackers, 0)
    if f >= n:
        raise ValueError(f"num_attackers must be < num_clients ({n}), got {f}")
    s = math.floor(n / 2 + 1) - f
    prob = (n - s) / n
    if not 0.0 < prob < 1.0:
        raise ValueError(
            f"ALIE's z = Φ⁻¹((n - s) / n) is infinite for num_clients={n}, num_attackers={f} "
            f"(s = {s}); give z explicitly"
        )
    return NormalDist().inv_cdf(prob)


def alie(
    honest_updates: torch.Tensor,
    z: float | None = None,
    *,
    num_clients: int | None = None,
    num_attackers: int | None = None,
) -> torch.Tensor:
    """A Little Is Enough (Baruch et al. 2019): ``mean - z * std``, coordinate by coordinate.

    Omniscient: uses the honest updates of the round. Every attacker sends the same update, just inside
    the honest spread per coordinate (so coordinate-wise defences keep it), but coherently biased. The std
    is the sample standard deviation (``correction=1``) over the honest clients.

    Args:
        honest_updates: (H, p, q) the round's honest updates, H >= 2, all finite.
        z: Deviation in standard deviations. None computes it with :func:`alie_z` from ``num_clients`` and
            ``num_attackers``.
        num_clients: Total clients n, needed when ``z`` is None.
        num_attackers: Attackers f, needed when ``z`` is None.

    Returns:
        (p, q) the malicious update, same dtype.

    Raises:
        ValueError: On fewer than 2 honest updates, or a missing ``num_clients`` / ``num_attackers``.
    """
    check_update("honest_updates", honest_updates, 3)
    if honest_updates.shape[0] < 2:
        raise ValueError(
            f"alie needs at least 2 honest updates, got honest_updates.shape[0]={honest_updates.shape[0]}"
        )
    if z is None:
        if num_clients is None or num_attackers is None:
            raise ValueError(
                f"alie needs z, or num_clients and num_attackers to compute it "
                f"(got num_clients={num_clients!r}, num_attackers={num_attackers!r})"
            )
        z = alie_z(num_clients, num_attackers)
    else:
        z = check_real("z", z)
    mean = honest_updates.mean(dim=0)  # (p, q)
    std = honest_updates.std(dim=0, correction=1)  # (p, q)
    return mean - z * std  # (p, q)


def ipm(honest_updates: torch.Tensor, eps: float) -> torch.Tensor:
    """Inner Product Manipulation (Xie et al. 2020): ``-eps * mean(honest)``.

    Omniscient. Its inner product with the honest mean is ``-eps * ||mean||^2 < 0``: a small eps slips
    past median / Krum-style rules, a large one breaks plain averaging. It lies in U.

    Args:
        honest_updates: (H, p, q) the round's honest updates, H >= 1.
        eps: Positive strength.

    Returns:
        (p, q) the malicious update, same dtype.
    """
    check_update("honest_updates", honest_updates, 3)
    if honest_updates.shape[0] < 1:
        raise ValueError("ipm needs at least 1 honest update, got honest_updates.shape[0]=0")
    eps = check_real("eps", eps, positive=True)
    return -eps * honest_updates.mean(dim=0)  # (p, q)


def other_subspace(
    shape: tuple[int, int],
    rank: int,
    norm: float,
    generator: torch.Generator,
    *,
    avoid: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A random rank-``rank`` update with a random column space: contamination a subspace method can see.

    Built as ``Q Vᵀ`` with Q (p, rank) orthonormal (QR of a Gaussian matrix: a uniformly random subspace)
    and V (q, rank) Gaussian, then scaled to Frobenius norm ``norm``. Giving it the honest updates' norm
    means only its direction can give it away.

    Args:
        shape: (p, q).
        rank: Rank of the update, 1 <= rank <= min(p, q) (and <= p - avoid's rank when ``avoid`` is given).
        norm: Frobenius norm of the result (>= 0).
        generator: Source of randomness (on ``device``).
        avoid: Optional (p, r0) basis; the column space is then drawn inside its orthogonal complement, so
            the result has no energy in that subspace (e.g. the true U). None: uniformly random.
        dtype: float32 or float64.
        device: Device of the result (and of ``generator``).

    Returns:
        (p, q) the update.
    """
    if len(shape) != 2:
        raise ValueError(f"shape must be (p, q), got {shape!r}")
    p = check_int("shape[0]", shape[0], 1)
    q = check_int("shape[1]", shape[1], 1)
    rank = check_int("rank", rank, 1)
    norm = check_real("norm", norm, nonnegative=True)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    free = p
    if avoid is not None:
        if not isinstance(avoid, torch.Tensor) or avoid.ndim != 2 or avoid.shape[0] != p:
            raise ValueError(f"avoid must be a (p={p}, r0) tensor, got {getattr(avoid, 'shape', avoid)!r}")
        free = p - avoid.shape[1]
    if rank > min(free, q):
        raise ValueError(f"rank must be <= {min(free, q)} for shape {(p, q)} (avoid excluded), got {rank}")
    # Draw in float64: the QR and the projection stay accurate, and the sample does not depend on dtype.
    g = torch.randn((p, rank), generator=generator, dtype=torch.float64, device=device)  # (p, rank)
    if avoid is not None:
        basis, _ = torch.linalg.qr(avoid.to(device=g.device, dtype=torch.float64))  # (p, r0)
        g = g - basis @ (basis.T @ g)  # (p, rank), orthogonal to span(avoid)
    q_basis, _ = torch.linalg.qr(g)  # (p, rank)
    if avoid is not None:
        # Re-project once: QR of nearly-orthogonal columns can leak round-off back into span(avoid).
        q_basis = q_basis - basis @ (basis.T @ q_basis)
        q_basis, _ = torch.linalg.qr(q_basis)
    v = torch.randn((q, rank), generator=generator, dtype=torch.float64, device=device)  # (q, rank)
    m = q_basis @ v.T  # (p, q)
    m = m * (norm / torch.linalg.norm(m))
    return m.to(dtype)


# ---------------------------------------------------------------------------------------------------------
# Registrations: the dispatcher's signature (own, honest, generator, ctx, **params) -> (p, q)
# ---------------------------------------------------------------------------------------------------------


@register_attack("sign_flip", defaults={"scale": 1.0}, in_subspace=True)
def _registered_sign_flip(
    own: torch.Tensor, honest: torch.Tensor | None, g: torch.Generator, ctx: AttackContext, scale: float
) -> torch.Tensor:
    return sign_flip(own, scale=scale)


@register_attack("gaussian_noise", defaults={"sigma": None})
def _registered_gaussian_noise(
    own: torch.Tensor,
    honest: torch.Tensor | None,
    g: torch.Generator,
    ctx: AttackContext,
    sigma: float | None,
) -> torch.Tensor:
    return gaussian_noise(own, sigma, g)


@register_attack("scaling", defaults={"factor": 10.0}, in_subspace=True)
def _registered_scaling(
    own: torch.Tensor, honest: torch.Tensor | None, g: torch.Generator, ctx: AttackContext, factor: float
) -> torch.Tensor:
    return scaling(own, factor)


@register_attack("alie", defaults={"z": None, "num_clients": None, "num_attackers": None}, omniscient=True)
def _registered_alie(
    own: torch.Tensor,
    honest: torch.Tensor | None,
    g: torch.Generator,
    ctx: AttackContext,
    z: float | None,
    num_clients: int | None,
    num_attackers: int | None,
) -> torch.Tensor:
    assert honest is not None
    if z is None:  # the attacker knows how many clients there are and how many of them it controls
        num_clients = ctx.num_clients if num_clients is None else num_clients
        num_attackers = max(ctx.num_attackers, 1) if num_attackers is None else num_attackers
    return alie(honest, z, num_clients=num_clients, num_attackers=num_attackers)


@register_attack("ipm", defaults={"eps": 0.1}, in_subspace=True, omniscient=True)
def _registered_ipm(
    own: torch.Tensor, honest: torch.Tensor | None, g: torch.Generator, ctx: AttackContext, eps: float
) -> torch.Tensor:
    assert honest is not None
    return ipm(honest, eps)


@register_attack("other_subspace", defaults={"rank": None, "norm": None, "avoid": None})
def _registered_other_subspace(
    own: torch.Tensor,
    honest: torch.Tensor | None,
    g: torch.Generator,
    ctx: AttackContext,
    rank: int | None,
    norm: float | None,
    avoid: torch.Tensor | None,
) -> torch.Tensor:
    rank = ctx.rank if rank is None else rank
    if rank is None:
        raise ValueError("attack 'other_subspace' needs rank=..., got rank=None")
    norm = float(torch.linalg.norm(own)) if norm is None else norm
    return other_subspace(tuple(own.shape), rank, norm, g, avoid=avoid, dtype=own.dtype, device=own.device)
