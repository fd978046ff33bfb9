"""Throughput against Flower's simulation engine: the same federated LoRA job in Flower and in clair_ray.

The job is ``configs/bench_vs_flower.yaml``: FedAvg (FedIT: mean of the B's and of the A's) over K clients,
each round every client runs 10 local AdamW steps of LoRA (r=8) on a tiny GPT-2 copy task. Both systems
run it in this one invocation, one after the other, on the same cores:

* Flower (``flwr[simulation]``, which pins its own ray) runs in its own venv as a subprocess
  (``benchmarks/flower_copy_task.py``): ``run_simulation`` with 1 CPU per client, so two clients train at
  once on 2 cores; each client is ``CopyTaskWorkload.train_one`` (one client with plain peft).
* clair_ray runs ``run_experiment`` in this process (grouped LoRA training in long-lived actors).

Before timing either, the driver builds the cached pretrained base (``wl.prepare()``), so neither pays it.
Reported per system: the whole job's wall time (Ray start and shutdown included on both sides: Flower from
just before ``run_simulation`` to its return, clair_ray around ``run_experiment``; Flower's time from its
process start is shown too), steady-state client-updates/s (the rounds after the first: mean of
K / round wall time, training only: clair_ray's final evaluation inside its last round is left out, as
Flower's runs after its rounds) and the final global adapter's mean held-out loss; then the ratios
clair_ray/Flower (throughput) and Flower/clair_ray (wall time), and whether the final losses agree within 5%.

The first run creates the Flower venv (about 1.5 minutes: torch, flwr[simulation], the workload's deps
pinned to this venv's versions, clair_ray itself with ``--no-deps``). Keep ``.venv-flower/`` git-ignored.

Usage::

    .venv/bin/python benchmarks/vs_flower.py                                  # K=32, 3 rounds
    .venv/bin/python benchmarks/vs_flower.py --clients 64 --rounds 4 --json vs_flower.json
    .venv/bin/python benchmarks/vs_flower.py --skip-setup --only flower       # Flower's side alone
    .venv/bin/python benchmarks/vs_flower.py --torch-index-url https://download.pytorch.org/whl/cpu
        # on a machine without a local CPU torch wheel (a bare torch install pulls a CUDA build)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FLOWER_APP = REPO / "benchmarks" / "flower_copy_task.py"
FLWR_VERSION = "1.41.0"  # flwr[simulation] 1.41.0 pins ray==2.55.1
TORCH_VERSION = "2.13.0"  # the CPU build: install it before flwr, or pip resolves a CUDA torch
#: What clair_ray's copy-task workload imports, pinned in the Flower venv to this venv's versions.
WORKLOAD_DEPS = (
    "transformers",
    "peft",
    "accelerate",
    "huggingface_hub",
    "tokenizers",
    "safetensors",
    "omegaconf",
    "numpy",
    "pandas",
    "pyarrow",
)
RESULT_TAG = "FLOWER_RESULT"
LOSS_RTOL = 0.05


# ---------------------------------------------------------------------------------------------------------
# The Flower venv
# ---------------------------------------------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    """The venv's interpreter."""
    return venv / "bin" / "python"


def flower_venv_ready(venv: Path) -> bool:
    """True if the venv imports the pinned flwr, torch, peft and clair_ray."""
    py = venv_python(venv)
    if not py.exists():
        return False
    probe = (
        "import flwr, torch, peft, transformers, clair_ray.workloads, sys; "
        f"sys.exit(0 if flwr.__version__ == {FLWR_VERSION!r} else 1)"
    )
    return subprocess.run([str(py), "-c", probe], capture_output=True, cwd="/").returncode == 0


def pinned_workload_deps() -> list[str]:
    """``name==version`` for each of :data:`WORKLOAD_DEPS` as installed in this (clair_ray's) venv."""
    specs = []
    for name in WORKLOAD_DEPS:
        try:
            specs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            specs.append(name)
    return specs


