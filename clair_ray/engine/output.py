"""What a run writes around its tables: the output directory's policy, package versions, TensorBoard."""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clair_ray import results
from clair_ray.engine.session import EngineError
from clair_ray.workloads.base import Column

__all__ = ["TensorBoard", "package_versions", "prepare_dir", "write_versions"]

#: The packages whose versions a run records (``versions.json``).
PACKAGES = ("clair-ray", "torch", "ray", "peft", "transformers", "numpy", "pyarrow", "pandas", "omegaconf")


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages results depend on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_versions(out_dir: Path) -> None:
    """Writes ``versions.json`` (:func:`package_versions`) into the run directory."""
    (out_dir / "versions.json").write_text(json.dumps(package_versions(), indent=1))


def prepare_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses a non-empty ``output_dir`` unless ``resume`` or ``overwrite`` (which empties it first).

    Raises:
        EngineError: The directory holds files and neither was given.
    """
    if not out.exists() or not any(out.iterdir()) or resume:
        return
    if not overwrite:
        raise EngineError(
            f"output_dir={str(out)!r} is not empty: pass resume=true to continue the run there, "
            "overwrite=true to replace it, or another output_dir"
        )
    for item in out.iterdir():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


class TensorBoard:
    """Each round's summary numbers per method as TensorBoard scalars (``trial<t>/<method>/<column>``).

    Args:
        logdir: Where the event files go (``output_dir/tensorboard``).
        columns: The workload's result columns.
    """

    SKIP = frozenset({"trial", "method", "round", "agg_s", "round_s"})

    def __init__(self, logdir: Path, columns: Sequence[Column]) -> None:
        from tensorboardX import SummaryWriter  # comes with ray[tune]; loaded only when asked for

        self.columns = tuple(columns)
        self.writer = SummaryWriter(str(logdir))

    def write(self, trial: int, round_: int, rows: list[dict[str, Any]], extras: dict) -> None:
        """Summarises one round's client rows and writes every finite number."""
        clients = results.table(rows, results.client_schema(self.columns)).to_pandas()
        summary, _ = results.summarize(clients, extras, self.columns)
        for row in summary:
            for col, value in row.items():
                if col not in self.SKIP and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"trial{trial}/{row['method']}/{col}", float(value), round_)
        self.writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file."""
        self.writer.close()
