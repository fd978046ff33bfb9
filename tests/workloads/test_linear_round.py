"""The aggregation step without Ray: attacks, exclusions, method invariances, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from round_helpers import flat, one_round

from clair_ray import attacks, seeds
from clair_ray.config import load_config
from clair_ray.workloads import get_workload

torch.set_num_threads(1)  # as in the actors: float results must not depend on thread scheduling

BASE = [
    "workload.num_clients=12",
    "workload.p=8",
    "workload.q=4",
    "workload.true_rank=2",
    "workload.n_min=16",
    "workload.n_median=40",
    "workload.noise_std=0.3",
    "contamination.fraction=0.25",
    "contamination.mix={gaussian_noise: 1.0, other_subspace: 1.0, ipm: 1.0}",
    "aggregation.rank=2",
]


def run(*extra: str, fail: tuple[int, ...] = (), nonfinite: tuple[int, ...] = ()):
    cfg = load_config(None, [*BASE, *extra])
    wl = get_workload(cfg)
    res = one_round(wl, fail=fail, nonfinite=nonfinite)
    return cfg, wl, flat(res), res.nexts


def test_clair_ignores_the_assumed_fraction_baselines_get() -> None:
    _, _, a, _ = run("aggregation.assumed_fraction=0.1")
    _, _, b, _ = run("aggregation.assumed_fraction=0.3")
    for key in ("flagged", "error", "reason"):
        assert np.array_equal(np.asarray(a["clair"][key]), np.asarray(b["clair"][key]))
    # ... while a baseline that uses it does change
    assert not np.array_equal(a["trimmed_mean"]["error"], b["trimmed_mean"]["error"])


def test_n_attackers_comes_from_config() -> None:
    cfg = load_config(None, [*BASE, "aggregation.assumed_fraction=0.2"])
    a = cfg.aggregation
    assert attacks.assumed_attackers(a.assumed_fraction, cfg.contamination.fraction, 12) == 2
    assert attacks.assumed_attackers(None, cfg.contamination.fraction, 12) == 3


def test_every_method_runs_and_clair_beats_local() -> None:
    _, wl, metas, nexts = run()
    honest = [k for k in range(12) if k not in wl.contamination(0).contaminated]
    assert set(metas) == {
        "clair",
        "fedavg",
        "local",
        "oracle",
        "median",
        "trimmed_mean",
        "multi_krum",
        "geometric_median",
    }
    assert metas["clair"]["error"][honest].mean() < metas["local"]["error"][honest].mean()
    assert metas["oracle"]["subspace_error"] < 1e-10
    assert all(v.shape == (12, 8, 4) and np.isfinite(v).all() for v in nexts.values())


def test_attacks_are_applied_and_deterministic() -> None:
    _, wl, a, _ = run()
    _, _, b, _ = run()
    prob = wl.contamination(0)
    k = next(c for c, kind in prob.attack.items() if kind == "gaussian_noise")
    assert a["local"]["update_norm"][k] == b["local"]["update_norm"][k]
    honest_norm = np.median(a["local"]["update_norm"][[c for c in range(12) if c not in prob.attack]])
    assert a["local"]["off_subspace"][k] > 3 * np.median(a["local"]["off_subspace"][:1])
    assert a["local"]["detectable"][k] and honest_norm > 0


def test_dropouts_and_non_finite_are_excluded() -> None:
    _, _, metas, nexts = run(fail=(1,), nonfinite=(4,))
    for m in metas.values():
        assert m["dropped"][1] and not m["flagged"][1] and np.isnan(m["error"][1])
        assert m["flagged"][4] and m["reason"][4] == "non-finite" and np.isnan(m["error"][4])
        others = [k for k in range(12) if k not in (1, 4)]
        assert np.isfinite(m["error"][others]).all()
    for nxt in nexts.values():  # no NaN leaks into the next round: those clients keep their start
        assert np.isfinite(nxt).all() and np.all(nxt[[1, 4]] == 0)


def test_seeds_are_addressed_not_sequential() -> None:
    a = seeds.derive_seed(0, seeds.TRAIN, 1, 2, 3)
    assert a == seeds.derive_seed(0, seeds.TRAIN, 1, 2, 3)
    others = {
        seeds.derive_seed(0, seeds.TRAIN, 1, 2, 4),
        seeds.derive_seed(0, seeds.ATTACK, 1, 2, 3),
        seeds.derive_seed(1, seeds.TRAIN, 1, 2, 3),
        seeds.derive_seed(0, seeds.TRAIN, 0, 2, 3),
    }
    assert a not in others and len(others) == 4
    assert 0 <= a < 2**63
    g1, g2 = seeds.torch_generator(a), seeds.torch_generator(a)
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))


@pytest.mark.parametrize("mode", ["inv_sqrt_n", "none"])
def test_noise_scale_options(mode: str) -> None:
    _, _, metas, _ = run(f"aggregation.noise_scale={mode}")
    assert np.isfinite(metas["clair"]["error"]).all()
