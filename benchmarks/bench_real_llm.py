"""SmolLM2-135M on Shakespeare: clair_ray's client training and evaluation vs plain peft, same work.

The work of ``configs/shakespeare_smollm2.yaml`` (LoRA r=4 on q/v/o/up/down of the top 3 of 30 layers,
batch 8, its data and its clients), on one CPU thread as one Ray client actor runs it:

* **training**, G client updates of ``--steps`` AdamW steps each:
  ``peft``: :meth:`HFCausalLMWorkload.train_one`, one client at a time on a resident peft model
  (``layers_to_transform``; the model's own forward through all 30 layers and the full logits, each
  batch cut to its longest row as transformers' padding collator does);
  ``clair_ray``: :meth:`HFCausalLMWorkload.train_batch` on the G clients at once (grouped adapters, the
  frozen 27 layers computed once per training line, the output layer in chunks over labelled tokens only).
  The frozen-prefix computation is inside the timing (the cache is emptied before each repeat).
* **evaluation of every method**, ``--methods`` adapters per client (as after a round: one model per method
  and honest client) on each client's held-out lines: ``peft``: load the adapter, ``evaluate_lm``, per
  (method, client); ``clair_ray``: :meth:`evaluate_clients` per method (16 clients per grouped forward,
  held-out prefixes computed once and reused by every method).

Both paths must agree (final training losses and held-out losses, float32 round-off); the script checks.
Configurations alternate within each repeat, so a busy machine slows both alike; it prints each ratio's
median and spread over the repeats. Where time goes: the output layer is 2·576·49,152 ≈ 57 MFLOP per
scored token each way, a decoder layer about 7 MFLOP per token; ``--profile`` prints measured shares.

Run (after the asset set-up in the README)::

    .venv/bin/python benchmarks/bench_real_llm.py --clients 8 --methods 10 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from clair_ray.config import load_config
from clair_ray.workloads import get_workload
from clair_ray.workloads.base import ClientJob

REPO = Path(__file__).resolve().parents[1]


def jobs_for(wl: object, clients: list[int]) -> list[ClientJob]:
    from clair_ray import seeds

    return [ClientJob(k, seeds.derive_seed(wl.cfg.seed, seeds.TRAIN, 0, 0, k)) for k in clients]  # type: ignore[attr-defined]


def train_peft(wl: object, clients: list[int]) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    losses = [wl.train_one(0, 0, k)[1] for k in clients]  # type: ignore[attr-defined]
    return time.perf_counter() - t0, losses


def train_grouped(wl: object, clients: list[int]) -> tuple[float, list[float]]:
    wl._prefixes.clear()  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    out = wl.train_batch(0, 0, jobs_for(wl, clients), None)  # type: ignore[attr-defined]
    return time.perf_counter() - t0, [i["train_loss"] for i in out.info]


def method_adapters(wl: object, clients: list[int], methods: int) -> list[dict[int, dict]]:
    """``methods`` adapters per client: small random LoRA factors (each method's model differs)."""
    gm = wl._resident()  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(methods):
        per: dict[int, dict] = {}
        for k in clients:
            per[k] = {
                n: (
                    rng.standard_normal((layer.out_features, layer.r)) * 0.02,
                    rng.standard_normal((layer.r, layer.in_features)) * 0.02,
                )
                for n, layer in gm.layers.items()
            }
        out.append(per)
    return out


def eval_peft(wl: object, clients: list[int], adapters: list[dict[int, dict]]) -> tuple[float, list[float]]:
    from clair_ray.workloads.lora import adapters as lora

    model = wl._evaluator()  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    losses = []
    for per in adapters:
        for k in clients:
            lora.load_factors(model, per[k])
            losses.append(lora.evaluate_lm(model, wl.test_data(0, k))["loss"])  # type: ignore[attr-defined]
    return time.perf_counter() - t0, losses


def eval_grouped(
    wl: object, clients: list[int], adapters: list[dict[int, dict]]
) -> tuple[float, list[float]]:
    wl._prefixes.clear()  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    losses = []
    for per in adapters:
        res = wl.evaluate_clients(0, clients, {}, per)  # type: ignore[attr-defined]
        losses.extend(res["test_loss"][clients].tolist())
    return time.perf_counter() - t0, losses


def profile(wl: object, clients: list[int]) -> None:
    """Shares of one grouped training step: the layers above the prefix vs the output layer."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    wl._prefixes.clear()  # type: ignore[attr-defined]
    wl.train_batch(0, 0, jobs_for(wl, clients), None)  # type: ignore[attr-defined]  # warm the prefix cache
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        wl.train_batch(0, 0, jobs_for(wl, clients), None)  # type: ignore[attr-defined]
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "shakespeare_smollm2.yaml"))
    ap.add_argument("--clients", type=int, default=8, help="client updates per training measurement (G)")
    ap.add_argument(
        "--steps", type=int, default=0, help="local AdamW steps per client update (0: the config's)"
    )
    ap.add_argument("--methods", type=int, default=10, help="adapters per client to evaluate (methods)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print a torch profile of one grouped update")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # No contamination: both paths evaluate the same held-out lines (no backdoor probe on one side only).
    over = ["workload.lora.early_steps=0", "aggregation.methods=[fedavg]", "contamination.fraction=0"]
    cfg = load_config(args.config, over + ([f"workload.lora.steps={args.steps}"] if args.steps else []))
    args.steps = cfg.workload.lora.steps
    wl = get_workload(cfg)
    wl.prepare()
    contaminated = set(wl.contamination(0).contaminated)
    clients = [k for k in range(cfg.workload.num_clients) if k not in contaminated][: args.clients]
    adapters = method_adapters(wl, clients, args.methods)
    wl._evaluator()  # load both resident models before timing
    lw = cfg.workload.lora
    print(
        f"SmolLM2-135M, {len(clients)} clients, {args.steps} steps x batch {lw.batch}, layers {lw.layers}, "
        f"targets {lw.targets}, r {lw.r}; evaluation: {args.methods} methods x {len(clients)} clients; "
        f"torch {torch.__version__}, 1 thread, {platform.processor() or platform.machine()}"
    )
    ratios: dict[str, list[float]] = {"training": [], "evaluation": []}
    for rep in range(args.repeats):
        tp, lp = train_peft(wl, clients)
        tg, lg = train_grouped(wl, clients)
        np.testing.assert_allclose(lg, lp, rtol=2e-3)  # same training, float32 round-off
        ep, ep_loss = eval_peft(wl, clients, adapters)
        eg, eg_loss = eval_grouped(wl, clients, adapters)
        np.testing.assert_allclose(eg_loss, ep_loss, rtol=1e-4)
        n_eval = args.methods * len(clients)
        print(
            f"repeat {rep}: training peft {len(clients) / tp:.3f} vs clair_ray {len(clients) / tg:.3f} "
            f"client-updates/s (x{tp / tg:.2f}); evaluation peft {n_eval / ep:.2f} vs clair_ray "
            f"{n_eval / eg:.2f} client-models/s (x{ep / eg:.2f})"
        )
        ratios["training"].append(tp / tg)
        ratios["evaluation"].append(ep / eg)
    for what, r in ratios.items():
        med = statistics.median(r)
        print(f"{what}: clair_ray / peft = x{med:.2f} (median of {len(r)}; range {min(r):.2f}-{max(r):.2f})")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of this process (both resident models): {rss:.2f} GiB")
    if args.profile:
        profile(wl, clients)


if __name__ == "__main__":
    main()
