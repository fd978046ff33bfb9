"""Ray Tune sweeps: validation before anything starts, a 4-trial sweep with a retried failure on 2 CPUs, the
gathered Parquet dataset, and resuming an interrupted sweep without rerunning finished trials.

Trial executions are counted from ``attempts.log`` (one line per execution, written by the trainable).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from clair_ray import results
from clair_ray.config import ConfigError
from clair_ray.report import read_sweep
from clair_ray.results import PARTITION
from clair_ray.sweep import SweepError, bundles, candidate_points, load_sweep, run_sweep
from clair_ray.workloads import LinearWorkload

REPO = Path(__file__).resolve().parents[2]

# Per trial: 0.5 (driver) + 0.25 (client actor) + 0.25 (aggregator) = 1 CPU, so two trials fill the
# session's 2 CPUs. An actor that left its trial's placement group would find no free CPU and the run
# would time out (engine.call_timeout_s) instead of completing.
TINY = """
base: {small}
aggregation: {{methods: [clair, fedavg, local]}}
engine: {{num_actors: 1, actor_num_cpus: 0.25, aggregator_num_cpus: 0.25, call_timeout_s: 90.0}}
sweep:
  name: {name}
  storage_path: {store}
  driver_cpus: 0.5
  max_failures: 1
  params:
{params}
"""


def write_sweep(tmp: Path, name: str, params: str, **extra: str) -> Path:
    text = TINY.format(
        small=REPO / "configs" / "linear_small.yaml", name=name, store=tmp / "store", params=params
    )
    for k, v in extra.items():
        text = text.replace("  max_failures: 1\n", f"  max_failures: 1\n  {k}: {v}\n")
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def attempts(trial_dir: str | Path) -> list[str]:
    return (Path(trial_dir) / "attempts.log").read_text().splitlines()


# ---- validation (no Ray) ---------------------------------------------------------------------------------


def test_load_merges_base_and_validates_every_grid_point(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path,
        "v",
        "    contamination.fraction: {grid: [0.1, 0.3]}\n    workload.noise_std: {loguniform: [0.05, 0.5]}",
    )
    sw = load_sweep(path, ["workload.num_clients=14", "sweep.num_samples=2"])
    assert sw.base.workload.num_clients == 14 and sw.base.workload.p == 8  # linear_small + overrides
    assert sw.base.aggregation.methods == ["clair", "fedavg", "local"]
    assert sw.sweep.num_samples == 2 and Path(sw.sweep.storage_path).is_absolute()
    points = candidate_points(sw.sweep)
    assert {p["contamination.fraction"] for p in points} == {0.1, 0.3}
    assert {p["workload.noise_std"] for p in points} == {0.05, 0.5}
    assert bundles(sw.base, 0.5) == [{"CPU": 0.5}, {"CPU": 0.25}, {"CPU": 0.25}]
    assert sw.results_dir == sw.experiment_dir.parent / "v-results"
    other = load_sweep(path, [f"base={REPO / 'configs' / 'linear.yaml'}"])  # base=FILE swaps the base
    assert (other.base.workload.p, other.base.aggregation.methods) == (64, ["clair", "fedavg", "local"])
    # A parameter's dotted name is one key: overriding it replaces the file's spec, others stay.
    over = load_sweep(path, ["sweep.params.workload.noise_std={grid: [0.2]}"])
    assert {p["workload.noise_std"] for p in candidate_points(over.sweep)} == {0.2}
    assert "contamination.fraction" in over.sweep.params
    with pytest.raises(ConfigError, match="expected sweep.params.KEY"):
        load_sweep(path, ["sweep.params.seed=3"])


@pytest.mark.parametrize(
    ("params", "extra", "needle"),
    [
        (
            "    contamination.fraction: {grid: [0.1, 1.5]}",
            {},
            "contamination.fraction=1.5: must be in [0, 1)",
        ),
        ("    workload.nosuch: {grid: [1, 2]}", {}, "workload.nosuch"),
        ("    workload.p: {grid: [abc]}", {}, "workload.p"),
        ("    seed: {grid: [1], choice: [2]}", {}, "sweep.params.seed: give exactly one of"),
        (
            "    workload.noise_std: {loguniform: [0.0, 1.0]}",
            {},
            "sweep.params.workload.noise_std.loguniform",
        ),
        ("    workload.noise_std: {uniform: [1.0]}", {}, "must be [low, high]"),
        ("    output_dir: {grid: [a, b]}", {}, "output_dir cannot be swept"),
        ("    seed: {grid: [0, 1]}", {"num_samples": "0"}, "sweep.num_samples=0"),
        ("    seed: {grid: [0, 1]}", {"colour": "blue"}, "sweep.colour"),
    ],
)
def test_bad_sweeps_fail_before_anything_runs(tmp_path: Path, params: str, extra: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_sweep(write_sweep(tmp_path, "bad", params, **extra))
    assert needle in str(err.value)


def test_lists_can_be_swept_and_are_stored_as_json(tmp_path: Path) -> None:
    from clair_ray.results import column_value as _column_value
    from clair_ray.sweep.spec import _column_type

    sw = load_sweep(write_sweep(tmp_path, "m", "    aggregation.methods: {grid: [[clair, fedavg], [local]]}"))
    spec = sw.sweep.params["aggregation.methods"]
    assert [p["aggregation.methods"] for p in candidate_points(sw.sweep)] == [["clair", "fedavg"], ["local"]]
    assert _column_value(["local"], _column_type(spec)) == '["local"]'


def test_existing_experiment_needs_resume(tmp_path: Path) -> None:
    sw = load_sweep(write_sweep(tmp_path, "again", "    seed: {grid: [0, 1]}"))
    sw.experiment_dir.mkdir(parents=True)
    with pytest.raises(SweepError, match="sweep.resume=true"):
        run_sweep(sw)
    with pytest.raises(ConfigError, match="sweep.overwrite=true: cannot be combined with sweep.resume=true"):
        load_sweep(
            write_sweep(tmp_path, "again", "    seed: {grid: [0, 1]}"),
            ["sweep.resume=true", "sweep.overwrite=true"],
        )


class _Plant:
    """A crafted pickle: unpickling it writes a marker file (stands in for os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.usefixtures("ray_session")
def test_a_crafted_tuner_pickle_is_refused_without_being_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle

    sw = load_sweep(write_sweep(tmp_path, "crafted", "    seed: {grid: [0, 1]}"), ["sweep.resume=true"])
    sw.experiment_dir.mkdir(parents=True)
    sw.experiment_dir.chmod(0o700)
    marker = tmp_path / "planted"
    pkl = sw.experiment_dir / "tuner.pkl"
    pkl.write_bytes(pickle.dumps(_Plant(marker)))
    pkl.chmod(0o666)  # another user could have written it
    with pytest.raises(SweepError, match="tuner.pkl is writable by other users"):
        run_sweep(sw)
    pkl.chmod(0o644)
    state = sw.experiment_dir / "experiment_state-x.json"  # Tune cloudpickles blobs inside it too
    state.write_text("{}")
    state.chmod(0o646)
    with pytest.raises(SweepError, match="experiment_state-x.json is writable by other users"):
        run_sweep(sw)
    state.chmod(0o644)
    monkeypatch.setattr(os, "getuid", lambda: os.geteuid() + 1)  # as if another user owned the files
    with pytest.raises(SweepError, match="owned by another user"):
        run_sweep(sw)
    assert not marker.exists()


# ---- with Ray --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_four_trials_on_two_cpus_with_a_retried_failure(tmp_path: Path) -> None:
    # engine.debug_stop_after_round=0 makes a trial's first execution crash right after its checkpoint;
    # the retry resumes from that checkpoint and completes, so it must give the same numbers as the trial
    # with the same fraction that never failed.
    path = write_sweep(
        tmp_path,
        "four",
        "    contamination.fraction: {grid: [0.1, 0.3]}\n"
        "    engine.debug_stop_after_round: {grid: [null, 0]}",
    )
    lines: list[str] = []
    out = run_sweep(load_sweep(path), progress=lines.append)
    assert out == tmp_path / "store" / "four-results"
    data = read_sweep(out)
    trials = data["trials"]
    assert len(trials) == 4 and (trials["status"] == "complete").all()
    crashing = trials["engine.debug_stop_after_round"] == "0"
    assert [len(attempts(d)) for d in trials[crashing]["trial_dir"]] == [2, 2], "failed once, retried once"
    assert [len(attempts(d)) for d in trials[~crashing]["trial_dir"]] == [1, 1]
    assert any(line.split()[2] == "retry" for line in lines), lines
    assert sum(" done " in line for line in lines) == 4

    # two trials ran at once: the executions' start times interleave with the trials' durations
    starts = sorted(float(attempts(d)[0].split()[0]) for d in trials["trial_dir"])
    assert starts[1] - starts[0] < 10, f"trials did not overlap: {starts}"

    # one dataset: the single-run schema + the swept parameters + the partition column, 4 partitions
    cols = LinearWorkload.columns  # the single-run schema of this sweep's workload
    for name, schema in (
        ("clients", results.client_schema(cols)),
        ("summary", results.summary_schema(cols)),
        ("detection", results.DETECTION_SCHEMA),
    ):
        df = data[name]
        assert list(df.columns) == [
            *schema.names,
            "contamination.fraction",
            "engine.debug_stop_after_round",
            PARTITION,
        ]
        assert df[PARTITION].nunique() == 4
        assert len(list((out / name).glob(f"{PARTITION}=*/part-0.parquet"))) == 4
    clients = data["clients"]
    for _, t in trials.iterrows():
        mine = clients[clients[PARTITION] == t[PARTITION]]
        own = pq.read_table(Path(t["trial_dir"]) / "run" / "clients.parquet").to_pandas()
        assert len(mine) == len(own) == 12 * 3
        assert (mine["contamination.fraction"] == t["contamination.fraction"]).all()

    # the retried trial reproduces the clean one (timing columns aside)
    stable = [c for c in data["summary"].columns if c not in (*results.NONDETERMINISTIC_COLUMNS, PARTITION)]
    s = data["summary"]
    for frac in (0.1, 0.3):
        a = s[(s["contamination.fraction"] == frac) & (s["engine.debug_stop_after_round"] == "null")]
        b = s[(s["contamination.fraction"] == frac) & (s["engine.debug_stop_after_round"] == "0")]
        cols = [c for c in stable if c != "engine.debug_stop_after_round"]
        pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path: Path) -> None:
    # The sweep runs one trial at a time in a child process that gets Ctrl+C (SIGINT) while its first trial
    # runs, as a user would interrupt it. Tune lets a running function trial finish and starts no other,
    # so one trial is finished and one never ran.
    path = write_sweep(
        tmp_path, "resume", "    contamination.fraction: {grid: [0.1, 0.3]}", max_concurrent_trials="1"
    )
    exp = tmp_path / "store" / "resume"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "child.log").open("w")
    child = subprocess.Popen(
        [sys.executable, "-m", "clair_ray.cli", "sweep", str(path)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and child.poll() is None and not list(exp.glob("*/attempts.log")):
            time.sleep(0.2)
        assert child.poll() is None, "the sweep ended before it could be interrupted"
        child.send_signal(signal.SIGINT)
        rc = child.wait(timeout=180)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()
    text = (tmp_path / "child.log").read_text()
    assert rc == 1 and "1 of 2 trials complete" in text and "sweep.resume=true" in text, text[-3000:]
    [first] = [p.parent.parent for p in exp.glob("*/run/summary.parquet")]
    assert [p.parent for p in exp.glob("*/attempts.log")] == [first], "the second trial never started"
    first_mtime = (first / "run" / "summary.parquet").stat().st_mtime

    lines: list[str] = []
    out = run_sweep(load_sweep(path, ["sweep.resume=true"]), progress=lines.append)
    trials = read_sweep(out)["trials"]
    assert len(trials) == 2 and (trials["status"] == "complete").all()
    assert sorted(trials["contamination.fraction"]) == [0.1, 0.3]
    assert [len(attempts(d)) for d in trials["trial_dir"]] == [1, 1], "each simulation ran exactly once"
    assert (first / "run" / "summary.parquet").stat().st_mtime == first_mtime, "finished trial untouched"
    # Tune may not have recorded the first trial as finished (the signal stopped it before its report
    # was processed): restore then invokes it again and the trainable reuses its complete results.
    assert sum(" done " in line for line in lines) == 2, lines
    # The count is of distinct trials complete on disk: the resumed sweep counts on from the first one.
    assert [line for line in lines if " done " in line][-1].count("(2/2)") == 1, lines
    assert len(read_sweep(out)["summary"]) == 2 * 3
