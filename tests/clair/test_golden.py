"""Golden test: a fixed-seed tiny run compared with stored numbers (tests/clair/golden.json).

Regenerate after an intended change with ``python tests/clair/test_golden.py`` and review the diff.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import clair_ray
from clair_ray.clair.metrics import client_errors, mean_error, subspace_error
from clair_ray.clair.synthetic import make_regression

GOLDEN = Path(__file__).with_name("golden.json")


def _run() -> dict:
    inst = make_regression(
        24, 10, 4, 2, samples=[30 + 5 * (k % 4) for k in range(24)], fraction=0.25, sigma=0.2, seed=123,
        kinds=("dense_noise", "other_subspace", "partial"),
    )  # fmt: skip
    res = clair_ray.clair(inst.estimates, rank=2, noise_scale=inst.noise_scale)
    return {
        "contaminated": res.contaminated,
        "scores": [round(float(s), 8) for s in res.scores],
        "lam": res.info["lam"],
        "tau": res.info["tau"],
        "subspace_error": subspace_error(res.subspace, inst.subspace),
        "honest_error": mean_error(client_errors(res.refined, inst.truth), inst.honest),
        "refine_rank": res.info["refine"]["column"]["rank"],
    }


def test_golden_run() -> None:
    want = json.loads(GOLDEN.read_text())
    got = _run()
    assert got["contaminated"] == want["contaminated"]
    assert got["scores"] == pytest.approx(want["scores"], rel=1e-5, abs=1e-8)
    for key in ("lam", "tau", "subspace_error", "honest_error"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["refine_rank"] == want["refine_rank"]


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(_run(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
