"""Command line: ``clair-ray run CONFIG [key=value ...]`` and ``clair-ray demo``.

``sweep`` and ``report`` come with a later issue.
"""

from __future__ import annotations

import argparse
import sys
import time


def _run(args: argparse.Namespace) -> int:
    from clair_ray.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"clair-ray run: {exc}", file=sys.stderr)
        return 2
    from clair_ray.engine import EngineError, run_experiment
    from clair_ray.results import format_summary

    t0 = time.perf_counter()
    print(
        f"clair-ray run {args.config}: {cfg.workload.num_clients} clients, methods "
        f"{', '.join(cfg.aggregation.methods)}, {cfg.trials} trial(s), output {cfg.output_dir}",
        flush=True,
    )
    try:
        res = run_experiment(cfg, progress=lambda msg: print(msg, flush=True))
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


def _demo(args: argparse.Namespace) -> int:
    from clair_ray.demo import main as demo_main  # lazy: the demo pulls in heavier dependencies

    return int(demo_main(list(args.rest)))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands ``run`` and ``demo``)."""
    parser = argparse.ArgumentParser(
        prog="clair-ray", description="Federated fine-tuning under contamination."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment config")
    run.add_argument("config", help="YAML config file (see configs/)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seed=3")
    run.set_defaults(func=_run)
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
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
