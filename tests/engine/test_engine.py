"""The Ray engine end to end: determinism, actor death, dropouts, non-finite updates, resume, resources.

All runs share the session's 2-CPU Ray (tests/conftest.py) and a tiny problem (configs/linear_small.yaml);
actors are packed with fractional CPUs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clair_ray import cli
from clair_ray.config import ExperimentConfig
from clair_ray.engine import EngineError, RunResult, run_experiment
from clair_ray.results import NONDETERMINISTIC_COLUMNS, read_tables

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

ALL_METHODS = (
    "aggregation.methods=[clair,fedavg,local,oracle,median,trimmed_mean,multi_krum,geometric_median]"
)


def stable(df: pd.DataFrame) -> pd.DataFrame:
    """The table without timing/placement columns, in a canonical order."""
    df = df.drop(columns=[c for c in NONDETERMINISTIC_COLUMNS if c in df.columns])
    keys = [c for c in ("trial", "method", "round", "client_id", "attack") if c in df.columns]
    return df.sort_values(keys).reset_index(drop=True)


def assert_same_results(a, b) -> None:
    pd.testing.assert_frame_equal(stable(a.clients), stable(b.clients), check_exact=True)
    pd.testing.assert_frame_equal(stable(a.summary), stable(b.summary), check_exact=True)
    pd.testing.assert_frame_equal(stable(a.detection), stable(b.detection), check_exact=True)


def _small(tmp: Path, *overrides: str):
    from clair_ray.config import load_config

    small = Path(__file__).resolve().parents[2] / "configs" / "linear_small.yaml"
    return load_config(small, [f"output_dir={tmp}", ALL_METHODS, *overrides])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """The small config with every method on one actor: the reference other runs must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    return run_experiment(_small(out, "engine.num_actors=1"))


def test_same_results_with_1_or_3_actors(reference, tmp_path: Path) -> None:
    three = run_experiment(
        _small(tmp_path, "engine.num_actors=3", "engine.aggregator_num_cpus=0.25", "engine.batch_size=2")
    )
    assert set(reference.clients["actor_id"]) == {0}
    assert set(three.clients["actor_id"]) == {0, 1, 2}, "3 actors really served clients"
    assert_same_results(reference, three)
    # files on disk match the returned tables and the resolved config is saved
    disk = read_tables(tmp_path)
    pd.testing.assert_frame_equal(disk["clients"], three.clients)
    assert "num_actors: 3" in (tmp_path / "config.yaml").read_text()
    # sanity: CLAIR beats local on the honest clients of this small problem
    s = three.summary.set_index("method")
    assert s.loc["clair", "honest_mean_error"] < s.loc["local", "honest_mean_error"]


def _run_killing(cfg: ExperimentConfig, markers: Path, pattern: str) -> tuple[RunResult, dict[str, int]]:
    """Runs ``cfg`` while a thread SIGKILLs the process of the first debug marker matching ``pattern`` (a
    call in flight: it sleeps ``engine.debug_delay_s`` after writing its marker); returns the run's result
    and ``{"pid": the killed pid}`` (empty if no marker appeared within 120 s)."""
    killed: dict[str, int] = {}

    def killer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            found = sorted(markers.glob(pattern))
            if found:
                killed["pid"] = int(found[0].read_text())
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = run_experiment(cfg)
    t.join(timeout=5)
    return res, killed


def test_actor_killed_mid_round_is_restarted(reference, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    cfg = _small(
        tmp_path / "run",
        "engine.num_actors=2",
        "engine.batch_size=6",
        "engine.debug_delay_s=2.0",
        f"engine.debug_marker_dir={markers}",
    )
    res, killed = _run_killing(cfg, markers, "*-c0-*")  # the batch of clients 0..5, on actor 0
    assert "pid" in killed, "the killer never saw the round start"
    assert res.restarts == 1  # one kill, one death counted (Ray answers "unavailable" until it is back)
    # the same batch ran again, in a new process (the restarted actor)
    reruns = [m for m in markers.glob("*-c0-*") if int(m.read_text()) != killed["pid"]]
    assert reruns, f"no re-submission after the kill; markers: {[m.name for m in markers.iterdir()]}"
    assert killed["pid"] not in res.actor_pids, "actor 0 runs in a new process after the restart"
    assert_same_results(reference, res)
    assert "died" in (tmp_path / "run" / "run.log").read_text()


def test_aggregator_killed_mid_round_is_restarted(reference, tmp_path: Path) -> None:
    """SIGKILL of the aggregator actor while it aggregates: Ray restarts it, the round is re-submitted
    (its inputs are the clients' objects, which outlive it), the death is counted once."""
    markers = tmp_path / "markers"
    markers.mkdir()
    cfg = _small(tmp_path / "run", "engine.debug_delay_s=1.5", f"engine.debug_marker_dir={markers}")
    res, killed = _run_killing(cfg, markers, "agg-*")
    assert "pid" in killed, "the killer never saw the aggregation start"
    assert res.restarts == 1
    assert len({int(m.read_text()) for m in markers.glob("agg-*")}) == 2  # the round ran again elsewhere
    assert_same_results(reference, res)
    assert "aggregator actor died" in (tmp_path / "run" / "run.log").read_text()


def test_dropout_is_logged_and_round_goes_on(tmp_path: Path) -> None:
    res = run_experiment(_small(tmp_path, "engine.debug_fail_clients=[3]", "engine.min_clients=6"))
    assert res.dropouts == [(0, 0, 3)]
    rows = res.clients[res.clients.client_id == 3]
    assert rows["dropped"].all() and rows["error"].isna().all() and not rows["flagged"].any()
    others = res.clients[res.clients.client_id != 3]
    assert others["error"].notna().all()
    log = (tmp_path / "run.log").read_text()
    assert "client 3 dropped out" in log and "Traceback" in log and "fails on purpose" in log


def test_too_few_clients_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"only 10 of 12 clients reported \(engine.min_clients=11\)") as err:
        run_experiment(_small(tmp_path, "engine.debug_fail_clients=[0,5]", "engine.min_clients=11"))
    # The cause is in the error, not only in run.log (an actor-side failure reads as a dropout).
    assert "client 0 raised: RuntimeError: debug_fail_clients: client 0 fails on purpose" in str(err.value)


