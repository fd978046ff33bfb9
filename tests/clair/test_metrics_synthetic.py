"""Metrics and the synthetic generator: definitions checked on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from clair_ray.clair.metrics import client_errors, detection_metrics, mean_error, subspace_error
from clair_ray.clair.synthetic import lora_factors, make_instance, make_regression


def test_subspace_error_is_sin_theta() -> None:
    e1 = torch.eye(4, dtype=torch.float64)[:, :1]
    assert subspace_error(e1, e1) == 0.0
    e2 = torch.eye(4, dtype=torch.float64)[:, 1:2]
    assert subspace_error(e1, e2) == pytest.approx(math.sqrt(2))
    tilted = torch.tensor([[math.cos(0.1)], [math.sin(0.1)], [0.0], [0.0]], dtype=torch.float64)
    assert subspace_error(tilted, e1) == pytest.approx(math.sqrt(2) * math.sin(0.1))


def test_detection_metrics() -> None:
    m = detection_metrics([1, 2, 3], [2, 3, 4, 5])
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert detection_metrics([], [])["f1"] == 1.0
    assert detection_metrics([], [1])["recall"] == 0.0
    assert detection_metrics([1], [])["precision"] == 0.0


def test_client_errors_and_mean() -> None:
    a = [torch.zeros(2, 2), torch.ones(2, 2)]
    b = [torch.zeros(2, 2), torch.zeros(2, 2)]
    errs = client_errors(a, b)
    assert errs.tolist() == [0.0, 2.0]
    assert mean_error(errs, [1]) == 2.0


def test_instance_structure() -> None:
    inst = make_instance(20, 12, 4, 2, fraction=0.25, kinds=("sign_flip", "other_subspace"), seed=0)
    assert len(inst.contaminated) == 5
    u = inst.subspace
    torch.testing.assert_close(u.T @ u, torch.eye(2, dtype=torch.float64))
    for k in inst.honest:  # honest updates lie in U exactly
        assert float(torch.linalg.matrix_norm(inst.truth[k] - u @ u.T @ inst.truth[k])) < 1e-10
    for k in inst.contaminated:
        off = float(torch.linalg.matrix_norm(inst.truth[k] - u @ u.T @ inst.truth[k]))
        assert (off < 1e-10) == (inst.kinds[k] == "sign_flip")
    assert inst.detectable() == [k for k in inst.contaminated if inst.kinds[k] == "other_subspace"]
    # Seeded: the same seed gives the same instance.
    again = make_instance(20, 12, 4, 2, fraction=0.25, kinds=("sign_flip", "other_subspace"), seed=0)
    torch.testing.assert_close(again.estimates, inst.estimates)


def test_bad_generator_arguments() -> None:
    with pytest.raises(ValueError, match=r"kinds: unknown contamination kind 'bogus'"):
        make_instance(kinds=("bogus",))
    with pytest.raises(ValueError, match=r"fraction: must be in \[0, 0.5\), got 0.6"):
        make_instance(fraction=0.6)
    with pytest.raises(ValueError, match=r"samples: every n_k must be >= p=20"):
        make_regression(p=20, samples=10)


def test_regression_noise_scale_matches_ols_error() -> None:
    inst = make_regression(
        200, 8, 3, 2, samples=[12 + (k % 4) * 20 for k in range(200)], fraction=0.0, seed=1
    )
    err = torch.linalg.vector_norm(inst.estimates - inst.truth, dim=(1, 2))  # (K,)
    # E||E_k||^2 = sigma^2 q nu_k^2: the ratio averages to about 1 over many clients.
    ratio = (err**2 / (inst.sigma**2 * 3 * inst.noise_scale**2)).mean()
    assert 0.85 < float(ratio) < 1.15


def test_lora_factors_reproduce_updates() -> None:
    inst = make_instance(6, 10, 5, 2, fraction=0.0, seed=2)
    for (b, a), m in zip(lora_factors(inst, 5), inst.estimates, strict=True):
        torch.testing.assert_close(b @ a, m)
