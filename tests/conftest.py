"""Shared fixtures: one Ray instance for the whole session and small configs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clair_ray.config import ExperimentConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "configs" / "linear_small.yaml"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A session-scoped local Ray with 2 CPUs (engine runs reuse it and leave it running)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from clair_ray.engine.session import use_token_auth

    use_token_auth()  # the setting users get: Ray's token authentication, on by default

    # address="local": never join another `ray start` cluster on this machine (a leftover
    # /tmp/ray/ray_current_cluster otherwise makes num_cpus=2 raise).
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        object_store_memory=200 * 2**20,
    )
    yield
    ray.shutdown()


@pytest.fixture
def small_config(tmp_path: Path) -> Callable[..., ExperimentConfig]:
    """Factory: ``configs/linear_small.yaml`` with dotlist overrides, writing under ``tmp_path``."""

    def make(*overrides: str, out: str = "run") -> ExperimentConfig:
        return load_config(SMALL, [f"output_dir={tmp_path / out}", *overrides])

    return make
