"""The three SmolLM2-on-Shakespeare configs, end to end on the session's 2-CPU Ray with tiny overrides: the
real model (converted once into $CLAIR_CACHE) and the real plays, natural clients, a boosted backdoor with
its ASR, rounds with sampling, and the GPU config run on CPU (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clair_ray.config import load_config

REPO = Path(__file__).resolve().parents[3]
TINY = [
    "trials=1",
    "workload.num_clients=4",
    "workload.max_client_samples=8",
    "workload.min_size=8",
    "workload.lora.steps=2",
    "workload.lora.batch=2",
    "contamination.fraction=0.25",
    "engine.batch_size=2",
]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize(
    ("name", "extra"),
    [
        (
            "shakespeare_smollm2",
            ["workload.lora.early_steps=1", "aggregation.methods=[clair,fedavg,local_early]"],
        ),
        (
            "shakespeare_smollm2_rounds",
            [
                "workload.rounds=2",
                "workload.clients_per_round=3",
                "aggregation.methods=[clair,fedavg,median]",
            ],
        ),
        (
            "shakespeare_smollm2_gpu",  # on CPU: float32, every layer, no GPU reserved
            [
                "workload.lora.device=cpu",
                "engine.actor_num_gpus=0",
                "engine.num_actors=2",
                "engine.actor_num_cpus=0.75",
                "engine.aggregator_num_cpus=0.5",
                "ray.num_cpus=2",
                "workload.lora.early_steps=1",
                "aggregation.methods=[clair,fedavg]",
                "aggregation.rank=2",
            ],
        ),
    ],
)
def test_shakespeare_config_runs_tiny(tmp_path: Path, name: str, extra: list[str]) -> None:
    from clair_ray.engine import run_experiment

    cfg = load_config(
        REPO / "configs" / f"{name}.yaml",
        [*TINY, *extra, f"output_dir={tmp_path / name}", "contamination.mix={data_backdoor: 1.0}"],
    )
    res = run_experiment(cfg)
    c = res.clients
    last = c[c["round"] == c["round"].max()]
    assert set(last.loc[last["contaminated"], "attack"]) == {"data_backdoor"}
    honest = last[~last["contaminated"] & last["test_loss"].notna()]
    assert len(honest) > 0 and np.isfinite(honest["test_loss"]).all()
    assert honest["test_loss"].between(1.0, 12.0).all()  # a pretrained LM's loss on Shakespeare lines
    assert honest["asr"].between(0, 1).all()  # the backdoor's probe ran on every evaluated honest client
    assert set(res.summary["method"]) == set(cfg.aggregation.methods)
