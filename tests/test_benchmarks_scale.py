"""benchmarks/scale.py's pure helpers: the round split, the growth check, the /proc memory reader.

No timing assertions: the script's numbers are measurements, not test outcomes.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def scale() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while building the class
    spec.loader.exec_module(mod)
    return mod


def _rounds(K: int) -> pd.DataFrame:
    # round 0: 10 s (model loading); rounds 1, 2: 4 s and 6 s with 3 / 5 s of client compute.
    return pd.DataFrame(
        {
            "trial": [0, 0, 0],
            "round": [0, 1, 2],
            "clients": [K] * 3,
            "round_s": [10.0, 4.0, 6.0],
            "train_wall_s": [9.0, 3.5, 5.2],
            "client_compute_s": [8.0, 3.0, 5.0],
            "agg_s": [0.2, 0.2, 0.4],
            "eval_s": [0.0, 0.0, 0.2],
            "orchestration_s": [1.8, 0.8, 0.4],
        }
    )


def _memory(total: int) -> dict:
    return {
        "processes": 3,
        "sum_peak_rss": total,
        "max_process_peak_rss": total // 2,
        "max_process": "driver",
        "peak_anon_total": total // 3,
        "by_role": {"driver": total // 2, "client actors": total - total // 2},
        "anon_by_role": {"driver": total // 4, "client actors": total // 4},
        "samples": 1,
        "per_process": [],
    }


def test_summarize_rounds_splits_the_steady_rounds(scale: ModuleType) -> None:
    s = scale.summarize_rounds(_rounds(100), gaps=[0.5, 1.5])
    assert (s["K"], s["rounds"], s["steady_rounds"]) == (100, 3, 2)
    assert s["first_round_s"] == pytest.approx(10.0)
    assert s["round_s"] == pytest.approx(5.0)
    assert s["client_compute_s"] == pytest.approx(4.0)
    assert s["orchestration_s"] == pytest.approx(0.6)
    assert s["orch_train_s"] == pytest.approx(0.35)  # mean(3.5 - 3, 5.2 - 5)
    assert s["orch_agg_s"] == pytest.approx(0.25)  # mean(4 - 3.5 - 0.2, 6 - 5.2 - 0.4 - 0.2)
    assert s["orch_train_s"] + s["orch_agg_s"] == pytest.approx(s["orchestration_s"])
    assert s["orchestration_pct"] == pytest.approx(12.0)
    assert s["per_client_ms"] == pytest.approx(50.0)
    assert (s["best_round_s"], s["best_per_client_ms"]) == pytest.approx((4.0, 40.0))
    assert s["between_rounds_s"] == pytest.approx(1.0)
    parts = ("client_compute_pct", "agg_pct", "eval_pct", "orchestration_pct")
    assert sum(s[p] for p in parts) == pytest.approx(100.0)


def test_one_round_is_its_own_steady_round(scale: ModuleType) -> None:
    s = scale.summarize_rounds(_rounds(10).iloc[:1])
    assert s["steady_rounds"] == 1 and s["round_s"] == pytest.approx(10.0)
    assert math.isnan(s["between_rounds_s"])
    with pytest.raises(ValueError):
        scale.summarize_rounds(pd.DataFrame())


def test_cpu_per_round_differences(scale: ModuleType) -> None:
    snaps = [{"driver": 1.0}, {"driver": 2.0, "client actors": 5.0}, {"driver": 2.5, "client actors": 9.0}]
    assert scale.cpu_per_round(snaps) == [
        {"driver": 1.0, "client actors": 5.0},
        {"driver": 0.5, "client actors": 4.0},
    ]
    assert scale.cpu_per_round(snaps[:1]) == []


def test_between_rounds_subtracts_each_round(scale: ModuleType) -> None:
    assert scale.between_rounds([10.0, 15.0, 21.0], [9.0, 4.0, 5.0]) == pytest.approx([1.0, 1.0])
    assert scale.between_rounds([3.0], [3.0]) == []


def test_growth_check_and_table(scale: ModuleType) -> None:
    settings = []
    for K, orch in ((100, 0.6), (1000, 0.3)):
        raw = {
            "workload": "copy_task",
            "K": K,
            "rounds_table": _rounds(K).to_dict(orient="records"),
            "round_ends": [10.0, 14.5, 21.0],
            "round_cpu": [
                {"driver": 1.0},
                {"driver": 3.0, "client actors": 20.0},
                {"driver": 3.5, "client actors": 20.0 + 0.3 * K},
                {"driver": 4.5, "client actors": 20.0 + 0.6 * K},
            ],
            "run_wall_s": 30.0,
            "memory": _memory(2**30),
            "bytes_per_client": 1024.0,
            "checkpoint_bytes": 2**20,
        }
        s = scale.summarize_setting(raw)
        assert s["between_rounds_s"] == pytest.approx(0.5)  # 14.5 - 10 - 4 and 21 - 14.5 - 6
        assert s["cpu_s"]["driver"] == pytest.approx(0.75)  # rounds 2 and 3: 0.5 and 1.0 s
        assert s["client_cpu_ms_per_client"] == pytest.approx(300.0)  # 0.3 K CPU seconds per round
        s["orchestration_pct"] = 100 * orch / s["round_s"]
        settings.append(s)
    lines = scale.growth_check(settings)
    text = "\n".join(lines)
    assert "x1.00 vs K = 100" in text and "K x10" in text and "client CPU per client x1.00" in text
    assert "PASS" in text  # 0.3 s of a 5 s round: 6 %
    settings[1]["orchestration_pct"] = 25.0
    assert "FAIL" in "\n".join(scale.growth_check(settings))
    table = scale.format_setting(settings[0])
    assert "K = 100" in table and "orchestration" in table and "GiB" in table


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_proc_memory_reader_on_this_process(scale: ModuleType) -> None:
    st = scale.read_status(os.getpid())
    assert st is not None and st["VmHWM"] >= st["VmRSS"] > 0
    assert scale.read_status(2**22 + 12345) is None  # beyond pid_max: no such process
    assert scale.descendants(os.getpid())[0] == os.getpid()
    sampler = scale.MemorySampler(os.getpid())
    sampler.sample()
    m = sampler.summary()
    assert m["processes"] >= 1 and m["sum_peak_rss"] >= m["max_process_peak_rss"] > 0
    assert m["by_role"]["driver"] > 0 and m["peak_anon_total"] > 0
    assert m["anon_by_role"]["driver"] > 0
    cpu = scale.read_cpu_seconds(os.getpid())
    assert cpu is not None and cpu > 0
    assert sampler.cpu_by_role()["driver"] >= cpu
