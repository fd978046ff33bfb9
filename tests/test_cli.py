"""What a user sees on the command line: --version, the config command, overrides, output directories,
Ctrl+C, resuming a finished run, and loading results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from clair_ray import __version__, cli, results
from clair_ray.config import ConfigError, load_config
from clair_ray.results import NONDETERMINISTIC_COLUMNS

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "configs" / "linear_small.yaml"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"clair-ray {__version__}"


def test_missing_config_file_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert "give a config file, e.g. clair-ray run configs/linear.yaml" in err and "key=value" not in err


def test_config_command_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", str(SMALL), "seed=7", "contamination.mix={alie: 1.0}"]) == 0
    text = capsys.readouterr().out
    assert "seed: 7" in text and "mix:\n    alie: 1.0" in text and "true_rank:" in text
    assert cli.main(["config", str(SMALL), "workload.nonsense=1"]) == 2
    assert "workload.nonsense" in capsys.readouterr().err


def test_run_help_says_where_results_go(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    assert "output_dir" in out and "clair-ray config" in out and "overwrite=true" in out


def test_mapping_override_replaces_the_files_mapping() -> None:
    cfg = load_config(SMALL, ["contamination.mix={data_random: 1.0}"])
    assert dict(cfg.contamination.mix) == {"data_random": 1.0}
    # A single key still merges into the file's mapping.
    merged = load_config(SMALL, ["contamination.mix.data_random=2.0"])
    assert merged.contamination.mix["data_random"] == 2.0 and len(merged.contamination.mix) > 1


def test_resume_and_overwrite_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match=r"overwrite=True: cannot be combined with resume=true"):
        load_config(SMALL, ["resume=true", "overwrite=true"])


def test_sweep_rejects_an_output_dir_override() -> None:
    from clair_ray.sweep import load_sweep

    with pytest.raises(
        ConfigError, match=r"output_dir: a sweep writes every trial under sweep\.storage_path"
    ):
        load_sweep(REPO / "configs" / "sweep_linear_small.yaml", ["output_dir=/tmp/x"])


def test_results_load_reads_a_gathered_sweep() -> None:
    tables = results.load(REPO / "tests" / "data" / "sweep_linear_small")
    assert {"clients", "summary", "detection", "trials"} <= set(tables)
    assert results.PARTITION in tables["summary"].columns and len(tables["summary"])
    with pytest.raises(FileNotFoundError, match="neither a run nor a sweep"):
        results.load(REPO / "configs")


def _tensorboard_tags(logdir: Path) -> set[str]:
    """Scalar tags in TensorBoard event files (TFRecord: length, crc, event proto, crc)."""
    from tensorboardX.proto import event_pb2

    tags: set[str] = set()
    for f in logdir.glob("events.out.tfevents.*"):
        data, pos = f.read_bytes(), 0
        while pos + 12 <= len(data):
            n = int.from_bytes(data[pos : pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            tags |= {v.tag for v in event.summary.value}
            pos += 12 + n + 4
    return tags


def _stable(df: pd.DataFrame) -> pd.DataFrame:
    df = df.drop(columns=[c for c in NONDETERMINISTIC_COLUMNS if c in df.columns])
    return df.sort_values(
        [c for c in ("trial", "method", "round", "client_id", "attack") if c in df]
    ).reset_index(drop=True)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_output_dir_policy_and_resume_of_a_finished_run(tmp_path: Path) -> None:
    from clair_ray.engine import EngineError, run_experiment

    out = tmp_path / "run"
    first = run_experiment(
        load_config(SMALL, [f"output_dir={out}", "aggregation.methods=[fedavg,clair]", "tensorboard=true"])
    )
    tags = _tensorboard_tags(out / "tensorboard")
    assert "trial0/clair/f1" in tags and "trial0/fedavg/honest_mean_error" in tags
    assert set(results.load(out)) >= {"clients", "summary", "detection", "rounds"}
    versions = json.loads((out / "versions.json").read_text())
    assert versions["torch"].startswith(torch.__version__.split("+")[0]) and "ray" in versions
    with pytest.raises(EngineError, match=r"is not empty: pass resume=true .* overwrite=true"):
        run_experiment(load_config(SMALL, [f"output_dir={out}", "aggregation.methods=[fedavg,clair]"]))
    lines: list[str] = []
    again = run_experiment(
        load_config(SMALL, [f"output_dir={out}", "aggregation.methods=[fedavg,clair]", "resume=true"]),
        progress=lines.append,
    )
    assert any("finished already" in line for line in lines) and not any("resuming" in line for line in lines)
    pd.testing.assert_frame_equal(_stable(first.summary), _stable(again.summary), check_exact=True)
    (out / "stale.txt").write_text("from an older run")
    run_experiment(
        load_config(SMALL, [f"output_dir={out}", "aggregation.methods=[fedavg]", "overwrite=true"])
    )
    assert not (out / "stale.txt").exists() and set(results.load(out)["summary"]["method"]) == {"fedavg"}


@pytest.mark.slow
def test_ctrl_c_writes_completed_rounds_and_says_how_to_resume(tmp_path: Path) -> None:
    """SIGINT to a running `clair-ray run`: exit 130, one line with the resume command, the completed rounds'
    tables on disk; resuming finishes with the tables of an uninterrupted run."""
    out = tmp_path / "run"
    over = [
        f"output_dir={out}",
        "aggregation.methods=[fedavg,clair]",
        "workload.mode=multi_round",
        "workload.rounds=6",
        "engine.debug_delay_s=1.5",
    ]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("RAY_ADDRESS", None)
    child = subprocess.Popen(
        [sys.executable, "-m", "clair_ray.cli", "run", str(SMALL), *over, "ray.num_cpus=2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 180
        while (
            time.time() < deadline
            and child.poll() is None
            and not (out / "checkpoint" / "state.json").exists()
        ):
            time.sleep(0.2)
        assert child.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 130, (stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "interrupted (completed up to trial 0 round" in stderr and "resume=true" in stderr, stderr[-2000:]
    partial = results.load(out)["summary"]
    assert 1 <= partial["round"].nunique() < 6
    from clair_ray.engine import run_experiment

    resumed = run_experiment(load_config(SMALL, [*over[:-1], "resume=true", "ray.num_cpus=2"]))
    whole = run_experiment(
        load_config(SMALL, [*over[:-1], f"output_dir={tmp_path / 'whole'}", "ray.num_cpus=2"])
    )
    pd.testing.assert_frame_equal(_stable(resumed.clients), _stable(whole.clients), check_exact=True)


@pytest.mark.slow
def test_console_is_clean_on_a_lora_run(tmp_path: Path) -> None:
    """`clair-ray run` of a LoRA config prints no warning spam: no "NumPy array is not writable" from the
    actors, no "Writing model shards" bar; "built the copy-task base" only when it was built."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", CLAIR_CACHE=str(tmp_path / "cache"))
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("RAY_ADDRESS", None)
    small = REPO / "configs" / "copy_task_small.yaml"
    outs = []
    for run in ("cold", "warm"):
        proc = subprocess.run(
            [sys.executable, "-m", "clair_ray.cli", "run", str(small), f"output_dir={tmp_path / run}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout + proc.stderr)
    for text in outs:
        assert "not writable" not in text and "Writing model shards" not in text, text[-3000:]
        assert "Warning" not in text, text[-3000:]
    assert "built the copy-task base" in outs[0] and "built the copy-task base" not in outs[1]


def test_bad_input_found_while_reading_data_is_exit_2_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The workload reads its data on the driver before any actor starts: a bad file is bad input."""
    hf_small = REPO / "configs" / "hf_causal_lm_small.yaml"
    rc = cli.main(
        ["run", str(hf_small), f"output_dir={tmp_path / 'run'}", f"workload.data_path={tmp_path}/nope.jsonl"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "nope.jsonl" in err and "no such file" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_an_unreachable_cluster_address_is_one_line_and_quick(tmp_path: Path) -> None:
    """`ray.address=HOST:PORT` with nothing there fails within seconds (Ray itself retries for minutes)."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clair_ray.cli",
            "run",
            str(SMALL),
            "ray.address=127.0.0.1:1",
            f"output_dir={tmp_path}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and time.time() - t0 < 60
    assert "ray.address='127.0.0.1:1': no Ray cluster answered there" in proc.stderr
    assert "jobs/head.py start" in proc.stderr and "Traceback" not in proc.stderr