def setup_flower_venv(venv: Path, torch_index_url: str | None = None) -> list[dict[str, Any]]:
    """Creates (or completes) the Flower venv; returns each install step's command and seconds.

    Order matters: the CPU torch first (flwr does not need torch, the workload does; installed later or
    bare it would be a CUDA build), then ``flwr[simulation]`` (pins ray==2.55.1), the workload's deps at
    this venv's versions, and clair_ray itself without its deps (they include ray>=2.60).

    Args:
        venv: Where the venv lives.
        torch_index_url: Optional index of CPU torch wheels (e.g. PyTorch's CPU index).

    Returns:
        ``[{"cmd": [...], "seconds": float}, ...]``.
    """
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet"]
    torch_cmd = [*pip, f"torch=={TORCH_VERSION}"]
    if torch_index_url:
        torch_cmd += ["--index-url", torch_index_url]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],  # this Python's version, as clair_ray's venv
        torch_cmd,
        [*pip, f"flwr[simulation]=={FLWR_VERSION}"],
        [*pip, *pinned_workload_deps()],
        [*pip, "--no-deps", "-e", str(REPO)],
    ]
    if venv_python(venv).exists():
        steps = steps[1:]
    log = []
    for cmd in steps:
        print("[setup] " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        log.append({"cmd": cmd, "seconds": time.perf_counter() - t0})
    return log


# ---------------------------------------------------------------------------------------------------------
# The two systems
# ---------------------------------------------------------------------------------------------------------


def steady_rate(round_s: list[float], clients: int) -> float:
    """Steady-state client-updates/s: mean of K / round wall time over the rounds after the first."""
    steady = round_s[1:] or round_s
    return float(sum(clients / s for s in steady) / len(steady))


def flower_env(flwr_home: str) -> dict[str, str]:
    """The Flower subprocess's environment: no runtime installs, telemetry or update checks, no Ray stats.

    PYTHONPATH, VIRTUAL_ENV and RAY_ADDRESS of this process are dropped: the subprocess uses only its
    own venv and starts its own local Ray (a ray 2.55 that could not join a ray 2.60 cluster anyway).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    env.update(
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=flwr_home,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_flower(args: argparse.Namespace, overrides: list[str], modules: list[str]) -> dict[str, Any]:
    """Runs the Flower side as a subprocess of the Flower venv and parses its result line.

    Args:
        args: The command line.
        overrides: Config overrides (K and rounds included).
        modules: Sorted LoRA module names (the NDArrays order).

    Returns:
        The app's result dict plus ``process_s`` (Popen to exit, as this driver sees it).

    Raises:
        RuntimeError: The subprocess failed or printed no result line.
    """
    cmd = [
        str(venv_python(args.flower_venv)),
        str(FLOWER_APP),
        "--config",
        str(args.config),
        "--clients",
        str(args.clients),
        "--rounds",
        str(args.rounds),
        "--client-cpus",
        str(args.flower_client_cpus),
        "--ray-cpus",
        str(args.ray_cpus),
        "--modules",
        json.dumps(modules),
    ]
    for item in overrides:
        cmd += ["--override", item]
    if args.verbose:
        cmd.append("--verbose")
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="flwr-home-") as flwr_home:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=flower_env(flwr_home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if args.verbose or not line.startswith(RESULT_TAG):
                print(f"[flower] {line}", end="", flush=True)
        rc = proc.wait()
        process_s = time.perf_counter() - t0
    results = [ln for ln in lines if ln.startswith(RESULT_TAG + " ")]
    if rc != 0 or not results:
        tail = "\n".join(lines[-40:])
        raise RuntimeError(f"the Flower run failed (exit {rc}); its last lines:\n{tail}")
    out = json.loads(results[-1][len(RESULT_TAG) + 1 :])
    out["process_s"] = process_s
    out["steady_updates_per_s"] = steady_rate([r["round_s"] for r in out["rounds"]], args.clients)
    return out


def run_clair(cfg: Any) -> dict[str, Any]:
    """Runs clair_ray's side in this process: ``run_experiment`` (Ray start and shutdown included).

    Args:
        cfg: The validated experiment config.

    Returns:
        Whole-job seconds, per-round timings, steady-state updates/s and the final mean held-out loss.
    """
    from clair_ray.engine.runner import run_experiment

    t0 = time.perf_counter()
    res = run_experiment(cfg, progress=lambda msg: print(f"[clair_ray] {msg}", flush=True))
    job_s = time.perf_counter() - t0
    rounds = res.rounds.to_dict("records") if hasattr(res.rounds, "to_dict") else list(res.rounds)
    rounds = [r for r in rounds if int(r.get("trial", 0)) == 0]
    clients = cfg.workload.num_clients
    return {
        "job_s": job_s,
        "rounds": rounds,
        "first_round_s": float(rounds[0]["round_s"]),
        # Training rounds only: the last round's held-out evaluation (eval_s) runs inside clair_ray's
        # round but after Flower's rounds (Flower's eval_s), so it is left out on both sides here and
        # counted in both whole-job times.
        "steady_updates_per_s": steady_rate(
            [float(r["round_s"]) - float(r.get("eval_s", 0.0)) for r in rounds], clients
        ),
        "eval_s": float(sum(float(r.get("eval_s", 0.0)) for r in rounds)),
        "final_loss": final_loss(res.summary),
        "out_dir": str(res.out_dir),
    }


def final_loss(summary: Any) -> float:
    """The final FedAvg adapter's mean held-out loss: the last round's row of method ``fedavg``."""
    rows = summary[(summary["method"] == "fedavg") & (summary["trial"] == 0)]
    rows = rows[rows["round"] == rows["round"].max()]
    for column in ("honest_mean_test_loss", "test_loss_mean", "mean_test_loss"):
        if column in rows.columns:
            return float(rows[column].iloc[0])
    raise KeyError(f"no test-loss column in the summary: {list(summary.columns)}")


def reference_update(wl: Any) -> tuple[list[str], float]:
    """One client update of the job in this process, single-threaded (warm: after a first call).

    Returns:
        (sorted LoRA module names: the NDArrays order of the Flower side, seconds of one update).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        factors, _ = wl.train_one(trial=0, round_=0, k=0, start=None)
        t0 = time.perf_counter()
        wl.train_one(trial=0, round_=0, k=1, start=factors)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return sorted(factors), seconds


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def report(
    results: dict[str, dict[str, Any]], clients: int, one_update_s: float, cores: int
) -> dict[str, Any]:
    """Prints the side-by-side table and returns the comparison numbers."""
    fl, cr = results.get("flower"), results.get("clair_ray")
    print(
        f"\nK={clients} clients; one client update (1 thread): {one_update_s:.3f}s, so one-client-"
        f"at-a-time training on {cores} cores tops out near {cores / one_update_s:.1f} updates/s"
    )
    header = (
        f"{'system':<10} {'whole job (s)':>14} {'first round (s)':>16} {'steady updates/s':>17} "
        f"{'final loss':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<10} {r['job_s']:>14.1f} {r['first_round_s']:>16.1f} {r['steady_updates_per_s']:>17.2f} "
            f"{r['final_loss']:>11.4f}"
        )
    if fl:
        print(f"(Flower's process, start to exit: {fl['process_s']:.1f}s; its eval {fl['eval_s']:.1f}s)")
    comparison: dict[str, Any] = {}
    if fl and cr:
        comparison = {
            "throughput_ratio": cr["steady_updates_per_s"] / fl["steady_updates_per_s"],
            "wall_ratio": fl["job_s"] / cr["job_s"],
            "loss_rel_diff": abs(cr["final_loss"] - fl["final_loss"]) / abs(fl["final_loss"]),
        }
        comparison["losses_agree"] = bool(comparison["loss_rel_diff"] <= LOSS_RTOL)
        print(
            f"\nthroughput clair_ray/Flower: {comparison['throughput_ratio']:.2f}x   "
            f"wall time Flower/clair_ray: {comparison['wall_ratio']:.2f}x   "
            f"final losses {'agree' if comparison['losses_agree'] else 'DIFFER'} "
            f"(relative difference {comparison['loss_rel_diff']:.1%}, tolerance {LOSS_RTOL:.0%})"
        )
    return comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/bench_vs_flower.yaml"))
    parser.add_argument("--override", action="append", default=[], help="config key=value, repeatable")
    parser.add_argument("--clients", type=int, default=32, help="K (workload.num_clients)")
    parser.add_argument("--rounds", type=int, default=3, help="workload.rounds")
    parser.add_argument("--flower-venv", type=Path, default=REPO / ".venv-flower")
    parser.add_argument("--skip-setup", action="store_true", help="use the Flower venv as it is")
    parser.add_argument("--torch-index-url", default=None, help="index of CPU torch wheels for the venv")
    parser.add_argument(
        "--flower-client-cpus", type=float, default=1.0, help="Ray num_cpus per Flower client"
    )
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 1, help="Flower's Ray CPUs")
    parser.add_argument("--only", choices=["flower", "clair_ray"], default=None, help="run one side only")
    parser.add_argument("--clair-first", action="store_true", help="run clair_ray before Flower")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--verbose", action="store_true", help="Flower's INFO logs and Ray worker output")
    args = parser.parse_args()
    args.flower_venv = args.flower_venv.resolve()
    os.chdir(REPO)  # config paths are relative to the repository, on both sides

    from clair_ray.config import load_config
    from clair_ray.workloads import get_workload

    overrides = [
        f"workload.num_clients={args.clients}",
        f"workload.rounds={args.rounds}",
        "overwrite=true",  # each measurement replaces the previous one's output
        *args.override,
    ]
    cfg = load_config(args.config, overrides)

    setup: list[dict[str, Any]] = []
    if args.only != "clair_ray" and not args.skip_setup and not flower_venv_ready(args.flower_venv):
        setup = setup_flower_venv(args.flower_venv, args.torch_index_url)
        if not flower_venv_ready(args.flower_venv):
            raise SystemExit(f"{args.flower_venv}: the Flower venv does not import flwr {FLWR_VERSION}")

    if args.only != "clair_ray" and not venv_python(args.flower_venv).exists():
        raise SystemExit(f"{args.flower_venv}: no Flower venv (run once without --skip-setup)")

    wl = get_workload(cfg)
    t0 = time.perf_counter()
    wl.prepare()  # the cached base, before timing either system
    prepare_s = time.perf_counter() - t0
    modules, one_update_s = reference_update(wl)

    order = ["clair_ray", "flower"] if args.clair_first else ["flower", "clair_ray"]
    if args.only:
        order = [args.only]
    results: dict[str, dict[str, Any]] = {}
    for name in order:
        print(f"\n=== {name} ===", flush=True)
        results[name] = run_flower(args, overrides, modules) if name == "flower" else run_clair(cfg)
    results = {name: results[name] for name in ("flower", "clair_ray") if name in results}

    cores = os.cpu_count() or 1
    comparison = report(results, args.clients, one_update_s, cores)
    if args.json:
        payload = {
            "clients": args.clients,
            "rounds": args.rounds,
            "config": str(args.config),
            "overrides": overrides,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores},
            "flwr_version": results.get("flower", {}).get("flwr_version", FLWR_VERSION),
            "setup": setup,
            "prepare_s": prepare_s,
            "one_update_s": one_update_s,
            "results": results,
            "comparison": comparison,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=_json_default))
        print(f"wrote {args.json}")


def _json_default(obj: Any) -> Any:
    """numpy scalars and paths in the JSON."""
    if hasattr(obj, "item"):
        value = obj.item()
        return None if isinstance(value, float) and math.isnan(value) else value
    return str(obj)


if __name__ == "__main__":
    main()
