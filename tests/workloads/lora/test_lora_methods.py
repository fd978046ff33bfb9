"""Per-module one-shot aggregation of LoRA factor pairs (pure compute, no model, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from lora_helpers import factor_instance as _instance
from lora_helpers import module_updates as _ups

from clair_ray.workloads.lora.methods import as_pair, project, run_method


def test_module_updates_agree_with_dense() -> None:
    own = _instance()
    ups = _ups(own)
    ids = [3, 5, 7]
    np.testing.assert_allclose(
        ups.mean("m1", ids), np.mean([own[k]["m1"][0] @ own[k]["m1"][1] for k in ids], 0)
    )
    dense_norms = [np.sqrt(sum(np.sum((b @ a) ** 2) for b, a in f.values())) for f in own]
    np.testing.assert_allclose(ups.norms(), dense_norms, rtol=1e-12)
    assert not ups._dense  # nothing above formed a dense stack
    np.testing.assert_allclose(ups.mean("m1", ids), ups.dense("m1")[ids].mean(0).numpy(), atol=1e-12)
    b, a = as_pair(ups.dense("m2")[0].numpy())
    np.testing.assert_allclose(b @ a, own[0]["m2"][0] @ own[0]["m2"][1], atol=1e-10)
    assert b.shape[1] == 4  # the numerical rank, not min(out, in)


def test_clair_on_factors_flags_the_other_subspaces_without_dense_updates() -> None:
    own = _instance()
    ups = _ups(own)
    K, honest = len(own), list(range(3, len(own)))
    kw = dict(rank=2, side="both", clair_mode="factors", params={}, n_attackers=3, seed=0)
    corr, adapters, flagged, why = run_method("clair", ups, own, own, list(range(K)), honest, **kw)
    assert flagged == [0, 1, 2] and all("residual" in why[k] or why[k] for k in flagged)
    for method in ("fedavg", "fedavg_honest", "local"):
        run_method(method, ups, own, own, list(range(K)), honest, **kw)
    assert not ups._dense  # CLAIR on factors, FedAvg, local: no client's dense update was formed
    assert set(corr) == {"m1", "m2"} and set(adapters) == set(honest)
    # The median needs the dense stack and builds it.
    run_method("median", ups, own, own, list(range(K)), honest, **kw)
    assert set(ups._dense) == {"m1", "m2"}


def test_project_is_mean_plus_projected_deviation() -> None:
    """correction + adapter = m + P_U (Δ_k − m) P_V; with no bases it is Δ_k itself."""
    own = _instance(K=5, bad=0)
    ups = _ups(own)
    rng = np.random.default_rng(1)
    u = np.linalg.qr(rng.normal(size=(24, 2)))[0]
    v = np.linalg.qr(rng.normal(size=(16, 3)))[0]
    keep = [0, 1, 2, 3, 4]
    corr, adapters = project(ups, keep, [0, 2], {"m1": (u, v), "m2": (None, None)})
    for k in (0, 2):
        m = ups.mean("m1", keep)
        delta = own[k]["m1"][0] @ own[k]["m1"][1]
        want = m + u @ u.T @ (delta - m) @ v @ v.T
        np.testing.assert_allclose(corr["m1"] + adapters[k]["m1"][0] @ adapters[k]["m1"][1], want, atol=1e-10)
        got = corr["m2"] + adapters[k]["m2"][0] @ adapters[k]["m2"][1]
        np.testing.assert_allclose(got, own[k]["m2"][0] @ own[k]["m2"][1], atol=1e-10)


def test_unknown_method_is_refused() -> None:
    own = _instance(K=4, bad=0)
    with pytest.raises(ValueError, match="'krum_plus' is not available"):
        run_method(
            "krum_plus",
            _ups(own),
            own,
            own,
            [0, 1, 2, 3],
            [0, 1, 2, 3],
            rank=2,
            side="both",
            clair_mode="factors",
            params={},
            n_attackers=0,
            seed=0,
        )
