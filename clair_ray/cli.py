"""Command line: ``clair-ray run CONFIG [key=value ...]``, ``clair-ray config CONFIG [key=value ...]``,
``clair-ray sweep SWEEP [key=value ...]``, ``clair-ray report RESULTS_DIR``, ``clair-ray demo`` and
``clair-ray --version``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

# The package's modules are imported inside each command, so `clair-ray --help` and argument errors answer
# at once, without loading torch or Ray.


def _load(command: str, args: argparse.Namespace) -> Any:
    """The validated config of ``args``, or None after printing why not (the command then exits 2)."""
    from clair_ray.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"clair-ray {command}: {exc}", file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    from clair_ray.config import ConfigError

    cfg = _load("run", args)
    if cfg is None:
        return 2
    from clair_ray.engine import EngineError, RunInterrupted, run_experiment
    from clair_ray.results import format_summary

    t0 = time.perf_counter()
    print(
        f"clair-ray run {args.config}: {cfg.workload.num_clients} clients, methods "
        f"{', '.join(cfg.aggregation.methods)}, {cfg.trials} trial(s), output {cfg.output_dir}",
        flush=True,
    )
    try:
        res = run_experiment(cfg, progress=lambda msg: print(msg, flush=True))
    except RunInterrupted as exc:
        again = " ".join(
            ["clair-ray run", args.config, *[o for o in args.overrides if not o.startswith("resume=")]]
        )
        print(f"\nclair-ray run: {exc}; continue with: {again} resume=true", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError) as exc:  # bad input found when the workload read its data
        print(f"clair-ray run: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"clair-ray run: {exc}", file=sys.stderr)
        return 1
    print(
        f"\nfinished in {time.perf_counter() - t0:.1f}s; results in {res.out_dir}"
        + (f"; {res.restarts} actor restart(s)" if res.restarts else "")
        + (f"; {len(res.dropouts)} dropout(s)" if res.dropouts else "")
    )
    title = "final round" + (f", mean±std over {cfg.trials} trials" if cfg.trials > 1 else "")
    print(f"\nsummary ({title}):")
    print(format_summary(res.summary, res.detection))
    return 0


def _config(args: argparse.Namespace) -> int:
    from clair_ray.config import to_yaml

    cfg = _load("config", args)
    if cfg is None:
        return 2
    print(to_yaml(cfg), end="")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from clair_ray.config import ConfigError
    from clair_ray.sweep import SweepError, load_sweep, run_sweep

    try:
        sw = load_sweep(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"clair-ray sweep: {exc}", file=sys.stderr)
        return 2
    from clair_ray.engine import EngineError

    t0 = time.perf_counter()
    try:
        out = run_sweep(sw, progress=lambda msg: print(msg, flush=True))
    except (SweepError, EngineError) as exc:
        print(f"clair-ray sweep: {exc}", file=sys.stderr)
        return 1
    print(f"\nfinished in {time.perf_counter() - t0:.1f}s; results in {out}")
    print(f"report: clair-ray report {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from clair_ray.errors import ResultsError
    from clair_ray.report import ReportError, build_report

    try:
        path, text = build_report(
            args.results_dir, out_dir=args.out, plots=not args.markdown_only, heading_level=args.heading_level
        )
    except (ReportError, ResultsError, FileNotFoundError) as exc:
        print(f"clair-ray report: {exc}", file=sys.stderr)
        return 2
    if args.markdown_only:
        print(text, end="")
    else:
        print(f"wrote {path} and its plots")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from clair_ray.demo import main as demo_main  # lazy: the demo pulls in heavier dependencies

    return int(demo_main(list(args.rest)))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands ``run``, ``sweep``, ``report`` and ``demo``)."""
    from clair_ray import __version__

    parser = argparse.ArgumentParser(
        prog="clair-ray", description="Federated fine-tuning under contamination."
    )
    parser.add_argument("--version", action="version", version=f"clair-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run an experiment config",
        description="Runs an experiment config on Ray and writes config.yaml, clients/summary/detection/"
        "rounds.parquet, run.log and a checkpoint to its output_dir (a non-empty output_dir needs "
        "resume=true or overwrite=true). `clair-ray config CONFIG` prints every key with its value.",
    )
    run.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    run.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seed=3 output_dir=results/x"
    )
    run.set_defaults(func=_run)
    config = sub.add_parser("config", help="print the resolved, validated config (every key) and exit")
    config.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    config.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    config.set_defaults(func=_config)
    sweep = sub.add_parser("sweep", help="run a Ray Tune sweep (a config plus a sweep: section)")
    sweep.add_argument("config", nargs="?", help="sweep YAML (see configs/sweep_*.yaml)")
    sweep.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides, e.g. sweep.resume=true or trials=2"
    )
    sweep.set_defaults(func=_sweep)
    report = sub.add_parser("report", help="Markdown summary and PNG plots of a run or a sweep")
    report.add_argument("results_dir", help="a run directory or a sweep's gathered <name>-results directory")
    report.add_argument("--out", default=None, help="where report.md and the plots go (default: RESULTS_DIR)")
    report.add_argument(
        "--markdown-only",
        action="store_true",
        help="print the Markdown only (no plots; writes report.md only with --out)",
    )
    report.add_argument(
        "--heading-level", type=int, default=1, help="Markdown level of the title (3 to embed in a README)"
    )
    report.set_defaults(func=_report)
    # Listed for --help only: main() forwards "demo ..." before parsing.
    sub.add_parser("demo", help="a short demonstration of CLAIR (clair-ray demo --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point.

    Args:
        argv: Arguments (None: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # everything after "demo" belongs to the demo, flags included
        return _demo(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    if getattr(args, "config", "") is None:  # argparse would name key=value as missing too
        example = "configs/sweep_linear_small.yaml" if args.command == "sweep" else "configs/linear.yaml"
        print(
            f"clair-ray {args.command}: give a config file, e.g. clair-ray {args.command} {example} "
            "(the YAML files are in configs/)",
            file=sys.stderr,
        )
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # before or after the work itself (the run command handles its own)
        print("\nclair-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
