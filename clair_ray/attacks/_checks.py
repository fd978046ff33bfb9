"""Argument checks shared by the attack modules (each error names the parameter and the value)."""

from __future__ import annotations

import math

import numpy as np


def check_int(name: str, value: object, minimum: int) -> int:
    """Returns ``value`` as an int if it is an integer >= ``minimum``, else raises ValueError naming it."""
    # bool is an int subclass; True as a client count is always a config mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_real(name: str, value: object, *, positive: bool = False, nonnegative: bool = False) -> float:
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
