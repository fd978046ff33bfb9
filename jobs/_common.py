"""Shared start-up of the job entry points (not a job itself)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare() -> None:
    """Makes the submitted working directory's ``clair_ray`` the one imported, and sets Ray's env defaults.

    ``python jobs/x.py`` puts ``jobs/`` first on ``sys.path``, not the working directory, so without this an
    installed copy of the package (or none) would run instead of the code that was submitted.
    """
    sys.path.insert(0, str(ROOT))
    # Inside a job, RAY_ADDRESS is set by the job server: the engine then calls ray.init() without local
    # resource options (the cluster's own resources apply); these only silence Tune and keep trial paths
    # stable.
    for key, value in (
        ("RAY_CHDIR_TO_TRIAL_DIR", "0"),
        ("RAY_AIR_NEW_OUTPUT", "0"),
        ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"),
        ("RAY_USAGE_STATS_ENABLED", "0"),
    ):
        os.environ.setdefault(key, value)
