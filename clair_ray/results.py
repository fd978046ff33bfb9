"""Result tables: the Arrow schemas (built here and nowhere else), summaries, files, loading, the text table.

A run writes into its ``output_dir``:

- ``config.yaml``: the resolved config; ``versions.json``: the package versions;
- ``clients.parquet``: one row per trial × method × round × client (:func:`client_schema`: the core
  columns of :data:`CLIENT_SCHEMA` plus the workload's client-level columns);
- ``summary.parquet``: one row per trial × method × round (:func:`summary_schema`: :data:`SUMMARY_SCHEMA`
  plus ``honest_mean_<column>`` and the workload's method-level columns);
- ``detection.parquet``: detection per attack kind, one row per trial × method × round × attack kind
  (:data:`DETECTION_SCHEMA`);
- ``rounds.parquet``: per round, the wall time and its split.

:func:`load` reads a run directory or a gathered sweep (:func:`read_sweep`) as pandas DataFrames.

Detection truth is "contaminated and with update energy outside U above its noise level"
(``detectable``): in-subspace attacks (sign flip, scaling, IPM) usually fall outside it, because no
subspace method can see them; they are judged by the honest clients' error, and reported per kind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from clair_ray.attacks import ATTACKS
from clair_ray.errors import ResultsError
from clair_ray.workloads.base import Column, MethodRound

#: The tables of a run (one Parquet file each) and of a gathered sweep (one hive-partitioned dataset each).
TABLES = ("clients", "summary", "detection")
#: The partition column of a gathered sweep's datasets (the Tune trial id).
PARTITION = "sweep_trial"

#: Client-table columns every run has; a workload's own client columns follow ``reason``.
_CLIENT_HEAD = [
    ("trial", pa.int32()),
    ("method", pa.string()),
    ("round", pa.int32()),
    ("client_id", pa.int32()),
    ("contaminated", pa.bool_()),
    ("attack", pa.string()),  # "" for honest clients
    ("detectable", pa.bool_()),  # detection truth
    ("dropped", pa.bool_()),  # the client raised: no update this round
    ("sampled", pa.bool_()),  # the client took part in the round (workload.clients_per_round)
    ("flagged", pa.bool_()),
    ("reason", pa.string()),  # why it was flagged ("" if not)
]
_CLIENT_TAIL = [
    ("update_norm", pa.float64()),  # ‖update the server received‖_F
    ("n_samples", pa.int64()),
    ("bytes_sent", pa.int64()),
    ("actor_id", pa.int32()),  # which client actor trained it (infrastructure, not a result)
    ("train_s", pa.float64()),  # timing
]
#: Summary-table columns every run has; ``honest_mean_<column>`` and method-level workload columns
#: follow ``n_honest``.
_SUMMARY_HEAD = [
    ("trial", pa.int32()),
    ("method", pa.string()),
    ("round", pa.int32()),
    ("n_clients", pa.int32()),
    ("n_sampled", pa.int32()),
    ("n_dropped", pa.int32()),
    ("n_honest", pa.int32()),
]
_SUMMARY_TAIL = [
    ("n_flagged", pa.int32()),
    ("n_detectable", pa.int32()),
    ("precision", pa.float64()),
    ("recall", pa.float64()),
    ("f1", pa.float64()),
    ("agg_s", pa.float64()),  # timing: this method's aggregation
    ("round_s", pa.float64()),  # timing: the whole round (training, shared by methods, + aggregation)
]


def client_schema(columns: Sequence[Column] = ()) -> pa.Schema:
    """The client table's schema: the core columns plus the workload's client-level columns."""
    own = [(c.name, c.dtype) for c in columns if c.level == "client"]
    return pa.schema(_CLIENT_HEAD + own + _CLIENT_TAIL)


def summary_schema(columns: Sequence[Column] = ()) -> pa.Schema:
    """The summary table's schema: the core columns plus ``honest_mean_<c>`` for each client column that
    asks for it and each method-level column."""
    means = [
        (f"honest_mean_{c.name}", pa.float64()) for c in columns if c.level == "client" and c.honest_mean
    ]
    scalars = [(c.name, c.dtype) for c in columns if c.level == "method"]
    return pa.schema(_SUMMARY_HEAD + means + scalars + _SUMMARY_TAIL)


#: The core schemas (a run's tables have these columns and its workload's own).
CLIENT_SCHEMA = client_schema()
SUMMARY_SCHEMA = summary_schema()

DETECTION_SCHEMA = pa.schema(
    [
        ("trial", pa.int32()),
        ("method", pa.string()),
        ("round", pa.int32()),
        ("attack", pa.string()),
        ("in_subspace", pa.bool_()),
        ("n_clients", pa.int32()),
        ("n_detectable", pa.int32()),
        ("n_flagged", pa.int32()),
        ("flag_rate", pa.float64()),
    ]
)

#: Columns that measure time or placement: they may differ between runs of the same config.
NONDETERMINISTIC_COLUMNS = ("train_s", "agg_s", "round_s", "actor_id")


def detection_scores(
    flagged: np.ndarray, truth: np.ndarray, contaminated: np.ndarray | None = None
) -> tuple[float, float, float]:
    """Precision, recall and F1 of a flagged set against the truth.

    With ``contaminated`` given, a contaminated client outside ``truth`` (an in-subspace attack, or one
    whose energy outside U stays below the truth's level) is left out of all three: no subspace method is
    expected to see it, so flagging it is neither a false alarm nor a find (such attacks are judged by the
    honest clients' error instead, and reported per kind). Conventions for empty sets: precision is 1 when
    nothing is flagged, recall is 1 when nothing is to be found (so a method that correctly flags nobody on
    a clean run scores 1, 1, 1).

    Args:
        flagged: (K,) bool.
        truth: (K,) bool, detectable.
        contaminated: (K,) bool, every contaminated client (None: ``truth``).

    Returns:
        (precision, recall, f1).
    """
    if contaminated is not None:
        scored = ~(contaminated & ~truth)
        flagged, truth = flagged[scored], truth[scored]
    tp = int(np.sum(flagged & truth))
    fp = int(np.sum(flagged & ~truth))
    fn = int(np.sum(~flagged & truth))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def round_rows(
    trial: int,
    round_: int,
    method: str,
    mr: MethodRound,
    attack: dict[int, str],
    train: dict[int, dict[str, Any]],
    columns: Sequence[Column],
    K: int,
    sampled: set[int],
) -> list[dict[str, Any]]:
    """One method's client rows of a round, in client-id order: the core columns and the workload's
    client columns, for every client of the federation (``sampled``: who took part in the round).

    Args:
        trial: Trial index.
        round_: Round index.
        method: The method.
        mr: Its results of the round.
        attack: Contaminated client -> its attack kind.
        train: Client id -> its training metadata (``n_samples``, ``bytes_sent``, ``actor_id``,
            ``train_s``; absent for clients that did not train).
        columns: The workload's columns.
        K: Clients in the federation.
        sampled: The round's sample.
    """
    own = [c.name for c in columns if c.level == "client"]
    rows = []
    for k in range(K):
        tm = train.get(k, {})
        row: dict[str, Any] = {
            "trial": trial,
            "method": method,
            "round": round_,
            "client_id": k,
            "contaminated": k in attack,
            "attack": attack.get(k, ""),
            "detectable": bool(mr.detectable[k]),
            "dropped": bool(mr.dropped[k]),
            "sampled": k in sampled,
            "flagged": bool(mr.flagged[k]),
            "reason": mr.reason[k],
        }
        row.update({c: mr.metrics[c][k].item() if c in mr.metrics else np.nan for c in own})
        row.update(
            {
                "update_norm": float(mr.update_norm[k]),
                "n_samples": int(tm.get("n_samples", 0)),
                "bytes_sent": int(tm.get("bytes_sent", 0)),
                "actor_id": int(tm.get("actor_id", -1)),
                "train_s": float(tm.get("train_s", np.nan)),
            }
        )
        rows.append(row)
    return rows


def method_extras(mr: MethodRound, columns: Sequence[Column], round_s: float) -> dict[str, Any]:
    """A method's summary extras of a round: its method-level columns (numbers NaN and strings "" when
    missing), ``agg_s`` and the round's ``round_s``."""
    out: dict[str, Any] = {}
    for c in columns:
        if c.level == "method":
            value = mr.scalars.get(c.name)
            if pa.types.is_string(c.dtype):
                out[c.name] = "" if value is None else str(value)
            else:
                out[c.name] = math.nan if value is None else float(value)
    return {**out, "agg_s": mr.agg_s, "round_s": round_s}


def table(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) to an Arrow table with exactly ``schema``'s columns."""
    return pa.Table.from_pylist(list(rows), schema=schema)


def _mean(rows: pd.DataFrame, column: str) -> float:
    """Mean of a column that older client tables may lack (NaN when missing, empty or all NaN)."""
    if column not in rows.columns or not len(rows) or rows[column].isna().all():
        return math.nan
    return float(rows[column].mean())


def sampled_mask(clients: pd.DataFrame) -> np.ndarray:
    """(rows,) bool: the client took part in its round (True where the ``sampled`` column is absent or
    null, as in tables written before client sampling existed)."""
    if "sampled" not in clients:
        return np.ones(len(clients), dtype=bool)
    return clients["sampled"].astype(object).where(clients["sampled"].notna(), True).to_numpy(bool)


def summarize(
    clients: pd.DataFrame,
    extras: dict[tuple[int, str, int], dict[str, float]],
    columns: Sequence[Column] = (),
) -> tuple[list, list]:
    """Summary and per-attack detection rows from the client rows.

    Detection counts only the round's sampled clients with a valid (reported, finite) update; non-finite
    ones are excluded before any method sees them, so they are not a method's detection.

    Args:
        clients: The client table as a DataFrame.
        extras: (trial, method, round) -> ``agg_s``, ``round_s`` and the method-level workload columns.
        columns: The workload's columns (which honest means and method-level numbers to report).

    Returns:
        (summary rows, detection rows) as lists of dicts.
    """
    means = [c.name for c in columns if c.level == "client" and c.honest_mean]
    scalars = {
        c.name: ("" if pa.types.is_string(c.dtype) else math.nan) for c in columns if c.level == "method"
    }
    summary: list[dict[str, Any]] = []
    detection: list[dict[str, Any]] = []
    for (trial, method, rnd), g in clients.groupby(["trial", "method", "round"], sort=False):
        # Tables written before client sampling existed have no (or an empty) column: everyone took part.
        sampled = sampled_mask(g)
        valid = sampled & ~g["dropped"].to_numpy() & (g["reason"].to_numpy() != "non-finite")
        v = g[valid]
        honest = g[~g["contaminated"] & ~g["dropped"]]
        flagged = v["flagged"].to_numpy(bool)
        truth = v["detectable"].to_numpy(bool)
        precision, recall, f1 = detection_scores(flagged, truth, v["contaminated"].to_numpy(bool))
        ex = extras.get((int(trial), str(method), int(rnd)), {})
        row: dict[str, Any] = {
            "trial": trial,
            "method": method,
            "round": rnd,
            "n_clients": len(g),
            "n_sampled": int(sampled.sum()),
            "n_dropped": int(g["dropped"].sum()),
            "n_honest": len(honest),
        }
        row.update({f"honest_mean_{m}": _mean(honest, m) for m in means})
        row.update({m: ex.get(m, missing) for m, missing in scalars.items()})
        row.update(
            {
                "n_flagged": int(flagged.sum()),
                "n_detectable": int(truth.sum()),
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "agg_s": ex.get("agg_s", math.nan),
                "round_s": ex.get("round_s", math.nan),
            }
        )
        summary.append(row)
        for attack, a in v[v["contaminated"]].groupby("attack", sort=True):
            detection.append(
                {
                    "trial": trial,
                    "method": method,
                    "round": rnd,
                    "attack": attack,
                    "in_subspace": str(attack) in ATTACKS and ATTACKS[str(attack)].in_subspace,
                    "n_clients": len(a),
                    "n_detectable": int(a["detectable"].sum()),
                    "n_flagged": int(a["flagged"].sum()),
                    "flag_rate": float(a["flagged"].mean()),
                }
            )
    return summary, detection


def write_tables(out_dir: str | Path, tables: dict[str, pa.Table]) -> None:
    """Writes ``name.parquet`` for each table (via a temporary file, so a crash leaves no half file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, t in tables.items():
        tmp = out / f".{name}.parquet.tmp"
        pq.write_table(t, tmp)
        tmp.replace(out / f"{name}.parquet")


def read_parquet(path: str | Path) -> pd.DataFrame:
    """One result table as a DataFrame.

    Raises:
        ResultsError: Naming the file, when it is missing or not a readable Parquet file.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(
            f"{path}: missing (the run did not finish writing its tables, or this is not a run)"
        )
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResultsError(
            f"{path}: not a readable Parquet file, corrupt or truncated ({cause}); rerun the experiment "
            "into a new output_dir"
        ) from exc


def read_tables(out_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Reads a run directory's tables as DataFrames (``clients``, ``summary``, ``detection``).

    Raises:
        ResultsError: A table is missing or unreadable (:func:`read_parquet`).
    """
    out = Path(out_dir)
    return {n: read_parquet(out / f"{n}.parquet") for n in ("clients", "summary", "detection")}


def format_summary(summary: pd.DataFrame, detection: pd.DataFrame | None = None) -> str:
    """The final round's metrics with methods side by side (mean ± std over trials when > 1).

    Args:
        summary: The summary table.
        detection: The per-attack detection table (adds one flag-rate row per attack kind).

    Returns:
        A plain-text table.
    """
    last = summary[summary["round"] == summary["round"].max()]
    methods = list(dict.fromkeys(last["method"]))
    core = {name for name, _ in _SUMMARY_HEAD + _SUMMARY_TAIL}
    # The workload's numeric columns (honest means, method-level numbers); text columns stay in the tables.
    own = [c for c in last.columns if c not in core and pd.api.types.is_numeric_dtype(last[c])]
    metrics = [
        *own,
        "precision",
        "recall",
        "f1",
        "n_flagged",
        "agg_s",
    ]
    rows: list[tuple[str, list[str]]] = []

    def cell(values: pd.Series) -> str:
        values = values.astype(float)
        if values.isna().all():
            return "-"
        if len(values) > 1:
            return f"{values.mean():.4g}±{values.std(ddof=0):.2g}"
        return f"{values.iloc[0]:.4g}"

    # A workload's columns that are all NaN in this run (no subspace estimated by any method, say) are left
    # out rather than printed as a row of dashes.
    optional = set(own)
    for m in metrics:
        if m not in last.columns or (m in optional and last[m].isna().all()):
            continue
        rows.append((m, [cell(last[last["method"] == meth][m]) for meth in methods]))
    if detection is not None and len(detection):
        d = detection[detection["round"] == detection["round"].max()]
        for attack in sorted(d["attack"].unique()):
            label = f"flagged[{attack}]"
            rows.append(
                (
                    label,
                    [
                        cell(d[(d["method"] == meth) & (d["attack"] == attack)]["flag_rate"])
                        for meth in methods
                    ],
                )
            )
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(meth), *(len(r[1][i]) for r in rows)) for i, meth in enumerate(methods)]
    lines = ["  ".join([" " * w0] + [m.rjust(w) for m, w in zip(methods, widths, strict=True)])]
    for label, cells in rows:
        lines.append("  ".join([label.ljust(w0)] + [c.rjust(w) for c, w in zip(cells, widths, strict=True)]))
    return "\n".join(lines)


def read_sweep(results_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Reads a gathered dataset: ``clients``, ``summary``, ``detection`` (with ``sweep_trial`` and the
    parameter columns) and ``trials``."""
    root = Path(results_dir)
    part = pads.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive")
    out = {}
    for name in TABLES:
        if (root / name).is_dir():
            df = pads.dataset(root / name, format="parquet", partitioning=part).to_table().to_pandas()
        elif (root / f"{name}.parquet").exists():  # a compact copy (see compact_results)
            df = read_parquet(root / f"{name}.parquet")
        else:
            schema = {"clients": CLIENT_SCHEMA, "summary": SUMMARY_SCHEMA}.get(name, DETECTION_SCHEMA)
            df = schema.empty_table().to_pandas()
        out[name] = df
    out["trials"] = read_parquet(root / "trials.parquet")
    return out


def is_sweep(path: str | Path) -> bool:
    """Whether ``path`` is a gathered sweep (``<name>-results``) rather than one run's directory."""
    return (Path(path) / "trials.parquet").exists()


def load(path: str | Path) -> dict[str, pd.DataFrame]:
    """The result tables of a run directory or of a gathered sweep, as pandas DataFrames.

    Args:
        path: A run's ``output_dir``, or a sweep's ``<storage_path>/<name>-results`` directory.

    Returns:
        ``clients``, ``summary``, ``detection`` (a sweep's with its ``sweep_trial`` column and one column per
        swept key), plus ``rounds`` for a run (when written) or ``trials`` for a sweep.

    Raises:
        FileNotFoundError: ``path`` holds neither kind of results.
    """
    root = Path(path)
    if is_sweep(root):
        return read_sweep(root)
    if not (root / "summary.parquet").exists():
        raise FileNotFoundError(f"{root}: no summary.parquet or trials.parquet (neither a run nor a sweep)")
    out = read_tables(root)
    if (root / "rounds.parquet").exists():
        out["rounds"] = read_parquet(root / "rounds.parquet")
    return out


def column_value(value: Any, dtype: pa.DataType) -> Any:
    """A swept parameter's value as stored in a column of ``dtype`` (lists and mappings as JSON)."""
    if dtype == pa.string() and not isinstance(value, str):
        return json.dumps(value, sort_keys=True)
    if dtype == pa.float64():
        return float(value)
    return value


def is_complete(run_dir: str | Path) -> bool:
    """Whether a run directory holds all result tables (the engine writes them last, each atomically)."""
    return all((Path(run_dir) / f"{n}.parquet").exists() for n in TABLES)


def gather(experiment_dir: Path, out: Path, dtypes: dict[str, pa.DataType], sweep_yaml: str) -> Path:
    """Writes a sweep's gathered dataset from its trial directories (re-gathering is idempotent).

    Each ``<experiment_dir>/trial_<id>/`` holds ``trial.json`` (id and parameters), ``attempts.log`` and
    ``run/`` (the engine's run directory). The dataset: one hive-partitioned Parquet dataset per table
    (partition ``sweep_trial``), the run's columns plus one column per swept key; ``trials.parquet``; and
    ``sweep.yaml``.

    Args:
        experiment_dir: Tune's experiment directory.
        out: The results directory (``<name>-results``).
        dtypes: Swept key -> its column type.
        sweep_yaml: The resolved sweep (``sweep`` and ``base`` sections), written as ``sweep.yaml``.

    Returns:
        ``out``.
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for tj in sorted(experiment_dir.glob("*/trial.json")):
        info = json.loads(tj.read_text())
        trial_id, params = info["trial_id"], info["params"]
        run_dir = tj.parent / "run"
        attempts_log = tj.parent / "attempts.log"
        attempts = len(attempts_log.read_text().splitlines()) if attempts_log.exists() else 0
        complete = is_complete(run_dir)
        rows.append(
            {
                PARTITION: trial_id,
                "status": "complete" if complete else "incomplete",
                "attempts": attempts,
                "trial_dir": str(tj.parent),
                **{k: column_value(params[k], dtypes[k]) for k in dtypes},
            }
        )
        if not complete:
            continue
        for name in TABLES:
            t = pq.read_table(run_dir / f"{name}.parquet")
            for k, dt in dtypes.items():
                t = t.append_column(pa.field(k, dt), pa.array([column_value(params[k], dt)] * len(t), dt))
            part = out / name / f"{PARTITION}={trial_id}"
            part.mkdir(parents=True, exist_ok=True)
            tmp = part / ".part-0.parquet.tmp"
            pq.write_table(t, tmp)
            tmp.replace(part / "part-0.parquet")
    schema = pa.schema(
        [
            (PARTITION, pa.string()),
            ("status", pa.string()),
            ("attempts", pa.int64()),
            ("trial_dir", pa.string()),
        ]
        + [(k, dt) for k, dt in dtypes.items()]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "trials.parquet")
    (out / "sweep.yaml").write_text(sweep_yaml)
    return out
