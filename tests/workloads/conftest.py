"""Fixtures for the workload tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from clair_ray.clair.ops import limit_threads

# The tiny-model modules (by name prefix) that need one thread; the others keep torch's default.
ONE_THREAD_MODULES = ("test_copy_task", "test_lora", "test_hf_causal_lm")


@pytest.fixture(autouse=True, scope="module")
def one_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription stalls.

    Measured: one copy-task test took 20 s instead of 0.2 s with torch's default thread pool.
    """
    with limit_threads(request.module.__name__.rsplit(".", 1)[-1].startswith(ONE_THREAD_MODULES)):
        yield


@pytest.fixture(scope="session")
def copy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy-task base cache for the whole session (the small base trains in a few seconds)."""
    return tmp_path_factory.mktemp("copy-cache")