def test_non_finite_update_is_flagged_and_excluded(tmp_path: Path) -> None:
    res = run_experiment(_small(tmp_path, "engine.debug_nonfinite_clients=[2]"))
    rows = res.clients[res.clients.client_id == 2]
    assert rows["flagged"].all() and (rows["reason"] == "non-finite").all()
    others = res.clients[res.clients.client_id != 2]
    assert np.isfinite(others["error"]).all()


def test_non_finite_updates_do_not_count_towards_min_clients(tmp_path: Path) -> None:
    # 12 clients, 9 send NaN: 12 "reported" but only 3 usable updates, below engine.min_clients=6.
    with pytest.raises(EngineError, match=r"only 3 of 12 clients sent a finite update .*9 non-finite"):
        run_experiment(
            _small(
                tmp_path / "a", "engine.min_clients=6", "engine.debug_nonfinite_clients=[0,1,2,3,4,5,6,7,8]"
            )
        )
    every = ",".join(str(k) for k in range(12))
    with pytest.raises(EngineError, match=r"all 12 reported updates are non-finite"):
        run_experiment(_small(tmp_path / "b", f"engine.debug_nonfinite_clients=[{every}]"))


def test_resume_after_a_crash_gives_the_same_results(tmp_path: Path) -> None:
    multi = [
        "workload.mode=multi_round",
        "workload.rounds=3",
        "workload.local_steps=3",
        "aggregation.methods=[clair,fedavg,local]",
        "trials=2",
    ]
    full = run_experiment(_small(tmp_path / "full", *multi))
    assert sorted(full.summary["round"].unique()) == [0, 1, 2]
    with pytest.raises(EngineError, match="debug_stop_after_round"):
        run_experiment(_small(tmp_path / "crash", *multi, "engine.debug_stop_after_round=1"))
    assert (tmp_path / "crash" / "checkpoint" / "state.json").exists()
    resumed = run_experiment(_small(tmp_path / "crash", *multi, "resume=true", "engine.num_actors=1"))
    assert_same_results(full, resumed)
    # a checkpoint from a different experiment is refused
    with pytest.raises(EngineError, match="different config"):
        run_experiment(_small(tmp_path / "crash", *multi, "resume=true", "seed=5"))


def test_multi_round_improves_and_honest_clients_continue(tmp_path: Path) -> None:
    res = run_experiment(
        _small(
            tmp_path,
            "workload.mode=multi_round",
            "workload.rounds=4",
            "workload.local_steps=3",
            "aggregation.methods=[clair,local,fedavg]",
        )
    )
    s = res.summary.set_index(["method", "round"])["honest_mean_error"]
    assert s[("local", 3)] < s[("local", 0)]
    assert s[("clair", 3)] < s[("local", 3)]


def test_resources_are_checked_before_anything_pends(tmp_path: Path) -> None:
    t0 = time.time()
    with pytest.raises(EngineError, match=r"engine.num_actors=5 x engine.actor_num_cpus=0.5"):
        run_experiment(_small(tmp_path, "engine.num_actors=5"))
    assert time.time() - t0 < 30


def test_cli_run_prints_progress_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = Path(__file__).resolve().parents[2] / "configs" / "linear_small.yaml"
    assert cli.main(["run", str(small), f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "round 0 (of 0..0): 12/12 clients" in out
    header = [line for line in out.splitlines() if "clair" in line and "fedavg" in line][-1]
    assert header.split()[:2] == ["clair", "fedavg"]
    assert (tmp_path / "summary.parquet").exists()


def test_cli_rejects_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    small = Path(__file__).resolve().parents[2] / "configs" / "linear_small.yaml"
    assert cli.main(["run", str(small), "contamination.fraction=1.5"]) == 2
    assert "contamination.fraction=1.5: must be in [0, 1)" in capsys.readouterr().err
