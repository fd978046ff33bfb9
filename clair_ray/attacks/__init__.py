"""Contamination: the attack registry, who is contaminated with what, and the attacks themselves.

Two families of contamination:

- **Update attacks** replace a contaminated client's update before it reaches the server
  (:mod:`clair_ray.attacks.update`: ``sign_flip``, ``gaussian_noise``, ``scaling``, ``alie``, ``ipm``,
  ``other_subspace``). ALIE and IPM are *omniscient*: they see the honest updates of the round.
- **Data attacks** corrupt a client's training data before it trains; in a mix they are named
  ``data_<kind>``. The generic target corruptions are in :mod:`clair_ray.attacks.data`; a workload may
  register kinds of its own (the copy task's ``data_reversed``, ``data_flip``) and implements every data
  kind it accepts (``Workload.data_attacks``).

Every kind is registered where it is defined, with :func:`register_attack`; the registry is the only list
of names (config validation reads it). A user's own attack is one decorated function in their own module,
loaded through the ``plugins`` config key::

    @register_attack("zero_update", defaults={"scale": 0.0})
    def zero_update(own, honest, generator, ctx, scale):
        return scale * own

Who is contaminated is a seeded rule (:func:`select_contaminated`), which attack each runs an exact,
stable split by the configured proportions (:func:`assign_attacks`); :func:`contamination_plan` does both
for one trial and is what every workload calls.

A subspace method such as CLAIR only sees energy *outside* the shared subspace U. A sign-flipped or scaled
honest update and IPM's negative mean lie inside U (``in_subspace=True``), so no subspace method can
detect them; judge those by the honest clients' error instead.

Everything here is pure torch / numpy: randomness comes only from the generator or seed passed in.
"""

from __future__ import annotations

from clair_ray.attacks.data import TARGET_CORRUPTIONS, corrupt_targets
from clair_ray.attacks.plan import (
    Contamination,
    assign_attacks,
    assumed_attackers,
    contamination_plan,
    select_contaminated,
)
from clair_ray.attacks.registry import (
    ATTACKS,
    AttackContext,
    AttackSpec,
    apply_update_attack,
    check_update,
    data_kinds,
    in_subspace_attack,
    is_data_attack,
    register_attack,
    update_kinds,
)

# The built-in kinds register themselves on import, update attacks first (the canonical order).
from clair_ray.attacks.update import alie, alie_z, gaussian_noise, ipm, other_subspace, scaling, sign_flip  # noqa: I001

__all__ = [
    "ATTACKS",
    "ATTACK_KINDS",
    "check_update",
    "DATA_ATTACK_KINDS",
    "IN_SUBSPACE_KINDS",
    "TARGET_CORRUPTIONS",
    "AttackContext",
    "AttackSpec",
    "Contamination",
    "alie",
    "alie_z",
    "apply_update_attack",
    "assign_attacks",
    "assumed_attackers",
    "contamination_plan",
    "corrupt_targets",
    "data_kinds",
    "gaussian_noise",
    "in_subspace_attack",
    "ipm",
    "is_data_attack",
    "other_subspace",
    "register_attack",
    "scaling",
    "select_contaminated",
    "sign_flip",
    "update_kinds",
]

#: The built-in update attacks (the registry holds these and any registered later).
ATTACK_KINDS: tuple[str, ...] = update_kinds()
#: The built-in data attacks: ``data_`` + a generic target corruption.
DATA_ATTACK_KINDS: tuple[str, ...] = data_kinds()
#: The built-in in-subspace kinds.
IN_SUBSPACE_KINDS: frozenset[str] = frozenset(k for k, s in ATTACKS.items() if s.in_subspace)
