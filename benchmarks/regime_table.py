"""The regime-grid acceptance table of CLAIR's refinement rule from a gathered sweep.

For each cell of the swept keys (mean over the cell's trials): CLAIR's honest metric, the best of the
rivals the refinement issue names (local, FedAvg over the truly honest clients and every robust
baseline that ran), their ratio, the oracle, CLAIR's detection F1, its mean kept refinement rank and (with
``aggregation.refine: heldout``) the mean share of the deviation kept.
Prints a Markdown table and, at the end, the cells where CLAIR is within ``--tolerance`` of the best rival
and where it is strictly below all of them.

Run (after ``clair-ray sweep configs/sweep_copy_task_regimes.yaml``)::

    python benchmarks/regime_table.py results/sweeps/copy_task_regimes-results
    python benchmarks/regime_table.py results/sweeps/linear_regimes-results --metric error
"""

from __future__ import annotations

import argparse

import pandas as pd

from clair_ray import results

RIVALS = ("local", "fedavg_honest", "median", "trimmed_mean", "multi_krum", "geometric_median")
HIGHER_IS_BETTER = ("exact_match", "token_accuracy")


def cell_table(summary: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, list[str]]:
    """(one row per cell, the swept keys) from a gathered sweep's summary (last round)."""
    keys = [c for c in summary.columns if c.startswith(("workload.", "contamination.", "aggregation."))]
    last = summary[summary["round"] == summary["round"].max()]
    col = f"honest_mean_{metric}"
    rows = []
    for cell, g in last.groupby(keys, sort=True):
        means = g.groupby("method")[col].mean()
        rivals = [m for m in RIVALS if m in means.index]
        better_high = metric in HIGHER_IS_BETTER
        best_name = (means[rivals].idxmax() if better_high else means[rivals].idxmin()) if rivals else "-"
        clair = g[g["method"] == "clair"]
        row = dict(zip(keys, cell if isinstance(cell, tuple) else (cell,), strict=True))
        row.update(
            clair=means.get("clair", float("nan")),
            best=means.get(best_name, float("nan")),
            best_method=best_name,
            oracle=means.get("oracle", float("nan")),
            f1=float(clair["f1"].mean()),
            refine_rank=float(clair["refine_rank"].mean()) if "refine_rank" in clair else float("nan"),
            shrink=float(clair["refine_shrink"].mean()) if "refine_shrink" in clair else float("nan"),
        )
        row["ratio"] = row["best"] / row["clair"] if better_high else row["clair"] / row["best"]
        rows.append(row)
    return pd.DataFrame(rows), keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="a gathered sweep directory (NAME-results)")
    ap.add_argument("--metric", default="test_loss", help="honest_mean_<metric> column (default test_loss)")
    ap.add_argument("--tolerance", type=float, default=1.03, help="acceptance ratio (default 1.03)")
    args = ap.parse_args()
    table, keys = cell_table(results.load(args.sweep)["summary"], args.metric)
    head = [*keys, "clair", "best rival", "ratio", "oracle", "CLAIR F1", "kept rank", "kept share"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for _, r in table.iterrows():
        cells = [f"{r[k]:g}" for k in keys]
        cells += [
            f"{r['clair']:.3f}",
            f"{r['best']:.3f} ({r['best_method']})",
            f"{r['ratio']:.3f}",
            f"{r['oracle']:.3f}",
            f"{r['f1']:.3f}",
            f"{r['refine_rank']:.2f}",
            "-" if pd.isna(r["shrink"]) else f"{r['shrink']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")
    within = int((table["ratio"] <= args.tolerance).sum())
    below = int((table["ratio"] < 1.0).sum())
    print(
        f"\n{args.metric}: CLAIR within {args.tolerance:g} x the best rival in {within} of {len(table)} "
        f"cells, strictly better than all of them in {below}."
    )


if __name__ == "__main__":
    main()
