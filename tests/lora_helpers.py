"""Synthetic LoRA factor pairs for the per-module aggregation tests (no model, no Ray)."""

from __future__ import annotations

import numpy as np

from clair_ray.workloads.lora.methods import ModuleUpdates


def factor_instance(seed: int = 0, K: int = 12, out: int = 24, inn: int = 16, r: int = 4, bad: int = 3):
    """Honest clients share a column and a row subspace; ``bad`` clients send factors from other ones."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(out, 2)))[0]
    v = np.linalg.qr(rng.normal(size=(inn, 2)))[0]
    own = []
    for k in range(K):
        if k < bad:
            b, a = rng.normal(size=(out, r)), rng.normal(size=(r, inn))
        else:
            core = rng.normal(size=(2, 2)) + 3 * np.eye(2)
            b = np.concatenate([u @ core, 1e-3 * rng.normal(size=(out, r - 2))], axis=1)
            a = np.concatenate([v.T, 1e-3 * rng.normal(size=(r - 2, inn))], axis=0)
        own.append({"m1": (b, a), "m2": (2 * b, a)})
    return own


def module_updates(own: list) -> ModuleUpdates:
    return ModuleUpdates({n: [f[n] for f in own] for n in own[0]})
