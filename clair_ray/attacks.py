"""Contamination: which clients are contaminated, how, and the attacks themselves, as pure functions.

Two families of contamination (DESIGN.md section 1, issue 3):

- **Update attacks** replace a contaminated client's update before it reaches the server:
  ``sign_flip``, ``gaussian_noise``, ``scaling``, ``alie`` (A Little Is Enough, Baruch et al. 2019),
  ``ipm`` (Inner Product Manipulation, Xie et al. 2020) and ``other_subspace``. ALIE and IPM are
  *omniscient*: they see the honest updates of the round, as in the papers that define them.
- **Data contamination** corrupts a client's training targets before it trains
  (:func:`corrupt_targets`); in a mix it is named ``data_<kind>`` (e.g. ``data_shuffle``).

Who is contaminated is a seeded rule (:func:`select_contaminated`), and which attack each one runs is an
exact, stable split by the configured proportions (:func:`assign_attacks`).

A subspace method such as CLAIR only sees energy *outside* the shared subspace U. A sign-flipped or scaled
honest update and IPM's negative mean all lie inside U, so no subspace method can detect them
(:func:`in_subspace_attack`); judge those by the honest clients' error instead.

Everything here is pure torch / numpy: randomness comes only from the generator or seed passed in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist

import numpy as np
import torch

__all__ = [
    "ATTACK_KINDS",
    "DATA_ATTACK_KINDS",
    "IN_SUBSPACE_KINDS",
    "TARGET_CORRUPTIONS",
    "alie",
    "alie_z",
    "apply_update_attack",
    "assign_attacks",
    "corrupt_targets",
    "gaussian_noise",
    "in_subspace_attack",
    "ipm",
    "is_data_attack",
    "other_subspace",
    "scaling",
    "select_contaminated",
    "sign_flip",
]

#: Update attacks understood by :func:`apply_update_attack`.
ATTACK_KINDS: tuple[str, ...] = ("sign_flip", "gaussian_noise", "scaling", "alie", "ipm", "other_subspace")

#: Target corruptions understood by :func:`corrupt_targets`.
TARGET_CORRUPTIONS: tuple[str, ...] = ("random", "shuffle", "shifted")

#: Data attacks as they appear in an attack mix: ``data_`` + a target corruption.
DATA_ATTACK_KINDS: tuple[str, ...] = tuple(f"data_{k}" for k in TARGET_CORRUPTIONS)

#: Update attacks whose result lies in the honest clients' column space (DESIGN.md section 1): a subspace
#: method cannot see them, by construction.
IN_SUBSPACE_KINDS: frozenset[str] = frozenset({"sign_flip", "scaling", "ipm"})

_FLOAT_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Who is contaminated, and with what
# ---------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    """Returns ``value`` as an int if it is an integer >= ``minimum``, else raises ValueError naming it."""
    # bool is an int subclass; True as a client count is always a config mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_real(name: str, value: object, *, positive: bool = False, nonnegative: bool = False) -> float:
    """Returns ``value`` as a finite float, else raises ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def select_contaminated(num_clients: int, fraction: float, seed: int) -> list[int]:
    """Chooses the contaminated clients by a seeded rule.

    ``round(fraction * num_clients)`` clients (rounded half up, so 2.5 → 3 and the count does not depend
    on Python's banker's rounding) are drawn without replacement with ``numpy.random.default_rng(seed)``.
    The same arguments always give the same set, on every platform.

    Args:
        num_clients: Number of clients K (>= 1).
        fraction: Fraction of contaminated clients, in [0, 1].
        seed: Non-negative integer seed.

    Returns:
        Sorted client ids in ``range(num_clients)``.

    Raises:
        ValueError: If an argument is out of range; the message names the parameter and the value.
    """
    num_clients = _check_int("num_clients", num_clients, 1)
    fraction = _check_real("fraction", fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    seed = _check_int("seed", seed, 0)
    # The small epsilon guards products such as 0.3 * 50 = 15.000000000000002 and 0.15 * 10 =
    # 1.4999999999999998 from floating-point noise in the half-up rule.
    count = min(num_clients, int(math.floor(fraction * num_clients + 0.5 + 1e-9)))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(num_clients, size=count, replace=False)
    return sorted(int(c) for c in chosen)


def assign_attacks(
    contaminated: list[int], mix: Mapping[str, float], seed: int, extra_kinds: tuple[str, ...] = ()
) -> dict[int, str]:
    """Assigns an attack kind to each contaminated client, in exact proportions.

    Counts come from the largest-remainder (Hamilton) method on ``len(contaminated) * weight / sum``:
    each kind first gets the floor of its quota, and the leftover clients go to the largest remainders, ties
    broken by the order of :data:`ATTACK_KINDS` then :data:`DATA_ATTACK_KINDS`. So the counts add up
    exactly, and they depend only on the mix and the number of clients (not on the seed, nor on the
    mix's key order). The seed only decides *which* clients get which kind (a seeded permutation).

    Args:
        contaminated: Distinct contaminated client ids (any order).
        mix: Attack kind → non-negative weight (need not sum to 1; at least one weight > 0). Kinds are
            :data:`ATTACK_KINDS` (update attacks) or :data:`DATA_ATTACK_KINDS` (data contamination).
        seed: Non-negative integer seed.
        extra_kinds: Further kinds a workload implements itself (e.g. the copy task's ``data_reversed``),
            appended to the canonical order; a mix without them splits exactly as if they did not exist.

    Returns:
        Client id → attack kind, for every id in ``contaminated`` (keys in sorted order).

    Raises:
        ValueError: On an unknown kind, a negative or non-finite weight, an all-zero mix, duplicate ids or
            a bad seed.
    """
    seed = _check_int("seed", seed, 0)
    ids = [_check_int("contaminated[i]", c, 0) for c in contaminated]
    if len(set(ids)) != len(ids):
        raise ValueError(f"contaminated must not repeat client ids, got {list(contaminated)!r}")
    valid = ATTACK_KINDS + DATA_ATTACK_KINDS + tuple(k for k in extra_kinds if k not in DATA_ATTACK_KINDS)
    unknown = [k for k in mix if k not in valid]
    if unknown:
        raise ValueError(f"mix has unknown attack kind(s) {unknown!r}; valid kinds: {', '.join(valid)}")
    weights = {k: _check_real(f"mix[{k!r}]", w, nonnegative=True) for k, w in mix.items()}
    total = sum(weights.values())
    if not ids:
        return {}
    if total <= 0:
        raise ValueError(f"mix must have at least one positive weight, got {dict(mix)!r}")

    # Canonical kind order, so the split cannot depend on the mapping's insertion order.
    kinds = [k for k in valid if weights.get(k, 0.0) > 0]
    n = len(ids)
    quotas = [n * weights[k] / total for k in kinds]
    counts = [int(math.floor(qt)) for qt in quotas]
    leftover = n - sum(counts)
    # Largest remainder first; the stable sort keeps canonical order among equal remainders.
    by_remainder = sorted(range(len(kinds)), key=lambda i: -(quotas[i] - counts[i]))
    for i in by_remainder[:leftover]:
        counts[i] += 1

    order = np.random.default_rng(seed).permutation(sorted(ids))
    labels = [k for k, c in zip(kinds, counts, strict=True) for _ in range(c)]  # exactly len(ids)
    assignment = {int(cid): kind for cid, kind in zip(order, labels, strict=True)}
    return dict(sorted(assignment.items()))


def in_subspace_attack(kind: str) -> bool:
    """Whether an attack's result lies inside the honest clients' shared subspace.

    sign_flip, scaling and ipm produce a multiple of an honest update or of the honest mean, so their
    column space is U: CLAIR (any subspace method) cannot see them (DESIGN.md section 1). Data attacks
    change the local estimate through the client's data, which does not preserve U, so they count as
    visible.

    Args:
        kind: An update or data attack kind.

    Returns:
        True for sign_flip, scaling and ipm; False for every other known kind.

    Raises:
        ValueError: On an unknown kind.
    """
    if kind not in ATTACK_KINDS + DATA_ATTACK_KINDS:
        raise ValueError(
            f"unknown attack kind {kind!r}; valid kinds: {', '.join(ATTACK_KINDS + DATA_ATTACK_KINDS)}"
        )
    return kind in IN_SUBSPACE_KINDS


def is_data_attack(kind: str) -> bool:
    """Whether ``kind`` is a data attack (``data_<corruption>``) rather than an update attack."""
    return kind in DATA_ATTACK_KINDS


# ---------------------------------------------------------------------------------------------------------
# Update attacks
# ---------------------------------------------------------------------------------------------------------


def _check_update(name: str, x: object, ndim: int) -> torch.Tensor:
    """Checks that ``x`` is a float32/float64 tensor with ``ndim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    return x


def sign_flip(update: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Sign-flip attack: sends ``-scale * update``.

    Lies in the client's own column space, so a subspace method cannot detect it.

    Args:
        update: (p, q) the client's honest update.
        scale: Positive magnitude of the flipped update (1 = plain sign flip).

    Returns:
        (p, q) ``-scale * update``, same dtype.
    """
    _check_update("update", update, 2)
    scale = _check_real("scale", scale, positive=True)
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
    _check_update("update", update, 2)
    if sigma is None:
        sigma = float(torch.linalg.norm(update)) / math.sqrt(max(update.numel(), 1))
    else:
        sigma = _check_real("sigma", sigma, nonnegative=True)
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
    _check_update("update", update, 2)
    factor = _check_real("factor", factor)
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
    n = _check_int("num_clients", num_clients, 2)
    f = _check_int("num_attackers", num_attackers, 0)
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
    _check_update("honest_updates", honest_updates, 3)
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
        z = _check_real("z", z)
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
    _check_update("honest_updates", honest_updates, 3)
    if honest_updates.shape[0] < 1:
        raise ValueError("ipm needs at least 1 honest update, got honest_updates.shape[0]=0")
    eps = _check_real("eps", eps, positive=True)
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
    p = _check_int("shape[0]", shape[0], 1)
    q = _check_int("shape[1]", shape[1], 1)
    rank = _check_int("rank", rank, 1)
    norm = _check_real("norm", norm, nonnegative=True)
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


#: Default parameters of each update attack in :func:`apply_update_attack` (config can override them).
_ATTACK_DEFAULTS: dict[str, dict[str, object]] = {
    "sign_flip": {"scale": 1.0},
    "gaussian_noise": {"sigma": None},
    "scaling": {"factor": 10.0},
    "alie": {"z": None, "num_clients": None, "num_attackers": None},
    "ipm": {"eps": 0.1},
    "other_subspace": {"rank": None, "norm": None, "avoid": None},
}


def apply_update_attack(
    kind: str,
    own_update: torch.Tensor,
    honest_updates: torch.Tensor | None,
    generator: torch.Generator,
    **params: object,
) -> torch.Tensor:
    """Applies one update attack: the dispatcher the engine calls for a contaminated client.

    Parameters per kind (defaults in brackets):

    - ``sign_flip``: ``scale`` [1.0].
    - ``gaussian_noise``: ``sigma`` [None: the own update's energy, see :func:`gaussian_noise`].
    - ``scaling``: ``factor`` [10.0].
    - ``alie``: ``z`` [None], ``num_clients``, ``num_attackers`` (needed when z is None). Uses
      ``honest_updates``.
    - ``ipm``: ``eps`` [0.1, the small-eps setting of Xie et al. that defeats median and Krum]. Uses
      ``honest_updates``.
    - ``other_subspace``: ``rank`` (required), ``norm`` [None: ``||own_update||_F``], ``avoid`` [None].

    Args:
        kind: One of :data:`ATTACK_KINDS`.
        own_update: (p, q) the attacker's own honest update (its shape, dtype and device set the result's).
        honest_updates: (H, p, q) the round's honest updates, for the omniscient attacks (alie, ipm);
            may be None for the others.
        generator: Source of randomness for gaussian_noise and other_subspace.
        **params: Kind-specific parameters, above. Unknown names are an error (catches config typos).

    Returns:
        (p, q) the update the attacker sends, same dtype and device as ``own_update``.

    Raises:
        ValueError: On an unknown kind (the message lists the valid ones), an unknown or missing
            parameter, or missing ``honest_updates`` for an omniscient attack.
    """
    if kind not in ATTACK_KINDS:
        raise ValueError(f"unknown update attack kind {kind!r}; valid kinds: {', '.join(ATTACK_KINDS)}")
    _check_update("own_update", own_update, 2)
    allowed = _ATTACK_DEFAULTS[kind]
    extra = sorted(set(params) - set(allowed))
    if extra:
        raise ValueError(f"unknown parameter(s) {extra} for attack {kind!r}; allowed: {sorted(allowed)}")
    kw = {**allowed, **params}

    if kind in ("alie", "ipm"):
        if honest_updates is None:
            raise ValueError(f"attack {kind!r} is omniscient and needs honest_updates, got None")
        _check_update("honest_updates", honest_updates, 3)
        if tuple(honest_updates.shape[1:]) != tuple(own_update.shape):
            raise ValueError(
                f"honest_updates must be (H, {own_update.shape[0]}, {own_update.shape[1]}), "
                f"got {tuple(honest_updates.shape)}"
            )
        honest = honest_updates.to(dtype=own_update.dtype, device=own_update.device)  # (H, p, q)

    if kind == "sign_flip":
        return sign_flip(own_update, scale=kw["scale"])
    if kind == "gaussian_noise":
        return gaussian_noise(own_update, kw["sigma"], generator)
    if kind == "scaling":
        return scaling(own_update, kw["factor"])
    if kind == "alie":
        return alie(honest, kw["z"], num_clients=kw["num_clients"], num_attackers=kw["num_attackers"])
    if kind == "ipm":
        return ipm(honest, kw["eps"])
    # other_subspace
    if kw["rank"] is None:
        raise ValueError("attack 'other_subspace' needs rank=..., got rank=None")
    norm = float(torch.linalg.norm(own_update)) if kw["norm"] is None else kw["norm"]
    return other_subspace(
        tuple(own_update.shape),
        kw["rank"],
        norm,
        generator,
        avoid=kw["avoid"],
        dtype=own_update.dtype,
        device=own_update.device,
    )


# ---------------------------------------------------------------------------------------------------------
# Data contamination
# ---------------------------------------------------------------------------------------------------------


def corrupt_targets(kind: str, Y: torch.Tensor, generator: torch.Generator, **params: object) -> torch.Tensor:
    """Corrupts a client's training targets: the data-contamination hook.

    The linear workload calls it on its (n, q) response matrix before the local OLS fit; a mix names these
    kinds ``data_<kind>``. Later workloads (LoRA on token sequences) reuse it on their integer targets,
    which is what ``num_classes`` is for, and add kinds here when they need new ones.

    Kinds:

    - ``random``: float Y → i.i.d. N(0, s²) with s the RMS of Y (same scale, no signal); integer Y →
      uniform labels in ``[0, num_classes)``.
    - ``shuffle``: permutes the rows (samples), breaking the pairing of inputs and targets while keeping
      the marginal distribution of Y exactly. Any dtype.
    - ``shifted``: float Y → ``Y + offset`` (``offset`` a float or a (q,) tensor; default: the RMS of Y);
      integer Y → ``(Y + offset) mod num_classes`` (a label shift; ``offset`` an int, default 1).

    Args:
        kind: One of :data:`TARGET_CORRUPTIONS` (a ``data_`` prefix is accepted and stripped).
        Y: (n, ...) targets, first dimension = samples.
        generator: Source of randomness (on Y's device).
        **params: ``offset`` (shifted), ``num_classes`` (integer targets with random / shifted).

    Returns:
        Corrupted targets, same shape, dtype and device as ``Y``.

    Raises:
        ValueError: On an unknown kind (the message lists the valid ones) or a missing / bad parameter.
    """
    if kind.startswith("data_"):
        kind = kind[len("data_") :]
    if kind not in TARGET_CORRUPTIONS:
        raise ValueError(f"unknown target corruption {kind!r}; valid kinds: {', '.join(TARGET_CORRUPTIONS)}")
    if not isinstance(Y, torch.Tensor) or Y.ndim < 1:
        raise ValueError(f"Y must be a torch.Tensor with a sample dimension, got {getattr(Y, 'shape', Y)!r}")
    allowed = {"random": {"num_classes"}, "shuffle": set(), "shifted": {"offset", "num_classes"}}[kind]
    extra = sorted(set(params) - allowed)
    if extra:
        raise ValueError(
            f"unknown parameter(s) {extra} for target corruption {kind!r}; allowed: {sorted(allowed)}"
        )

    if kind == "shuffle":
        perm = torch.randperm(Y.shape[0], generator=generator, device=Y.device)  # (n,)
        return Y[perm]

    is_float = Y.is_floating_point()
    if not is_float:
        num_classes = _check_int("num_classes", params.get("num_classes"), 1)
        if kind == "random":
            return torch.randint(0, num_classes, Y.shape, generator=generator, dtype=Y.dtype, device=Y.device)
        offset = _check_int("offset", params.get("offset", 1), 0)
        return (Y + offset) % num_classes

    rms = torch.sqrt(torch.mean(Y.double() ** 2)).item() if Y.numel() else 0.0
    if kind == "random":
        return rms * torch.randn(Y.shape, generator=generator, dtype=Y.dtype, device=Y.device)
    offset = params.get("offset")
    if offset is None:
        offset = rms
    if isinstance(offset, torch.Tensor):
        if not torch.isfinite(offset).all():
            raise ValueError("offset must be finite")
        offset = offset.to(dtype=Y.dtype, device=Y.device)
    else:
        offset = _check_real("offset", offset)
    return Y + offset
