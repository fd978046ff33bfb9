"""Who is contaminated in a trial and with what: seeded, exact, the same in every process."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from clair_ray.attacks._checks import check_int, check_real
from clair_ray.attacks.registry import canonical_order, is_data_attack


def select_contaminated(num_clients: int, fraction: float, seed: int) -> list[int]:
    """Chooses the contaminated clients by a seeded rule.

    ``round(fraction * num_clients)`` clients (rounded half up, so 2.5 → 3 and the count does not depend
    on Python's banker's rounding) are drawn without replacement with ``numpy.random.default_rng(seed)``.

    Args:
        num_clients: Number of clients K (>= 1).
        fraction: Fraction of contaminated clients, in [0, 1].
        seed: Non-negative integer seed.

    Returns:
        Sorted client ids in ``range(num_clients)``.

    Raises:
        ValueError: If an argument is out of range; the message names the parameter and the value.
    """
    num_clients = check_int("num_clients", num_clients, 1)
    fraction = check_real("fraction", fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    seed = check_int("seed", seed, 0)
    count = min(num_clients, _half_up(fraction * num_clients))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(num_clients, size=count, replace=False)
    return sorted(int(c) for c in chosen)


def _half_up(x: float) -> int:
    # The epsilon guards products such as 0.3 * 50 = 15.000000000000002 and 0.15 * 10 = 1.4999999999999998.
    return int(math.floor(x + 0.5 + 1e-9))


def assumed_attackers(assumed_fraction: float | None, fraction: float, n_active: int) -> int:
    """Number of attackers that baselines assume: a fraction of the active clients, from config.

    Args:
        assumed_fraction: ``aggregation.assumed_fraction`` (None: use ``fraction``).
        fraction: ``contamination.fraction``.
        n_active: Clients with a valid update this round.

    Returns:
        The count, rounded half up like :func:`select_contaminated`. Never the true count.
    """
    frac = fraction if assumed_fraction is None else assumed_fraction
    return _half_up(frac * n_active)


def assign_attacks(
    contaminated: list[int], mix: Mapping[str, float], seed: int, extra_kinds: tuple[str, ...] = ()
) -> dict[int, str]:
    """Assigns an attack kind to each contaminated client, in exact proportions.

    Counts come from the largest-remainder (Hamilton) method on ``len(contaminated) * weight / sum``:
    each kind first gets the floor of its quota, and the leftover clients go to the largest remainders, ties
    broken by :func:`~clair_ray.attacks.registry.canonical_order` (the package's update attacks, its data
    attacks, then every other registered kind by name). So the counts add up exactly and depend only on
    the mix and the number of clients; the seed only decides *which* clients get which kind (a seeded
    permutation).

    Args:
        contaminated: Distinct contaminated client ids (any order).
        mix: Attack kind → non-negative weight (at least one weight > 0); registered kinds only.
        seed: Non-negative integer seed.
        extra_kinds: Kinds accepted besides the registry (unregistered workload-local kinds), appended to
            the canonical order.

    Returns:
        Client id → attack kind, for every id in ``contaminated`` (keys in sorted order).

    Raises:
        ValueError: On an unknown kind, a negative or non-finite weight, an all-zero mix, duplicate ids or
            a bad seed.
    """
    seed = check_int("seed", seed, 0)
    ids = [check_int("contaminated[i]", c, 0) for c in contaminated]
    if len(set(ids)) != len(ids):
        raise ValueError(f"contaminated must not repeat client ids, got {list(contaminated)!r}")
    registered = canonical_order()
    valid = (*registered, *(k for k in extra_kinds if k not in registered))
    unknown = [k for k in mix if k not in valid]
    if unknown:
        raise ValueError(f"mix has unknown attack kind(s) {unknown!r}; valid kinds: {', '.join(valid)}")
    weights = {k: check_real(f"mix[{k!r}]", w, nonnegative=True) for k, w in mix.items()}
    total = sum(weights.values())
    if not ids:
        return {}
    if total <= 0:
        raise ValueError(f"mix must have at least one positive weight, got {dict(mix)!r}")
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


@dataclass(frozen=True)
class Contamination:
    """Who is contaminated in one trial, and with what (a pure function of config and seeds).

    Attributes:
        contaminated: Sorted contaminated client ids.
        attack: Client id -> attack kind.
    """

    contaminated: list[int]
    attack: dict[int, str]

    def is_data_attack(self, k: int) -> bool:
        """Whether client k's contamination corrupts its data (else it attacks its update, or is honest)."""
        return is_data_attack(self.attack.get(k, ""))

    def update_attackers(self) -> dict[int, str]:
        """Client id -> kind of the clients that attack their update."""
        return {k: v for k, v in self.attack.items() if not is_data_attack(v)}


def contamination_plan(
    num_clients: int, fraction: float, mix: Mapping[str, float], seed: int
) -> Contamination:
    """The contaminated clients of a trial and their attacks (the one rule every workload uses).

    Args:
        num_clients: K.
        fraction: ``contamination.fraction``.
        mix: ``contamination.mix`` (zero weights ignored).
        seed: The trial's selection seed (``seeds.SELECT`` stream).

    Returns:
        The plan.
    """
    bad = select_contaminated(num_clients, fraction, seed)
    weights = {k: float(v) for k, v in mix.items() if v > 0}
    attack = assign_attacks(bad, weights, seed) if bad else {}
    return Contamination(contaminated=sorted(bad), attack=attack)
