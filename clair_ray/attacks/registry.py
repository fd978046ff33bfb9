"""The attack registry: every contamination kind by name, and the dispatcher of update attacks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

DATA_PREFIX = "data_"


@dataclass(frozen=True)
class AttackContext:
    """What an update attack may know about the round besides the updates (all from config or the run,
    never from a method's output).

    Attributes:
        num_clients: Clients in the round.
        num_attackers: Contaminated clients in the trial (what ALIE's z is computed from).
        rank: The workload's natural rank of an update (linear: the true shared rank; LoRA: the adapter
            rank), the default rank of ``other_subspace``.
    """

    num_clients: int = 0
    num_attackers: int = 0
    rank: int | None = None


#: An update attack: (own (p, q), honest (H, p, q) or None, generator, context, **params) -> (p, q).
UpdateAttackFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttackSpec:
    """One registered contamination kind.

    Attributes:
        kind: Its name in a mix (data attacks start with ``data_``).
        fn: Update attacks: the function; data attacks: None (the workload implements them).
        defaults: Parameter name -> default; ``contamination.params.<kind>`` may set exactly these.
        in_subspace: The result lies in the honest clients' subspace (no subspace method can see it).
        omniscient: The attack needs the round's honest updates.
        module: The module that registered it (kinds from outside the package order by name).
    """

    kind: str
    fn: UpdateAttackFn | None
    defaults: dict[str, Any] = field(default_factory=dict)
    in_subspace: bool = False
    omniscient: bool = False
    module: str = ""

    @property
    def is_data(self) -> bool:
        """Whether this kind corrupts data (else it replaces the update)."""
        return self.kind.startswith(DATA_PREFIX)


#: Kind -> spec, in registration order (the canonical order of :func:`assign_attacks`).
ATTACKS: dict[str, AttackSpec] = {}


def register_attack(
    kind: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    in_subspace: bool = False,
    omniscient: bool = False,
) -> Callable[[Any], Any]:
    """Registers an attack kind; used as a decorator on the function that implements it.

    Update attacks decorate ``fn(own, honest, generator, ctx, **params) -> (p, q) update``. Data attacks
    (``kind`` starting with ``data_``) are implemented by the workloads that list them in
    ``data_attacks``; decorate anything (the kind's documentation or corruption function) to register the
    name, or call ``register_attack("data_x")(None)``.

    Args:
        kind: The name used in ``contamination.mix`` and ``contamination.params``.
        defaults: Parameter name -> default value (the parameters the attack accepts).
        in_subspace: Whether the attacked update stays in the honest subspace.
        omniscient: Whether the attack reads the round's honest updates.

    Returns:
        The decorator (it returns the function unchanged).

    Raises:
        ValueError: ``kind`` is registered already by another function.
    """

    def deco(fn: Any) -> Any:
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"register_attack: kind must be a non-empty string, got {kind!r}")
        old = ATTACKS.get(kind)
        is_data = kind.startswith(DATA_PREFIX)
        spec = AttackSpec(
            kind=kind,
            fn=None if is_data else fn,
            defaults=dict(defaults or {}),
            in_subspace=in_subspace,
            omniscient=omniscient,
            module=str(getattr(fn, "__module__", "") or ""),
        )
        if old is not None and old != spec:
            # Re-importing the same module (a plugin imported twice) re-registers the same kind: allowed
            # only when nothing changes.
            if getattr(old.fn, "__qualname__", None) != getattr(spec.fn, "__qualname__", None):
                raise ValueError(f"register_attack: attack {kind!r} is registered already")
        ATTACKS[kind] = spec
        return fn

    return deco


def canonical_order() -> tuple[str, ...]:
    """Every registered kind in the order :func:`~clair_ray.attacks.plan.assign_attacks` breaks ties by: the
    package's own kinds in registration order (fixed by its imports), then every other kind by name, so the
    order is the same in every process whatever order plugins were imported in."""
    own = [k for k, s in ATTACKS.items() if s.module.startswith("clair_ray.")]
    return (*own, *sorted(k for k in ATTACKS if k not in own))


def update_kinds() -> tuple[str, ...]:
    """Registered update-attack kinds, in registration order."""
    return tuple(k for k, s in ATTACKS.items() if not s.is_data)


def data_kinds() -> tuple[str, ...]:
    """Registered data-attack kinds (``data_<kind>``), in registration order."""
    return tuple(k for k, s in ATTACKS.items() if s.is_data)


def is_data_attack(kind: str) -> bool:
    """Whether ``kind`` is a data attack (``data_<corruption>``) rather than an update attack."""
    return kind.startswith(DATA_PREFIX)


def in_subspace_attack(kind: str) -> bool:
    """Whether an attack's result lies inside the honest clients' shared subspace.

    sign_flip, scaling and ipm produce a multiple of an honest update or of the honest mean, so their
    column space is U: CLAIR (any subspace method) cannot see them. Data attacks change the local
    estimate through the client's data, which does not preserve U, so they count as visible.

    Raises:
        ValueError: On an unregistered kind.
    """
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack kind {kind!r}; valid kinds: {', '.join(ATTACKS)}")
    return ATTACKS[kind].in_subspace


# ---------------------------------------------------------------------------------------------------------
# Applying an update attack
# ---------------------------------------------------------------------------------------------------------


def apply_update_attack(
    kind: str,
    own_update: torch.Tensor,
    honest_updates: torch.Tensor | None,
    generator: torch.Generator,
    ctx: AttackContext | None = None,
    **params: object,
) -> torch.Tensor:
    """Applies one registered update attack: the dispatcher every workload calls for an attacker.

    Args:
        kind: A registered update-attack kind.
        own_update: (p, q) the attacker's own honest update (its shape, dtype and device set the result's).
        honest_updates: (H, p, q) the round's honest updates, for omniscient attacks; may be None otherwise.
        generator: Source of randomness.
        ctx: What the attacker knows about the round (client and attacker counts, the natural rank).
        **params: The kind's parameters (``contamination.params.<kind>``); unknown names are an error.

    Returns:
        (p, q) the update the attacker sends, same dtype and device as ``own_update``.

    Raises:
        ValueError: On an unknown kind (the message lists the valid ones), an unknown parameter, or missing
            ``honest_updates`` for an omniscient attack.
    """
    spec = ATTACKS.get(kind)
    if spec is None or spec.is_data:
        raise ValueError(f"unknown update attack kind {kind!r}; valid kinds: {', '.join(update_kinds())}")
    check_update("own_update", own_update, 2)
    extra = sorted(set(params) - set(spec.defaults))
    if extra:
        raise ValueError(
            f"unknown parameter(s) {extra} for attack {kind!r}; allowed: {sorted(spec.defaults)}"
        )
    honest = None
    if honest_updates is not None:
        check_update("honest_updates", honest_updates, 3)
        if tuple(honest_updates.shape[1:]) != tuple(own_update.shape):
            raise ValueError(
                f"honest_updates must be (H, {own_update.shape[0]}, {own_update.shape[1]}), "
                f"got {tuple(honest_updates.shape)}"
            )
        honest = honest_updates.to(dtype=own_update.dtype, device=own_update.device)  # (H, p, q)
    if spec.omniscient and honest is None:
        raise ValueError(f"attack {kind!r} is omniscient and needs honest_updates, got None")
    assert spec.fn is not None
    return spec.fn(own_update, honest, generator, ctx or AttackContext(), **{**spec.defaults, **params})


_FLOAT_DTYPES = (torch.float32, torch.float64)


def check_update(name: str, x: object, ndim: int) -> torch.Tensor:
    """Checks that ``x`` is a float32/float64 tensor with ``ndim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    return x
