"""Data contamination: the generic target corruptions, registered as the ``data_<kind>`` attacks.

A workload that accepts a data kind corrupts its own training data with it (the linear workload calls
:func:`corrupt_targets` on its (n, q) responses; the LoRA workloads on token labels).
"""

from __future__ import annotations

import torch

from clair_ray.attacks._checks import check_int, check_real
from clair_ray.attacks.registry import register_attack

#: Target corruptions understood by :func:`corrupt_targets`.
TARGET_CORRUPTIONS: tuple[str, ...] = ("random", "shuffle", "shifted")


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
        num_classes = check_int("num_classes", params.get("num_classes"), 1)
        if kind == "random":
            return torch.randint(0, num_classes, Y.shape, generator=generator, dtype=Y.dtype, device=Y.device)
        offset = check_int("offset", params.get("offset", 1), 0)
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
        offset = check_real("offset", offset)
    return Y + offset


_PARAMS = {"random": {"num_classes": None}, "shuffle": {}, "shifted": {"offset": None, "num_classes": None}}
for _kind in TARGET_CORRUPTIONS:
    register_attack(f"data_{_kind}", defaults=_PARAMS[_kind])(corrupt_targets)
