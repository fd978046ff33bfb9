"""``clair-ray report RESULTS_DIR``: a Markdown summary and PNG plots of a run or a gathered sweep.

RESULTS_DIR is a run directory (``clair-ray run``'s ``output_dir``) or a sweep's gathered
``<name>-results`` directory (:func:`read_sweep`; partitioned or compacted by :func:`compact_results`).
The report uses each run's final round. Seeds are replicates (``trial``, and ``seed`` when swept); every
other swept key is a condition. Plots: ``detection_f1.png`` (CLAIR's detection F1 vs
``contamination.fraction``, a line per attack kind: F1 over the honest clients plus that kind's; kinds
with nothing detectable are listed, not drawn), ``honest_error.png`` (honest clients' mean error vs
``contamination.fraction``, a line per method), ``subspace_error.png`` (vs ``workload.noise_std``, the
methods that estimate one) and ``gain_heatmap.png`` (FedAvg's honest error / CLAIR's, contamination ×
heterogeneity). Error bars are ±1 standard deviation over seeds. When a condition besides the x axis
varies, the first such key splits the plot into panels and any others are averaged (the report says
which); a plot whose x key did not vary is skipped, with a line in ``report.md`` saying why. ``report.md``
holds no timings and no random trial ids: the same results give the same text (the README's tables).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import OmegaConf

from clair_ray import results
from clair_ray.results import read_sweep

FRACTION, HETEROGENEITY, NOISE = "contamination.fraction", "workload.heterogeneity", "workload.noise_std"
REPLICATES = ("seed",)  # swept keys that are replicates, not conditions
MAX_PANELS = 4


def compact_results(results_dir: str | Path, dest: str | Path) -> Path:
    """Copies a gathered dataset into one file per table (small enough to commit; :func:`read_sweep`
    and the report read both layouts). Trial directories (absolute paths) are left out.

    Args:
        results_dir: The gathered dataset.
        dest: The new directory.

    Returns:
        ``dest``.
    """
    src, dest = Path(results_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tables = read_sweep(src)
    order = [results.PARTITION, "trial", "method", "round"]
    for name in results.TABLES:
        df = tables[name].sort_values([c for c in order if c in tables[name].columns], kind="stable")
        pq.write_table(
            pa.Table.from_pandas(df, preserve_index=False), dest / f"{name}.parquet", compression="zstd"
        )
    trials = tables["trials"].drop(columns=["trial_dir"])
    pq.write_table(pa.Table.from_pandas(trials, preserve_index=False), dest / "trials.parquet")
    (dest / "sweep.yaml").write_text((src / "sweep.yaml").read_text())
    return dest


def swept_params(results_dir: str | Path) -> list[str]:
    """The swept parameter keys recorded in a gathered dataset's ``sweep.yaml``."""
    doc = OmegaConf.load(Path(results_dir) / "sweep.yaml")
    return list(doc.sweep.params.keys())  # type: ignore[union-attr]


def is_sweep_results(path: str | Path) -> bool:
    """Whether ``path`` is a gathered sweep dataset (rather than a single run directory)."""
    return (Path(path) / "trials.parquet").exists() and (Path(path) / "sweep.yaml").exists()


class ReportError(ValueError):
    """RESULTS_DIR is neither a run directory nor a gathered sweep."""


