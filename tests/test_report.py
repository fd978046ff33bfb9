"""The report: tables and PNG plots from the stored sweep results (tests/data), skipped plots, the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib.image as mpimg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from clair_ray import cli
from clair_ray.report import ReportError, Results, attack_f1, build_report, read_sweep
from clair_ray.results import PARTITION

DATA = Path(__file__).resolve().parent / "data" / "sweep_linear_small"
PLOTS = ("detection_f1.png", "honest_error.png", "subspace_error.png", "gain_heatmap.png")


def test_stored_results_are_small_and_complete() -> None:
    assert sum(p.stat().st_size for p in DATA.iterdir()) < 200_000
    data = read_sweep(DATA)
    assert len(data["trials"]) == 8 and (data["trials"]["status"] == "complete").all()
    assert data["summary"][PARTITION].nunique() == 8


def test_report_builds_every_plot_from_the_stored_sweep(tmp_path: Path) -> None:
    path, text = build_report(DATA, out_dir=tmp_path)
    assert path == tmp_path / "report.md" and path.read_text() == text
    for name in PLOTS:
        img = mpimg.imread(tmp_path / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, name
        assert img[..., :3].std() > 0.05, f"{name} is blank"
        assert f"]({name})" in text
    assert "skipped" not in text
    for method in ("clair", "fedavg", "local", "oracle", "median"):
        assert f"| {method} " in text or f" {method} |" in text
    assert "contamination.fraction = 0.1" in text  # gain table columns are labelled with their key


def test_table_cells_are_the_data(tmp_path: Path) -> None:
    _, text = build_report(DATA, plots=False)
    s = read_sweep(DATA)["summary"]
    cell = s[
        (s["method"] == "clair")
        & (s["contamination.fraction"] == 0.3)
        & (s["workload.heterogeneity"] == 1.0)
        & (s["workload.noise_std"] == 0.1)
    ]["honest_mean_error"]
    assert len(cell) == 2  # two seeds
    row = next(line for line in text.splitlines() if line.startswith("| 0.3 | 1 | 0.1 |"))
    assert row.split(" | ")[3] == f"{cell.mean():.3g} ± {cell.std(ddof=0):.2g}"


def test_markdown_is_deterministic_and_holds_no_timings_or_ids() -> None:
    _, a = build_report(DATA, plots=False)
    _, b = build_report(DATA, plots=False)
    assert a == b
    assert "agg_s" not in a and "round_s" not in a
    for trial_id in read_sweep(DATA)["trials"][PARTITION]:
        assert trial_id not in a


def test_per_attack_f1_counts_honest_false_positives() -> None:
    f1 = attack_f1(Results(DATA))
    assert set(f1["attack"]) == {"gaussian_noise", "other_subspace", "sign_flip"}
    assert f1["f1"].between(0, 1).all()
    assert f1.groupby("attack")["n_detectable"].sum()["sign_flip"] == 0  # inside U: invisible


def _single_run(tmp_path: Path) -> Path:
    """One trial of the stored sweep, laid out as a `clair-ray run` directory."""
    run = tmp_path / "run"
    run.mkdir()
    data = read_sweep(DATA)
    first = data["trials"][PARTITION].iloc[0]
    for name in ("clients", "summary", "detection"):
        df = data[name]
        df = df[df[PARTITION] == first].drop(columns=[PARTITION, *Results(DATA).params])
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), run / f"{name}.parquet")
    base = OmegaConf.load(DATA / "sweep.yaml").base
    (run / "config.yaml").write_text(OmegaConf.to_yaml(base))
    return run


def test_a_single_run_draws_bars_instead_of_sweep_plots(tmp_path: Path) -> None:
    run = _single_run(tmp_path)
    path, text = build_report(run)
    assert path == run / "report.md"
    # One configuration: no sweep plots, but per-method and per-attack bars over its engine trials.
    assert not any((run / name).exists() for name in PLOTS)
    assert "](methods.png)" in text and "](detection_attacks.png)" in text
    assert "| 1 run(s) |" in text


def test_cli_markdown_only_prints_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "data"
    shutil.copytree(DATA, copy)
    assert cli.main(["report", str(copy), "--markdown-only"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Report: linear_small") and "## Honest clients' mean error" in out
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in DATA.iterdir())
    assert cli.main(["report", str(copy), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "gain_heatmap.png").exists()


def test_cli_rejects_a_directory_without_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    with pytest.raises(ReportError):
        Results(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_cli_names_a_corrupt_or_missing_table_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    run = _single_run(tmp_path)
    table = run / "detection.parquet"
    if damage == "truncated":
        table.write_bytes(table.read_bytes()[:100])
    elif damage == "garbage":
        table.write_text("not parquet")
    else:
        table.unlink()
    assert cli.main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"clair-ray report: {table}: ")
    assert ("missing" if damage == "missing" else "not a readable Parquet file") in err
    assert "Traceback" not in err


def test_readme_tables_are_the_reports_own_output() -> None:
    """The README's sweep tables sit between these markers and must equal the report's output."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- report: tests/data/sweep_linear_small -->\n", "<!-- /report -->"
    if start not in readme:
        pytest.skip("README.md has no report block yet")
    block = readme.split(start, 1)[1].split(end, 1)[0]
    _, text = build_report(DATA, plots=False, heading_level=3)
    assert block.strip() == text.strip(), (
        "regenerate: clair-ray report tests/data/sweep_linear_small --markdown-only --heading-level 3"
    )


def test_error_bars_are_over_seeds_only() -> None:
    """A point averaged over a swept condition (noise_std) gets the spread of its seeds, not of the
    condition: each seed is first averaged over the noise levels."""
    from clair_ray.report import _over_seeds

    res = Results(DATA)
    s = res.summary[(res.summary["method"] == "clair") & (res.summary["workload.heterogeneity"] == 1.0)]
    stats = _over_seeds(res, s, ["contamination.fraction"], "honest_mean_error").set_index(
        "contamination.fraction"
    )
    for frac, g in s.groupby("contamination.fraction"):
        per_seed = g.groupby("trial")["honest_mean_error"].mean()  # seeds: the engine trials; noise averaged
        assert stats.loc[frac, "count"] == per_seed.size == 2
        assert stats.loc[frac, "std"] == pytest.approx(per_seed.std())
        assert stats.loc[frac, "std"] < g["honest_mean_error"].std()  # pooling would mix in the noise levels
