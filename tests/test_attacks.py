"""Tests for clair_ray.attacks: selection, mix assignment, each attack's defining property, data hook."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy.stats import norm as normal

from clair_ray import attacks
from clair_ray.attacks import (
    ATTACK_KINDS,
    DATA_ATTACK_KINDS,
    alie,
    alie_z,
    apply_update_attack,
    assign_attacks,
    corrupt_targets,
    gaussian_noise,
    in_subspace_attack,
    ipm,
    other_subspace,
    scaling,
    select_contaminated,
    sign_flip,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _low_rank_updates(h: int, p: int, q: int, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, p, q) honest updates U V_kᵀ sharing a random (p, r) orthonormal U."""
    g = _gen(seed)
    u, _ = torch.linalg.qr(torch.randn(p, r, generator=g, dtype=torch.float64))  # (p, r)
    v = torch.randn(h, q, r, generator=g, dtype=torch.float64)  # (H, q, r)
    return u @ v.transpose(1, 2), u  # (H, p, q), (p, r)


def _energy_outside(m: torch.Tensor, u: torch.Tensor) -> float:
    """Fraction of ||m||_F² outside span(u)."""
    off = m - u @ (u.T @ m)
    return float(off.norm() ** 2 / m.norm() ** 2)


# --- select_contaminated ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,frac,expected", [(50, 0.3, 15), (10, 0.25, 3), (10, 0.15, 2), (7, 0.0, 0), (7, 1.0, 7)]
)
def test_select_contaminated_count_sorted_in_range(k: int, frac: float, expected: int) -> None:
    ids = select_contaminated(k, frac, seed=3)
    assert len(ids) == expected  # half-up rounding: 2.5 -> 3, 1.5 -> 2
    assert ids == sorted(set(ids))
    assert all(0 <= i < k for i in ids)


def test_select_contaminated_seeded() -> None:
    assert select_contaminated(100, 0.3, 7) == select_contaminated(100, 0.3, 7)
    assert select_contaminated(100, 0.3, 7) != select_contaminated(100, 0.3, 8)


