"""``aggregation.refine: heldout``: the candidate grid, the choice and the refinement it yields (no model)."""

from __future__ import annotations

import numpy as np
import pytest
from lora_helpers import factor_instance as _instance
from lora_helpers import module_updates as _ups

from clair_ray.clair import heldout
from clair_ray.workloads.lora.methods import project, run_method

KW = dict(rank=2, side="both", clair_mode="factors", params={}, n_attackers=3, seed=0)


def test_grid_runs_from_the_mean_to_local_training() -> None:
    cands = heldout.candidates()
    assert cands[0] == heldout.Candidate(0, 0.0)  # the detected-honest mean, the paired reference
    assert heldout.Candidate(None, 1.0) in cands  # the client's own update
    assert len(set(cands)) == len(cands) == 1 + len(heldout.RANKS) * len(heldout.SHRINKS)
    assert heldout.TOP_RANK == 4


def test_choose_takes_the_smallest_median_paired_gain() -> None:
    # Client 2 finds its rows hard under every candidate: paired differences cancel that.
    losses = np.array([[1.0, 1.0, 9.0], [0.9, 0.8, 8.9], [0.5, 2.0, 9.5]])  # (C=3, H=3)
    assert heldout.choose(losses) == 1  # medians of gains: 0, -0.1, +0.5
    # A minority of clients (an attacker's corrupted rows, or a lie) cannot flip the median.
    five = np.array([[1.0] * 5, [0.9] * 5, [1.5] * 5])
    five[2, 4] = -100.0
    assert heldout.choose(five) == 1
    # Ties go to the less personal (earlier) candidate; a client without a finite loss is left out.
    assert heldout.choose(np.array([[1.0, 1.0], [1.0, 1.0]])) == 0
    assert heldout.choose(np.array([[1.0, np.nan], [0.5, 0.1]])) == 1
    # A median gain within 2 standard errors of zero is chance: the mean stays.
    noisy = np.array([[1.0] * 6, [1.0 - 0.01, 1.5, 0.5, 1.4, 0.6, 1.0 - 0.02]])
    assert np.median(noisy[1] - noisy[0]) < 0 and heldout.choose(noisy) == 0
    assert heldout.choose(noisy, margin=0.0) == 1
    with pytest.raises(ValueError, match="no detected-honest client"):
        heldout.choose(np.full((2, 3), np.nan))


def test_truncate_keeps_leading_directions_or_none() -> None:
    u, v = np.eye(6)[:, :4], np.eye(5)[:, :4]
    bases = {"m": (u, v), "c": (u, None)}
    two = heldout.truncate(bases, heldout.Candidate(2, 0.5))
    assert two["m"][0].shape == (6, 2) and two["m"][1].shape == (5, 2) and two["c"][1] is None
    assert heldout.truncate(bases, heldout.Candidate(None, 1.0)) == {"m": (None, None), "c": (None, None)}
    got = heldout.summary(bases, heldout.Candidate(None, 0.5), {"m": (6, 5), "c": (6, 5)})
    assert got == {"m": {"column": {"rank": 6, "shrink": 0.5}, "row": {"rank": 5, "shrink": 0.5}},
                   "c": {"column": {"rank": 6, "shrink": 0.5}}}  # fmt: skip


def test_project_shrinks_the_projected_deviation() -> None:
    own = _instance(K=5, bad=0)
    ups = _ups(own)
    rng = np.random.default_rng(3)
    u = np.linalg.qr(rng.normal(size=(24, 2)))[0]
    keep = list(range(5))
    corr, adapters = project(ups, keep, [1], {"m1": (u, None), "m2": (None, None)}, shrink=0.25)
    m1, m2 = ups.mean("m1", keep), ups.mean("m2", keep)
    d1 = own[1]["m1"][0] @ own[1]["m1"][1]
    d2 = own[1]["m2"][0] @ own[1]["m2"][1]
    a1, a2 = adapters[1]["m1"], adapters[1]["m2"]
    np.testing.assert_allclose(corr["m1"] + a1[0] @ a1[1], m1 + 0.25 * u @ u.T @ (d1 - m1), atol=1e-10)
    np.testing.assert_allclose(corr["m2"] + a2[0] @ a2[1], 0.75 * m2 + 0.25 * d2, atol=1e-10)


@pytest.mark.parametrize("method", ["clair", "oracle"])
def test_heldout_refinement_applies_the_judged_candidate(method: str) -> None:
    own = _instance()
    ups = _ups(own)
    K, honest = len(own), list(range(3, len(own)))
    cands = heldout.candidates()
    seen: dict[str, object] = {}

    def judge(pick: heldout.Candidate):
        def validate(clients, n, make):
            seen.update(clients=list(clients), n=n)
            corr, adapters = make(cands.index(pick))
            assert set(adapters) == set(clients)  # every judged client gets its candidate model
            return cands.index(pick)

        return validate

    choices: dict = {}
    corr, adapters, _, _ = run_method(
        method, ups, own, own, list(range(K)), honest, **KW, refine="heldout", choices=choices,
        validate=judge(heldout.Candidate(None, 1.0)),
    )  # fmt: skip
    assert seen["clients"] == honest and seen["n"] == len(cands)  # CLAIR flags exactly the 3 attackers
    for k in honest:  # (None, 1): local training, whatever the mean
        for n in ("m1", "m2"):
            got = corr[n] + adapters[k][n][0] @ adapters[k][n][1]
            np.testing.assert_allclose(got, own[k][n][0] @ own[k][n][1], atol=1e-10)
    assert choices["m1"]["column"] == {"rank": 24, "shrink": 1.0}
    corr, adapters, _, _ = run_method(
        method, ups, own, own, list(range(K)), honest, **KW, refine="heldout", choices=choices,
        validate=judge(heldout.Candidate(0, 0.0)),
    )  # fmt: skip
    for k in honest:  # the mean: every adapter's product is 0
        np.testing.assert_allclose(corr["m1"], ups.mean("m1", honest), atol=1e-10)
        assert np.abs(adapters[k]["m1"][0] @ adapters[k]["m1"][1]).max() == 0
    assert choices["m2"]["row"] == {"rank": 0, "shrink": 0.0}


def test_heldout_without_held_back_rows_is_refused() -> None:
    own = _instance()
    with pytest.raises(ValueError, match="workload.lora.holdout > 0"):
        run_method("clair", _ups(own), own, own, list(range(12)), list(range(3, 12)), **KW, refine="heldout")