class Results:
    """The final-round tables of a run or a sweep, with one column per swept key.

    Attributes:
        source: The directory read.
        kind: ``run`` or ``sweep``.
        params: Swept keys (empty for a run).
        conditions: Swept keys that are not replicates.
        clients: Final-round client rows.
        summary: Final-round summary rows.
        n_runs: Number of simulations (sweep trials) read.
    """

    def __init__(self, path: str | Path) -> None:
        self.source = Path(path)
        if is_sweep_results(self.source):
            self.kind = "sweep"
            tables = read_sweep(self.source)
            self.params = swept_params(self.source)
            self.base = OmegaConf.to_container(OmegaConf.load(self.source / "sweep.yaml").base)
        elif (self.source / "summary.parquet").exists():
            self.kind = "run"
            tables = results.read_tables(self.source)
            for t in tables.values():
                t[results.PARTITION] = "run"
            self.params = []
            cfg_file = self.source / "config.yaml"
            self.base = OmegaConf.to_container(OmegaConf.load(cfg_file)) if cfg_file.exists() else {}
        else:
            raise ReportError(
                f"{self.source}: neither a run directory (summary.parquet) nor a gathered sweep "
                f"(trials.parquet and sweep.yaml)"
            )
        self.conditions = [p for p in self.params if p not in REPLICATES]
        self.per_round = tables["summary"]  # every round (the round plots of a multi-round run)
        self.clients = self._final(tables["clients"])
        self.summary = self._final(tables["summary"])
        self.n_runs = int(self.summary[results.PARTITION].nunique()) if len(self.summary) else 0
        # LM workloads have no parameter error: judge honest clients by their held-out loss there
        loss = "honest_mean_test_loss"
        # Each workload declares its own summary columns: the linear one a parameter error, LM ones a loss.
        err = self.summary.get("honest_mean_error")
        has_error = len(self.summary) and err is not None and err.notna().any()
        self.metric = "honest_mean_error" if has_error or loss not in self.summary else loss
        self.metric_label = "mean error ‖W̃_k − W_k‖_F" if self.metric == "honest_mean_error" else "test loss"
        self.het = HETEROGENEITY

    @staticmethod
    def _final(df: pd.DataFrame) -> pd.DataFrame:
        if not len(df):
            return df
        last = df.groupby(results.PARTITION)["round"].transform("max")
        return df[df["round"] == last].reset_index(drop=True)

    def varied(self, key: str) -> bool:
        """Whether ``key`` was swept with at least two distinct values in the data."""
        return key in self.params and self.summary[key].nunique() >= 2

    def methods(self) -> list[str]:
        """Methods in the order they were run."""
        return list(dict.fromkeys(self.summary["method"]))


def _fmt(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.3g} ± {std:.2g}" if math.isfinite(std) and std > 0 else f"{mean:.3g}"


def _mean_std(values: pd.Series) -> tuple[float, float]:
    v = values.astype(float).dropna()
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=0))


def attack_f1(res: Results, method: str = "clair") -> pd.DataFrame:
    """Per-attack detection F1 of one method, one row per run, engine trial and attack kind.

    F1 is computed over the honest clients plus the clients of that attack (the round's sampled clients
    with valid updates only), so false positives among honest clients count against every attack kind.
    """
    c = res.clients[(res.clients["method"] == method) & ~res.clients["dropped"]]
    c = c[c["reason"] != "non-finite"]
    c = c[results.sampled_mask(c)]  # a multi-round run with client sampling: the round's sample only
    rows: list[dict[str, Any]] = []
    for (run, trial), g in c.groupby([results.PARTITION, "trial"], sort=False):
        honest = g[~g["contaminated"]]
        first = g.iloc[0]
        for attack, a in g[g["contaminated"]].groupby("attack", sort=True):
            sub = pd.concat([honest, a])
            flags = [sub[k].to_numpy(bool) for k in ("flagged", "detectable", "contaminated")]
            _, _, f1 = results.detection_scores(*flags)
            n_det = int(a["detectable"].sum())
            row = {results.PARTITION: run, "trial": trial, "attack": attack, "n_detectable": n_det, "f1": f1}
            rows.append({**row, **{k: first[k] for k in res.params}})
    return pd.DataFrame(rows)


def _panels(res: Results, x: str, exclude: tuple[str, ...] = ()) -> tuple[str | None, list[str]]:
    others = [k for k in res.conditions if k != x and k not in exclude and res.varied(k)]
    panel = others[0] if others and res.summary[others[0]].nunique() <= MAX_PANELS else None
    averaged = [k for k in others if k != panel]
    return panel, averaged


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")


def _replicates(res: Results, df: pd.DataFrame) -> list[str]:
    """Columns that tell replicates apart: the engine trial and the swept replicate keys (seeds)."""
    return ["trial", *[k for k in res.params if k in REPLICATES and k in df]]


def _over_seeds(res: Results, df: pd.DataFrame, by: list[str], y: str) -> pd.DataFrame:
    """Mean and std of ``y`` over seeds only: each replicate is first averaged over the conditions that are
    not in ``by`` (so the spread is the seeds', never the other conditions')."""
    reps = _replicates(res, df)
    per_rep = df.groupby([*by, *reps], dropna=False)[y].mean().reset_index()
    return per_rep.groupby(by, dropna=False)[y].agg(["mean", "std", "count"]).reset_index()