@pytest.mark.parametrize(
    "args,name",
    [((0, 0.3, 0), "num_clients"), ((10, 1.5, 0), "fraction"), ((10, -0.1, 0), "fraction"),
     ((10, float("nan"), 0), "fraction"), ((10, 0.3, -1), "seed"), ((True, 0.3, 0), "num_clients")],
)  # fmt: skip
def test_select_contaminated_bad_args_name_parameter(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        select_contaminated(*args)


# --- assign_attacks -----------------------------------------------------------------------------------


def test_assign_attacks_exact_largest_remainder_counts() -> None:
    ids = select_contaminated(50, 0.3, 0)  # 15 clients
    mix = {"sign_flip": 1, "alie": 1, "other_subspace": 1, "gaussian_noise": 1}  # quotas 3.75 each
    out = assign_attacks(ids, mix, seed=1)
    assert sorted(out) == ids
    counts = Counter(out.values())
    # 3 each, then the 3 leftovers go to the first kinds in ATTACK_KINDS order (equal remainders).
    assert counts == {"sign_flip": 4, "gaussian_noise": 4, "alie": 4, "other_subspace": 3}


def test_assign_attacks_uneven_weights() -> None:
    out = assign_attacks(list(range(10)), {"ipm": 0.55, "scaling": 0.25, "data_shuffle": 0.2}, seed=0)
    # quotas 5.5, 2.5, 2.0 -> floors 5, 2, 2 and one leftover; the largest remainders tie (0.5 each),
    # broken by canonical order: scaling comes before ipm in ATTACK_KINDS.
    assert Counter(out.values()) == {"ipm": 5, "scaling": 3, "data_shuffle": 2}


def test_assign_attacks_deterministic_and_order_independent() -> None:
    ids = [3, 17, 5, 40, 22, 9, 11]
    mix = {"sign_flip": 0.5, "ipm": 0.5}
    a = assign_attacks(ids, mix, seed=4)
    assert a == assign_attacks(ids, mix, seed=4)
    assert a == assign_attacks(list(reversed(ids)), {"ipm": 0.5, "sign_flip": 0.5}, seed=4)
    # Counts never depend on the seed; who gets what does (for some seed).
    assert all(Counter(assign_attacks(ids, mix, s).values()) == Counter(a.values()) for s in range(10))
    assert any(assign_attacks(ids, mix, s) != a for s in range(10))


def test_assign_attacks_bad_inputs() -> None:
    with pytest.raises(ValueError, match="valid kinds"):
        assign_attacks([0, 1], {"flip": 1.0}, 0)
    with pytest.raises(ValueError, match=r"mix\['alie'\]"):
        assign_attacks([0, 1], {"alie": -1.0}, 0)
    with pytest.raises(ValueError, match="positive weight"):
        assign_attacks([0, 1], {"alie": 0.0}, 0)
    with pytest.raises(ValueError, match="contaminated"):
        assign_attacks([1, 1], {"alie": 1.0}, 0)
    assert assign_attacks([], {"alie": 1.0}, 0) == {}


# --- update attacks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sign_flip_and_scaling(dtype: torch.dtype) -> None:
    m = torch.randn(6, 4, generator=_gen(), dtype=dtype)
    assert torch.equal(sign_flip(m), -m)
    assert torch.allclose(sign_flip(m, scale=3.0), -3.0 * m)
    assert torch.allclose(scaling(m, 10.0), 10.0 * m)
    assert sign_flip(m).dtype == dtype and scaling(m, 2.0).dtype == dtype
    with pytest.raises(ValueError, match="scale"):
        sign_flip(m, scale=0.0)
    with pytest.raises(ValueError, match="factor"):
        scaling(m, float("inf"))


def test_gaussian_noise_std_and_default_norm() -> None:
    m = torch.randn(200, 100, generator=_gen(1), dtype=torch.float64) * 5.0
    n = gaussian_noise(m, 2.0, _gen(2))
    assert n.shape == m.shape and n.dtype == m.dtype
    assert abs(float(n.std()) - 2.0) < 0.05
    auto = gaussian_noise(m, None, _gen(2))
    assert abs(float(auto.norm()) / float(m.norm()) - 1.0) < 0.02  # same energy as the update
    assert torch.equal(gaussian_noise(m, 2.0, _gen(2)), n)  # seeded
    assert abs(float((auto * m).sum()) / float(auto.norm() * m.norm())) < 0.05  # unrelated to the update


def test_alie_coordinate_rule_and_paper_z() -> None:
    honest, _ = _low_rank_updates(20, 8, 5, 2)
    out = alie(honest, z=1.5)
    mean, std = honest.mean(0), honest.std(0)
    assert torch.allclose(out, mean - 1.5 * std)
    # Coordinate-wise: every entry sits exactly 1.5 sample-stds below the honest mean.
    assert torch.allclose((mean - out) / std, torch.full_like(out, 1.5))
    # Paper formula: n = 50, f = 15 -> s = floor(26) - 15 = 11, z = Φ⁻¹(39/50).
    assert math.isclose(alie_z(50, 15), normal.ppf(39 / 50), rel_tol=1e-9)
    assert torch.allclose(alie(honest, num_clients=50, num_attackers=15), mean - normal.ppf(0.78) * std)
    with pytest.raises(ValueError, match="num_clients"):
        alie(honest)
    with pytest.raises(ValueError, match="num_attackers"):
        alie_z(10, 10)
    with pytest.raises(ValueError, match="honest_updates"):
        alie(honest[:1], z=1.0)


def test_ipm_negative_inner_product_with_honest_mean() -> None:
    honest, u = _low_rank_updates(10, 8, 5, 2)
    out = ipm(honest, eps=0.5)
    mean = honest.mean(0)
    assert torch.allclose(out, -0.5 * mean)
    assert float((out * mean).sum()) < 0
    assert math.isclose(float((out * mean).sum()), -0.5 * float(mean.norm()) ** 2, rel_tol=1e-12)
    assert _energy_outside(out, u) < 1e-20  # in-subspace: CLAIR cannot see it
    with pytest.raises(ValueError, match="eps"):
        ipm(honest, eps=-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_other_subspace_rank_norm_and_far_from_u(dtype: torch.dtype) -> None:
    _, u = _low_rank_updates(2, 64, 16, 4)
    m = other_subspace((64, 16), 4, 3.0, _gen(5), dtype=dtype)
    assert m.shape == (64, 16) and m.dtype == dtype
    assert int(torch.linalg.matrix_rank(m.double(), rtol=1e-5)) == 4  # rtol: float32 round-off
    assert math.isclose(float(m.norm()), 3.0, rel_tol=1e-5)
    assert _energy_outside(m.double(), u) > 0.7  # a random 4-dim subspace of R^64 is far from U
    m_avoid = other_subspace((64, 16), 4, 3.0, _gen(5), avoid=u, dtype=dtype)
    assert _energy_outside(m_avoid.double(), u) > 1 - 1e-6  # drawn in U's orthogonal complement
    assert torch.equal(other_subspace((64, 16), 4, 3.0, _gen(5), dtype=dtype), m)  # seeded
    with pytest.raises(ValueError, match="rank"):
        other_subspace((6, 4), 5, 1.0, _gen())
    with pytest.raises(ValueError, match="norm"):
        other_subspace((6, 4), 2, -1.0, _gen())


def test_in_subspace_attack() -> None:
    assert {k for k in ATTACK_KINDS if in_subspace_attack(k)} == {"sign_flip", "scaling", "ipm"}
    assert not any(in_subspace_attack(k) for k in DATA_ATTACK_KINDS)
    with pytest.raises(ValueError, match="valid kinds"):
        in_subspace_attack("nope")


def test_in_subspace_kinds_really_stay_in_u() -> None:
    """The classification matches what the attacks do to a low-rank honest round."""
    honest, u = _low_rank_updates(10, 32, 8, 3)
    own = honest[0]
    for kind in ATTACK_KINDS:
        params = {"other_subspace": {"rank": 3}, "alie": {"z": 1.0}}.get(kind, {})
        out = apply_update_attack(kind, own, honest, _gen(1), **params)
        outside = _energy_outside(out, u)
        assert (outside < 1e-20) == in_subspace_attack(kind), (kind, outside)


def test_apply_update_attack_dispatch_and_errors() -> None:
    honest, _ = _low_rank_updates(10, 8, 5, 2)
    own = honest[0].float()
    assert torch.equal(apply_update_attack("sign_flip", own, None, _gen()), -own)
    assert torch.allclose(apply_update_attack("scaling", own, None, _gen(), factor=-2.0), -2.0 * own)
    out = apply_update_attack("ipm", own, honest, _gen(), eps=2.0)
    assert out.dtype == torch.float32 and torch.allclose(out, (-2.0 * honest.mean(0)).float())
    out = apply_update_attack("alie", own, honest, _gen(), num_clients=14, num_attackers=4)
    assert torch.allclose(out, alie(honest.float(), alie_z(14, 4)))
    out = apply_update_attack("other_subspace", own, None, _gen(), rank=2)
    assert math.isclose(float(out.norm()), float(own.norm()), rel_tol=1e-5)  # default: own norm
    with pytest.raises(ValueError, match="valid kinds: sign_flip"):
        apply_update_attack("label_flip", own, honest, _gen())
    with pytest.raises(ValueError, match="factr"):
        apply_update_attack("scaling", own, None, _gen(), factr=2.0)
    with pytest.raises(ValueError, match="honest_updates"):
        apply_update_attack("alie", own, None, _gen(), z=1.0)
    with pytest.raises(ValueError, match="rank"):
        apply_update_attack("other_subspace", own, None, _gen())


# --- data contamination -------------------------------------------------------------------------------


def test_corrupt_targets_float() -> None:
    y = torch.randn(500, 3, generator=_gen(0), dtype=torch.float64) * 4.0 + 1.0
    rms = float(torch.sqrt((y**2).mean()))
    r = corrupt_targets("random", y, _gen(1))
    assert r.shape == y.shape and r.dtype == y.dtype
    assert abs(float(torch.sqrt((r**2).mean())) / rms - 1) < 0.1  # same scale ...
    assert abs(float(torch.corrcoef(torch.stack([r[:, 0], y[:, 0]]))[0, 1])) < 0.15  # ... no signal
    s = corrupt_targets("data_shuffle", y, _gen(1))  # the mix name works too
    assert not torch.equal(s, y)
    assert torch.equal(torch.sort(s, dim=0).values, torch.sort(y, dim=0).values)  # same rows, permuted
    assert set(map(tuple, s.tolist())) == set(map(tuple, y.tolist()))
    assert torch.allclose(corrupt_targets("shifted", y, _gen(), offset=2.5), y + 2.5)
    assert torch.allclose(corrupt_targets("shifted", y, _gen()), y + rms)
    shift = torch.tensor([1.0, 0.0, -1.0])
    assert torch.allclose(corrupt_targets("shifted", y, _gen(), offset=shift), y + shift.double())
    assert torch.equal(corrupt_targets("random", y, _gen(1)), r)  # seeded


def test_corrupt_targets_integer_labels_and_errors() -> None:
    y = torch.randint(0, 10, (100, 7), generator=_gen(0))
    r = corrupt_targets("random", y, _gen(1), num_classes=10)
    assert r.dtype == y.dtype and int(r.min()) >= 0 and int(r.max()) < 10
    assert torch.equal(corrupt_targets("shifted", y, _gen(), num_classes=10, offset=3), (y + 3) % 10)
    with pytest.raises(ValueError, match="num_classes"):
        corrupt_targets("random", y, _gen())
    with pytest.raises(ValueError, match="valid kinds: random, shuffle, shifted"):
        corrupt_targets("flip", y, _gen())
    with pytest.raises(ValueError, match="offset"):
        corrupt_targets("shuffle", y, _gen(), offset=1)


def test_public_names_exist() -> None:
    for name in attacks.__all__:
        assert hasattr(attacks, name), name
