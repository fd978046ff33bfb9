"""Ray Tune sweeps over experiment configs: ``clair-ray sweep CONFIG [key=value ...]``.

A sweep file is an experiment config (the same schema as ``clair-ray run``; ``base: other.yaml`` merges the
given keys onto another config file, resolved next to the sweep file) plus a ``sweep:`` section::

    base: linear_small.yaml
    workload: {num_clients: 12}
    sweep:
      name: small
      storage_path: results/sweeps
      num_samples: 1            # repeats of every grid point (random parameters are drawn per sample)
      max_failures: 1           # retries of a failing trial
      params:
        contamination.fraction: {grid: [0.1, 0.3]}
        workload.noise_std: {loguniform: [0.05, 0.5]}

Every trial runs one full simulation (:func:`clair_ray.engine.run_experiment`) on its own client and
aggregator actors. Tune reserves a placement group per trial with one bundle for the trial's driver and one
per actor; actors created inside the trial land in that group (Tune captures child tasks), so a trial
either gets all of its actors or does not start, trials never deadlock, and as many run at once as the
cluster has room for. Every trial's config is built and validated before Tune starts.

Faults: a failing trial is retried up to ``sweep.max_failures`` times and resumes from its engine
checkpoint. Ctrl+C lets Tune stop (running trials end, no new ones start) and the command exits 1;
``sweep.resume=true`` then restores the Tune experiment and runs what did not finish. A trial whose results
are complete on disk is never simulated again, even where Tune's saved state missed its end.

Output, all under ``sweep.storage_path``:

- ``<name>/``: Tune's experiment directory, one ``trial_<id>/`` per trial holding ``trial.json`` (its
  parameters), ``attempts.log`` (one line per execution) and ``run/`` (the engine's run directory; a
  retried attempt resumes from the engine's last checkpoint there);
- ``<name>-results/``: the gathered dataset: ``clients/``, ``summary/`` and ``detection/`` (Parquet, hive
  partitioned by ``sweep_trial``, the single-run schema plus one column per swept parameter, named by its
  dotted key), ``trials.parquet`` (one row per trial: status, attempts, error, parameters) and
  ``sweep.yaml`` (the resolved sweep). :func:`clair_ray.report.read_sweep` loads it.
"""

from __future__ import annotations

from clair_ray.sweep.spec import (
    ParamSpec,
    Sweep,
    SweepConfig,
    SweepError,
    candidate_points,
    load_sweep,
    trial_config,
)
from clair_ray.sweep.tune import bundles, gather, run_sweep

__all__ = [
    "ParamSpec",
    "Sweep",
    "SweepConfig",
    "SweepError",
    "bundles",
    "candidate_points",
    "gather",
    "load_sweep",
    "run_sweep",
    "trial_config",
]
