"""Bad input fails early with the argument and value named; non-finite clients are flagged, not fed in."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import clair_ray
from clair_ray.clair.metrics import subspace_error
from clair_ray.clair.synthetic import lora_factors, make_instance


@pytest.fixture(scope="module")
def inst():
    return make_instance(20, 10, 4, 2, fraction=0.2, seed=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"rank: must be a positive integer, got 0"),
        ({"rank": 10}, r"rank: 10 is too large: it must be smaller than p=10"),
        ({"rank": 2.5}, r"rank: must be a positive integer, got 2.5"),
        ({"rank": 2, "lam": -1.0}, r"lam: must be >= 0, got -1.0"),
        ({"rank": 2, "tau": -0.5}, r"tau: must be >= 0, got -0.5"),
        ({"rank": 2, "tau": math.nan}, r"tau: must be a finite number"),
        ({"rank": 2, "solver": "magic"}, r"solver: must be one of .* got 'magic'"),
        ({"rank": 2, "side": "left"}, r"side: must be one of .* got 'left'"),
        ({"rank": 2, "mad_k": 0}, r"mad_k: must be > 0, got 0"),
        ({"rank": 2, "noise_scale": [1.0] * 3}, r"noise_scale: must be 20 positive finite numbers"),
    ],
)
def test_bad_arguments(inst, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        clair_ray.clair(inst.estimates, **kwargs)


def test_bad_updates() -> None:
    with pytest.raises(ValueError, match=r"updates: empty"):
        clair_ray.clair([])
    with pytest.raises(ValueError, match=r"updates: K=1 client; CLAIR needs at least 2"):
        clair_ray.clair([torch.zeros(3, 2)])
    with pytest.raises(
        ValueError, match=r"updates\[1\]: shape \(3, 3\) differs from updates\[0\]'s \(3, 2\)"
    ):
        clair_ray.clair([torch.zeros(3, 2), torch.zeros(3, 3)])
    with pytest.raises(ValueError, match=r"a stacked tensor must be \(K, p, q\)"):
        clair_ray.clair(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"updates\[1\]: B @ A has shape \(5, 3\), client 0 has \(4, 3\)"):
        clair_ray.clair([(torch.zeros(4, 2), torch.zeros(2, 3)), (torch.zeros(5, 2), torch.zeros(2, 3))])
    with pytest.raises(ValueError, match=r"updates\[0\]: factors must be B \(p, r'\) and A \(r', q\)"):
        clair_ray.clair([(torch.zeros(4, 2), torch.zeros(3, 3)), (torch.zeros(4, 2), torch.zeros(2, 3))])
    with pytest.raises(ValueError, match=r"mixes factor pairs and dense blocks"):
        clair_ray.clair([torch.zeros(4, 3), (torch.zeros(4, 2), torch.zeros(2, 3))])
    with pytest.raises(ValueError, match=r"updates: got None"):
        clair_ray.clair(None)


def test_bad_offset_rank(inst) -> None:
    with pytest.raises(ValueError, match=r"offset_rank: must be a positive integer, got 0"):
        clair_ray.clair(lora_factors(inst, 4), rank=2, offset=True, offset_rank=0)


def test_rank_larger_than_the_columns(inst) -> None:
    pairs = [
        (torch.randn(10, 1, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)) for _ in range(3)
    ]
    with pytest.raises(ValueError, match=r"rank: 5 exceeds the 3 columns"):
        clair_ray.clair(pairs, rank=5)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_client_is_flagged_and_kept_out(inst, bad: float) -> None:
    updates = inst.estimates.clone()
    updates[5, 1, 1] = bad
    clean = clair_ray.clair(inst.estimates, rank=2)
    res = clair_ray.clair(updates, rank=2)
    assert 5 in res.contaminated and res.reasons[5].startswith("non-finite")
    assert math.isinf(float(res.scores[5]))
    # Everyone else is processed as before (client 5 was honest here).
    assert 5 not in inst.contaminated
    assert sorted(set(res.contaminated) - {5}) == clean.contaminated
    assert subspace_error(res.subspace, inst.subspace) < 1e-6
    assert torch.isfinite(torch.stack([res.refined[k] for k in res.honest])).all()
    assert torch.equal(res.refined[5].nan_to_num(), updates[5].nan_to_num())


def test_nonfinite_factor_client_is_flagged(inst) -> None:
    pairs = lora_factors(inst, 4)
    pairs[2] = (pairs[2][0] * math.nan, pairs[2][1])
    res = clair_ray.clair(pairs, rank=2)
    assert 2 in res.contaminated and res.reasons[2].startswith("non-finite")


def test_too_few_finite_clients() -> None:
    updates = [torch.full((4, 2), math.nan), torch.full((4, 2), math.nan), torch.ones(4, 2)]
    with pytest.raises(ValueError, match=r"only 1 of 3 client updates are finite"):
        clair_ray.clair(updates, rank=1)


def test_numpy_and_list_inputs_match_tensor_input(inst) -> None:
    a = clair_ray.clair(inst.estimates, rank=2)
    b = clair_ray.clair([m.numpy() for m in inst.estimates], rank=2)
    c = clair_ray.clair(np.asarray(inst.estimates), rank=2)
    assert a.contaminated == b.contaminated == c.contaminated
    torch.testing.assert_close(a.scores, b.scores)


def test_given_lam_and_tau_solve_p1_as_written(inst) -> None:
    res = clair_ray.clair(inst.estimates, rank=2, lam=0.5, tau=0.1, solver="admm")
    assert res.info["problem"] == "P1" and res.info["lam"] == 0.5 and res.info["tau"] == 0.1
    res0 = clair_ray.clair(inst.estimates, rank=2, lam=0.5, tau=0.0)
    assert res0.info["problem"] == "P0"
