"""The linear workload's acceptance figure on configs/linear.yaml, without Ray (the engine's functions).

On 5 trials: CLAIR's honest-client mean error is below local, fedavg and every robust baseline, and its
detection F1 against the truth ("energy outside U above the noise level") is at least 0.95.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from round_helpers import flat, one_round

from clair_ray.config import load_config
from clair_ray.results import detection_scores
from clair_ray.workloads import get_workload

LINEAR = Path(__file__).resolve().parents[2] / "configs" / "linear.yaml"


@pytest.mark.slow
def test_linear_yaml_acceptance() -> None:
    torch.set_num_threads(1)
    cfg = load_config(LINEAR, ["trials=5"])
    wl = get_workload(cfg)
    K = cfg.workload.num_clients
    for trial in range(cfg.trials):
        metas = flat(one_round(wl, trial))
        honest = np.ones(K, bool)
        honest[wl.contamination(trial).contaminated] = False
        err = {m: float(v["error"][honest].mean()) for m, v in metas.items()}
        for rival in ("local", "fedavg", "median", "trimmed_mean", "multi_krum", "geometric_median"):
            assert err["clair"] < err[rival], (trial, err)
        _, _, f1 = detection_scores(metas["clair"]["flagged"], metas["clair"]["detectable"])
        assert f1 >= 0.95, (trial, f1)