def _line_plot(
    res: Results,
    df: pd.DataFrame,
    x: str,
    hue: str,
    y: str,
    ylabel: str,
    title: str,
    path: Path,
    logy: bool,
    bounds: tuple[float, float] | None = None,
) -> str:
    """One line per ``hue`` value of ``y`` against ``x``, mean ± std over seeds, one panel per value of the
    next swept key; the note says what else the points average over."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel, averaged = _panels(res, x)
    keys = sorted(df[panel].unique()) if panel else [None]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.6), squeeze=False, sharey=True)
    handles: dict[str, Any] = {}
    for ax, pv in zip(axes[0], keys, strict=True):
        d = df if panel is None else df[df[panel] == pv]
        for i, (h, g) in enumerate(d.groupby(hue, sort=False)):
            stats = _over_seeds(res, g, [x], y).sort_values(x)
            mean, std = stats["mean"].to_numpy(float), stats["std"].fillna(0).to_numpy(float)
            lo, hi = std.copy(), std.copy()
            if bounds is not None:  # a bounded metric (F1): the bar stays inside its range
                lo, hi = np.minimum(std, mean - bounds[0]), np.minimum(std, bounds[1] - mean)
            line = ax.errorbar(
                stats[x], mean, yerr=[lo, hi], marker=MARKERS[i % len(MARKERS)],
                linestyle=LINESTYLES[i % len(LINESTYLES)], capsize=3, alpha=0.85, label=str(h),
                markersize=7 - (i % 3),
            )  # fmt: skip
            handles.setdefault(str(h), line)
        ax.set_xlabel(x)
        ax.set_title(title if panel is None else f"{title}\n{panel} = {pv}", fontsize=9)
        if logy:
            ax.set_yscale("log")
        _pad_flat_axis(ax, d[y], logy, bounds)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    note = "mean ± std over seeds" + (f"; averaged over {', '.join(averaged)}" if averaged else "")
    fig.suptitle(note, fontsize=8, y=0.0, va="top")
    fig.legend(
        list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
        title=hue, title_fontsize=7, frameon=False,
    )  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"averaged over {', '.join(averaged)}" if averaged else ""


def _pad_flat_axis(ax: Any, values: pd.Series, logy: bool, bounds: tuple[float, float] | None) -> None:
    """A constant series gets a readable axis around its value (not 0.96-1.04 for a constant 1)."""
    v = values.astype(float).dropna()
    if not len(v) or v.max() - v.min() > 1e-9 * max(1.0, abs(v.max())):
        if bounds is not None:
            ax.set_ylim(bounds[0] - 0.05, bounds[1] + 0.05)
        return
    c = float(v.iloc[0])
    if bounds is not None:
        ax.set_ylim(bounds[0] - 0.05, bounds[1] + 0.05)
    elif logy and c > 0:
        ax.set_ylim(c / 3, c * 3)
    else:
        ax.set_ylim(c - max(0.5, abs(c)), c + max(0.5, abs(c)))


def _round_plot(
    df: pd.DataFrame, y: str, ylabel: str, title: str, path: Path, bounds: tuple[float, float] | None = None
) -> None:
    """``y`` against the round, one line per method, mean with a ±1 std band over the engine trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (method, g) in enumerate(df.groupby("method", sort=False)):
        stats = g.groupby("round")[y].agg(["mean", "std"]).reset_index()
        x, mean = stats["round"].to_numpy(), stats["mean"].to_numpy(float)
        std = stats["std"].fillna(0).to_numpy(float)
        lo, hi = mean - std, mean + std
        if bounds is not None:
            lo, hi = np.maximum(lo, bounds[0]), np.minimum(hi, bounds[1])
        (line,) = ax.plot(
            x, mean, marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[i % len(LINESTYLES)],
            label=str(method), markersize=5, alpha=0.9,
        )  # fmt: skip
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if bounds is not None:
        ax.set_ylim(bounds[0] - 0.05, bounds[1] + 0.05)
    else:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _round_plots(res: Results, out: Path) -> list[str]:
    """A multi-round run: the honest metric and the detection F1 of the flagging methods per round."""
    s = res.per_round
    if not len(s) or s["round"].nunique() < 2:
        return []
    s = s[s[res.metric].notna()] if res.metric in s else s[:0]
    lines = []
    what = f"Honest clients' {res.metric_label} per round (log scale)"
    _round_plot(s, res.metric, res.metric_label, f"{what}; mean ± std over trials", out / "rounds.png")
    lines.append(f"- ![{what}](rounds.png) {what}.")
    f = res.per_round[res.per_round["method"].isin(_flaggers(res)) & (res.per_round["n_detectable"] > 0)]
    if len(f):
        what = "Detection F1 per round (methods that flag; rounds with a detectable client)"
        _round_plot(f, "f1", "detection F1", f"{what}; mean ± std over trials", out / "detection_rounds.png",
                    bounds=(0.0, 1.0))  # fmt: skip
        lines.append(f"- ![{what}](detection_rounds.png) {what}.")
    return lines


