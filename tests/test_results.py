"""Result tables: detection scores, summaries, the schema on disk, and the text table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from clair_ray import results
from clair_ray.workloads import LinearWorkload

COLS = LinearWorkload.columns
CLIENTS, SUMMARY = results.client_schema(COLS), results.summary_schema(COLS)


def test_detection_scores() -> None:
    t = np.array([1, 1, 0, 0], bool)
    assert results.detection_scores(np.array([1, 0, 1, 0], bool), t) == (0.5, 0.5, 0.5)
    assert results.detection_scores(t.copy(), t) == (1.0, 1.0, 1.0)
    assert results.detection_scores(np.zeros(4, bool), np.zeros(4, bool)) == (1.0, 1.0, 1.0)
    # An attacker outside the truth (in-subspace) is left out: flagging it is no false alarm and no find.
    contaminated = np.array([1, 1, 0, 0], bool)
    truth = np.array([1, 0, 0, 0], bool)
    assert results.detection_scores(np.array([1, 1, 0, 0], bool), truth, contaminated) == (1.0, 1.0, 1.0)
    assert results.detection_scores(np.array([1, 1, 0, 0], bool), truth) == (0.5, 1.0, 2 / 3)
    assert results.detection_scores(np.array([0, 1, 1, 0], bool), truth, contaminated) == (0.0, 0.0, 0.0)
    assert results.detection_scores(np.array([1, 1, 1, 0], bool), truth, contaminated) == (0.5, 1.0, 2 / 3)
    p, r, f = results.detection_scores(np.zeros(4, bool), t)
    assert (p, r, f) == (1.0, 0.0, 0.0)


def _rows() -> list[dict]:
    rows = []
    for method, flags in (("clair", [False, False, True, False]), ("fedavg", [False] * 4)):
        for k in range(4):
            rows.append(
                {
                    "trial": 0,
                    "method": method,
                    "round": 0,
                    "client_id": k,
                    "contaminated": k >= 2,
                    "attack": {2: "other_subspace", 3: "sign_flip"}.get(k, ""),
                    "detectable": k == 2,
                    "dropped": k == 1 and method == "clair",
                    "flagged": flags[k],
                    "reason": "r" if flags[k] else "",
                    "error": float(k + 1),
                    "test_mse": 1.0,
                    "update_norm": 1.0,
                    "off_subspace": 0.0,
                    "noise_level": 0.1,
                    "n_samples": 10,
                    "bytes_sent": 8,
                    "actor_id": 0,
                    "train_s": 0.0,
                }
            )
    return rows


def test_summarize_and_files(tmp_path: Path) -> None:
    t = results.table(_rows(), CLIENTS)
    df = t.to_pandas()
    summary, detection = results.summarize(df, {(0, "clair", 0): {"subspace_error": 0.1, "agg_s": 0.2}}, COLS)
    s = pd.DataFrame(summary).set_index("method")
    # honest = clients 0, 1 (client 1 dropped for clair: excluded from the honest mean)
    assert s.loc["clair", "honest_mean_error"] == 1.0
    assert s.loc["fedavg", "honest_mean_error"] == 1.5
    assert s.loc["clair", "f1"] == 1.0 and s.loc["fedavg", "recall"] == 0.0
    assert s.loc["clair", "subspace_error"] == 0.1 and math.isnan(s.loc["fedavg", "subspace_error"])
    d = pd.DataFrame(detection)
    row = d[(d.method == "clair") & (d.attack == "sign_flip")].iloc[0]
    assert bool(row.in_subspace) and row.flag_rate == 0.0
    tables = {
        "clients": t,
        "summary": results.table(summary, SUMMARY),
        "detection": results.table(detection, results.DETECTION_SCHEMA),
    }
    results.write_tables(tmp_path, tables)
    back = results.read_tables(tmp_path)
    assert list(back["clients"].columns) == CLIENTS.names
    assert list(back["summary"].columns) == SUMMARY.names
    text = results.format_summary(back["summary"], back["detection"])
    assert "clair" in text.splitlines()[0] and "fedavg" in text.splitlines()[0]
    assert "flagged[sign_flip]" in text


def test_schema_rejects_missing_columns() -> None:
    row = _rows()[0]
    del row["error"]
    t = results.table([row], CLIENTS)  # missing values become nulls, never a new schema
    assert t.schema == CLIENTS and t.column("error").null_count == 1


def test_schemas_are_core_columns_plus_the_workload_columns() -> None:
    assert set(results.CLIENT_SCHEMA.names) < set(CLIENTS.names)
    own = set(CLIENTS.names) - set(results.CLIENT_SCHEMA.names)
    assert own == {"error", "test_mse", "off_subspace", "noise_level"}
    extra = set(SUMMARY.names) - set(results.SUMMARY_SCHEMA.names)
    assert extra == {
        "honest_mean_error",
        "honest_mean_test_mse",
        "subspace_error",
        "refine_rank",
        "refine_rank_row",
        "refine_shrink",
        "refine",
    }
    assert SUMMARY.field("refine").type == pa.string()


@pytest.mark.parametrize("col", results.NONDETERMINISTIC_COLUMNS)
def test_nondeterministic_columns_exist(col: str) -> None:
    assert col in results.CLIENT_SCHEMA.names or col in results.SUMMARY_SCHEMA.names