def _flaggers(res: Results) -> list[str]:
    """Methods that flagged someone in some round (detection F1 means nothing for the others)."""
    return [m for m, g in res.per_round.groupby("method", sort=False) if (g["n_flagged"] > 0).any()]


def _round_table(res: Results, y: str, methods: list[str]) -> list[str]:
    """Mean over trials of ``y`` per round (rows) and method (columns)."""
    s = res.per_round
    piv = s.groupby(["round", "method"])[y].mean().unstack()
    lines = ["| round | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
    for r, row in piv.iterrows():
        lines.append(f"| {r} | " + " | ".join(_fmt(float(row[m]), math.nan) for m in methods) + " |")
    return lines


def _bar_plot(df: pd.DataFrame, x: str, y: str, ylabel: str, title: str, path: Path, bounds=None) -> None:
    """Bars of ``y`` per value of ``x``: mean ± std over the engine trials of one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = df.groupby(x, sort=False)[y].agg(["mean", "std"]).reset_index()
    mean, std = stats["mean"].to_numpy(float), stats["std"].fillna(0).to_numpy(float)
    lo, hi = std, std
    if bounds is not None:
        lo, hi = np.minimum(std, mean - bounds[0]), np.minimum(std, bounds[1] - mean)
    fig, ax = plt.subplots(figsize=(0.7 * len(stats) + 2.5, 3.4))
    ax.bar(range(len(stats)), mean, yerr=[lo, hi], capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(stats)), [str(v) for v in stats[x]], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if bounds is not None:
        ax.set_ylim(bounds[0], bounds[1] + 0.05)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _heatmap(res: Results, gain: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    piv = gain.pivot_table(index=res.het, columns=FRACTION, values="gain", aggfunc="mean")
    fig, ax = plt.subplots(figsize=(1.2 * piv.shape[1] + 2.5, 0.8 * piv.shape[0] + 2))
    im = ax.imshow(piv.to_numpy(), origin="lower", cmap="viridis", aspect="auto")
    ax.set_xticks(range(piv.shape[1]), [f"{v:g}" for v in piv.columns])
    ax.set_yticks(range(piv.shape[0]), [f"{v:g}" for v in piv.index])
    ax.set_xlabel(FRACTION)
    ax.set_ylabel(res.het)
    lo, hi = float(np.nanmin(piv.to_numpy())), float(np.nanmax(piv.to_numpy()))
    for i in range(piv.shape[0]):
        for j in range(piv.shape[1]):
            v = piv.iat[i, j]
            bright = hi > lo and (v - lo) / (hi - lo) > 0.6  # viridis is light (yellow) at the top
            ax.text(j, i, f"{v:.2f}x", ha="center", va="center", color="k" if bright else "w", fontsize=8)
    fig.colorbar(im, ax=ax, label="FedAvg / CLAIR (honest clients)")
    others = [k for k in res.conditions if k not in (FRACTION, res.het) and res.varied(k)]
    over = "mean over seeds" + (f" and over {', '.join(others)}" if others else "")
    ax.set_title(f"CLAIR's gain over FedAvg ({over})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _gain(res: Results) -> pd.DataFrame:
    s = res.summary[res.summary["method"].isin(["clair", "fedavg"])]
    keys = [results.PARTITION, "trial", *res.params]
    wide = s.pivot_table(index=keys, columns="method", values=res.metric).reset_index()
    wide["gain"] = wide["fedavg"] / wide["clair"]
    return wide


def _table(df: pd.DataFrame, rows: list[str], col: str, y: str, col_order: list[Any]) -> list[str]:
    """A Markdown table: one row per combination of ``rows``, one column per value of ``col``."""
    head = [*rows] if rows else ["all runs"]
    # a parameter's values are labelled with its key; a method or attack name stands for itself
    labels = [
        f"{col} = {c:g}" if isinstance(c, float | int | np.floating | np.integer) else str(c)
        for c in col_order
    ]
    lines = ["| " + " | ".join(head + labels) + " |"]
    lines.append("|" + "---|" * (len(head) + len(col_order)))
    groups = df.groupby(rows, sort=True) if rows else [((), df)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        cells = [f"{v:g}" if isinstance(v, float | int | np.floating | np.integer) else str(v) for v in key]
        if not rows:
            cells = [f"{g[results.PARTITION].nunique()} run(s)"]
        for c in col_order:
            cells.append(_fmt(*_mean_std(g[g[col] == c][y])))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def build_report(
    results_dir: str | Path, out_dir: str | Path | None = None, plots: bool = True, heading_level: int = 1
) -> tuple[Path | None, str]:
    """Builds the report: the Markdown text, written with the PNG plots to ``out_dir``.

    Args:
        results_dir: A run directory or a gathered sweep.
        out_dir: Where ``report.md`` and the plots go (None: ``results_dir``, or nowhere when ``plots``
            is False: the Markdown is only returned).
        plots: Also draw the PNG plots.
        heading_level: Markdown level of the title (sections one below), e.g. 3 to embed it in a README.

    Returns:
        (path of ``report.md`` or None, the Markdown).

    Raises:
        ReportError: ``results_dir`` holds neither kind of results.
    """
    res = Results(results_dir)
    out = Path(out_dir) if out_dir is not None else (res.source if plots else None)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    methods = res.methods()
    h1, h2 = "#" * heading_level, "#" * (heading_level + 1)
    md = [f"{h1} Report: {res.base.get('name', res.source.name)}", ""]
    w = res.base.get("workload", {})
    md.append(
        f"{res.kind}, {res.n_runs} simulation(s), engine trials per simulation: {res.base.get('trials', 1)}; "
        f"workload {w.get('name')} with K={w.get('num_clients')}"
        + (
            f", p={w.get('p')}, q={w.get('q')}, r={w.get('true_rank', w.get('r'))}"
            if w.get("name") == "linear"
            else ""
        )
        + "; final round of each run; mean ± std over seeds."
    )
    if res.params:
        md.append("")
        md.append(
            "Swept: " + "; ".join(f"`{k}` ∈ {sorted(res.summary[k].unique().tolist())}" for k in res.params)
        )
    md += ["", f"{h2} Honest clients' {res.metric_label}", ""]
    md += _table(res.summary, res.conditions, "method", res.metric, methods)
    em = "honest_mean_exact_match"
    if res.metric == "honest_mean_test_loss" and em in res.summary and res.summary[em].notna().any():
        md += ["", f"{h2} Honest clients' exact match", ""]
        md += _table(res.summary, res.conditions, "method", em, methods)
    for col, title in (
        ("honest_mean_perplexity", "Honest clients' held-out perplexity (mean over clients of exp(loss))"),
        ("honest_mean_asr", "Backdoor attack success rate on the honest clients' models"),
    ):
        if col in res.summary and res.summary[col].notna().any():
            md += ["", f"{h2} {title}", ""]
            md += _table(res.summary, res.conditions, "method", col, methods)
    if "f1" in res.summary and res.summary["f1"].notna().any() and res.conditions:
        md += ["", f"{h2} Detection F1 (all contaminated clients with visible contamination)", ""]
        md += _table(res.summary, res.conditions, "method", "f1", methods)
    if res.kind == "run" and res.per_round["round"].nunique() > 1:
        md += ["", f"{h2} Per round: honest clients' {res.metric_label} (mean over trials)", ""]
        md += _round_table(res, res.metric, methods)
        asr = "honest_mean_asr"
        if asr in res.per_round and res.per_round[asr].notna().any():  # a backdoor in the mix
            md += ["", f"{h2} Per round: honest clients' backdoor attack success rate (mean over trials)", ""]
            md += _round_table(res, asr, methods)
        flaggers = _flaggers(res)
        if flaggers:
            md += ["", f"{h2} Per round: detection F1 of the methods that flag (mean over trials)", ""]
            md += _round_table(res, "f1", flaggers)
    f1 = attack_f1(res) if "clair" in methods else pd.DataFrame()
    if len(f1):
        visible = sorted(f1.groupby("attack")["n_detectable"].sum().loc[lambda s: s > 0].index)
        hidden = sorted(set(f1["attack"]) - set(visible))
        md += ["", f"{h2} CLAIR's detection F1 per attack", ""]
        if visible:
            md += _table(f1[f1["attack"].isin(visible)], res.conditions, "attack", "f1", visible)
        if hidden:
            md += [
                "",
                f"Left out (no client with energy outside U, judged by honest error): {', '.join(hidden)}.",
            ]
    can_gain = {"clair", "fedavg"} <= set(methods)
    if can_gain:
        md += ["", f"{h2} CLAIR's gain over FedAvg (FedAvg's honest {res.metric_label} / CLAIR's)", ""]
        g = _gain(res)
        rows = [k for k in res.conditions if k != FRACTION]
        if FRACTION in res.conditions:
            md += _table(g, rows, FRACTION, "gain", sorted(g[FRACTION].unique()))
        else:
            g["all"] = "gain"
            md += _table(g, rows, "all", "gain", ["gain"])
    if plots and out is not None:
        md += ["", f"{h2} Plots", ""]
        md += _plots(res, out, f1, can_gain)
    text = "\n".join(md) + "\n"
    if out is None:
        return None, text
    (out / "report.md").write_text(text)
    return out / "report.md", text


def _plots(res: Results, out: Path, f1: pd.DataFrame, can_gain: bool) -> list[str]:
    lines: list[str] = []

    def skip(name: str, why: str) -> None:
        lines.append(f"- `{name}` skipped: {why}.")

    def done(name: str, what: str, note: str) -> None:
        lines.append(f"- ![{what}]({name}) {what}{f' ({note})' if note else ''}.")

    if res.kind == "run":  # one configuration: bars per method and per attack, over the engine trials
        _bar_plot(
            res.summary, "method", res.metric, res.metric.removeprefix("honest_mean_").replace("_", " "),
            f"Honest clients' {res.metric_label} per method (mean ± std over trials)", out / "methods.png",
        )  # fmt: skip
        done("methods.png", f"Honest clients' {res.metric_label} per method", "")
        vis = f1[f1.groupby("attack")["n_detectable"].transform("sum") > 0] if len(f1) else f1
        if len(vis):  # attacks with nothing visible outside U (in-subspace ones) have no F1 to show
            _bar_plot(
                vis, "attack", "f1", "detection F1 (CLAIR)",
                "CLAIR's detection F1 per attack (mean ± std over trials)", out / "detection_attacks.png",
                bounds=(0.0, 1.0),
            )  # fmt: skip
            hidden = sorted(set(f1["attack"]) - set(vis["attack"]))
            note = f"left out, nothing to detect outside U: {', '.join(hidden)}" if hidden else ""
            done("detection_attacks.png", "CLAIR's detection F1 per attack", note)
        lines += _round_plots(res, out)
        return lines
    if not res.varied(FRACTION):
        skip("detection_f1.png", f"`{FRACTION}` was not varied")
        skip("honest_error.png", f"`{FRACTION}` was not varied")
    else:
        if len(f1):
            vis = f1[f1.groupby("attack")["n_detectable"].transform("sum") > 0]
            note = _line_plot(
                res, vis, FRACTION, "attack", "f1", "detection F1 (CLAIR)",
                "CLAIR's detection F1 per attack", out / "detection_f1.png", logy=False, bounds=(0.0, 1.0),
            )  # fmt: skip
            done("detection_f1.png", "Detection F1 vs contamination fraction per attack", note)
        else:
            skip("detection_f1.png", "CLAIR was not among the methods")
        note = _line_plot(
            res, res.summary, FRACTION, "method", res.metric, f"honest {res.metric_label} (log)",
            "Honest clients' error per method", out / "honest_error.png", logy=True,
        )  # fmt: skip
        done("honest_error.png", "Honest-client error vs contamination fraction per method", note)
    sub = (
        res.summary[res.summary["subspace_error"].notna()]
        if "subspace_error" in res.summary
        else res.summary[:0]
    )
    if not res.varied(NOISE):
        skip("subspace_error.png", f"`{NOISE}` was not varied")
    elif not len(sub):
        skip("subspace_error.png", "no method estimated a subspace")
    else:
        note = _line_plot(
            res, sub, NOISE, "method", "subspace_error", "subspace error ‖ÛÛᵀ − UUᵀ‖_F",
            "Subspace error vs noise", out / "subspace_error.png", logy=False,
        )  # fmt: skip
        done("subspace_error.png", "Subspace error vs noise level", note)
    if not (res.varied(FRACTION) and res.varied(res.het)):
        skip("gain_heatmap.png", f"needs both `{FRACTION}` and `{res.het}` varied")
    elif not can_gain:
        skip("gain_heatmap.png", "needs both clair and fedavg among the methods")
    else:
        _heatmap(res, _gain(res), out / "gain_heatmap.png")
        others = [k for k in res.conditions if k not in (FRACTION, res.het) and res.varied(k)]
        done(
            "gain_heatmap.png",
            "CLAIR's gain over FedAvg",
            f"averaged over {', '.join(others)}" if others else "",
        )
    return lines
