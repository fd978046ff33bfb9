"""`clair-ray demo`: CLAIR on a synthetic instance of the linear model, beside FedAvg.

Usage::

    clair-ray demo                       # K=50 clients, p=64, q=16, r=4, 30% contaminated, OLS estimates
    clair-ray demo --clients 100 --fraction 0.2 --sigma 1.0 --seed 3

Each client fits multi-response least squares Y_k = X_k W_k + noise on its own n_k samples
(clair_ray.clair.synthetic.make_regression); honest W_k share the column subspace U, contaminated clients
send dense noise, another subspace, a partly-in-subspace update or a sign flip. The demo prints the
subspace error, who was flagged against who was contaminated, and the honest clients' mean error of the
local estimates, FedAvg, CLAIR's refinement and the oracle (which knows U and the honest set).
"""

from __future__ import annotations

import argparse
import time

import torch

from clair_ray.clair.api import clair
from clair_ray.clair.metrics import client_errors, detection_metrics, mean_error, subspace_error
from clair_ray.clair.refine import refine_dense
from clair_ray.clair.synthetic import CONTAMINATION_KINDS, IN_SUBSPACE_KINDS, make_regression


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``clair-ray demo``."""
    ap = argparse.ArgumentParser(prog="clair-ray demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50, help="number of clients K (default 50)")
    ap.add_argument("--p", type=int, default=64, help="features: the shared side (default 64)")
    ap.add_argument("--q", type=int, default=16, help="responses (default 16)")
    ap.add_argument("--rank", type=int, default=4, help="rank r of the shared subspace (default 4)")
    ap.add_argument("--fraction", type=float, default=0.3, help="contaminated fraction (default 0.3)")
    ap.add_argument("--samples", type=int, default=200, help="median samples per client n_k (default 200)")
    ap.add_argument("--sigma", type=float, default=1.0, help="response noise std (default 1.0)")
    ap.add_argument("--heterogeneity", type=float, default=1.0, help="spread of honest V_k (default 1.0)")
    ap.add_argument(
        "--kinds",
        default="dense_noise,other_subspace,partial,sign_flip",
        help=f"contamination kinds, comma-separated, from {', '.join(CONTAMINATION_KINDS)}",
    )
    ap.add_argument("--seed", type=int, default=0, help="root seed (default 0)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Runs the demo and prints its report. Returns the exit code."""
    args = build_parser().parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    gen = torch.Generator().manual_seed(args.seed + 1)
    # Quantity skew: n_k spread over [samples/2, 3 samples/2], never below p (OLS needs n_k >= p).
    low = max(args.p + 2, args.samples // 2)
    high = max(low + 1, 3 * args.samples // 2)
    samples = torch.randint(low, high, (args.clients,), generator=gen).tolist()
    inst = make_regression(
        args.clients,
        args.p,
        args.q,
        args.rank,
        samples=samples,
        fraction=args.fraction,
        kinds=kinds,
        heterogeneity=args.heterogeneity,
        sigma=args.sigma,
        seed=args.seed,
    )
    print(
        f"clair-ray demo: K={args.clients} clients, W_k is {args.p}x{args.q}, shared rank r={args.rank}, "
        f"{len(inst.contaminated)} contaminated ({', '.join(kinds)}), "
        f"n_k in [{min(samples)}, {max(samples)}], "
        f"noise sigma={args.sigma}, seed={args.seed}"
    )
    t0 = time.perf_counter()
    res = clair(inst.estimates, rank=args.rank, noise_scale=inst.noise_scale, seed=args.seed)
    secs = time.perf_counter() - t0
    info = res.info
    print(
        f"CLAIR: {info['problem']} via {info['solver']}, lam={info['lam']:.4g}, tau={info['tau']:.4g}, "
        f"noise estimate {info.get('noise_sigma', 0.0):.4g}, {secs:.2f} s"
    )

    honest = inst.honest
    est = inst.estimates
    fedavg = est.mean(dim=0)  # (p, q): FedAvg gives every client the plain mean
    fedavg_basis = torch.linalg.svd(fedavg, full_matrices=False)[0][:, : args.rank]
    oracle = refine_dense(list(est), inst.subspace, None, honest)
    errors = {
        "local": mean_error(client_errors(est, inst.truth), honest),
        "fedavg": mean_error(client_errors([fedavg] * len(est), inst.truth), honest),
        "clair": mean_error(client_errors(res.refined, inst.truth), honest),
        "oracle": mean_error(client_errors(oracle, inst.truth), honest),
    }
    invisible = [k for k in inst.contaminated if inst.kinds[k] in IN_SUBSPACE_KINDS]
    det = detection_metrics(set(res.contaminated) - set(invisible), inst.detectable())
    det_fedavg = detection_metrics([], inst.detectable())

    rows = [
        ("subspace error ||UU^T - U*U*^T||_F", f"{subspace_error(res.subspace, inst.subspace):.4f}",
         f"{subspace_error(fedavg_basis, inst.subspace):.4f}"),
        ("flagged clients", str(len(res.contaminated)), "0"),
        ("detection precision", f"{det['precision']:.3f}", f"{det_fedavg['precision']:.3f}"),
        ("detection recall", f"{det['recall']:.3f}", f"{det_fedavg['recall']:.3f}"),
        ("detection F1", f"{det['f1']:.3f}", f"{det_fedavg['f1']:.3f}"),
        ("honest mean error ||W~_k - W_k||_F", f"{errors['clair']:.4f}", f"{errors['fedavg']:.4f}"),
        ("gain over local estimates (local / method)", f"{errors['local'] / errors['clair']:.2f}x",
         f"{errors['local'] / errors['fedavg']:.2f}x"),
    ]  # fmt: skip
    w0 = max(len(r[0]) for r in rows)
    print()
    print(f"{'':<{w0}}  {'CLAIR':>10}  {'FedAvg':>10}")
    for label, a, b in rows:
        print(f"{label:<{w0}}  {a:>10}  {b:>10}")
    print()
    print(
        f"honest mean error: local {errors['local']:.4f}, oracle (knows U, honest set) {errors['oracle']:.4f}"
    )
    print(f"truly contaminated: {inst.contaminated}")
    print(f"  of which inside U (invisible to any subspace method): {invisible}")
    print(f"flagged by CLAIR:   {res.contaminated}")
    for k in res.contaminated[:3]:
        print(f"  client {k}: {res.reasons[k]}")
    if len(res.contaminated) > 3:
        print(f"  ... ({len(res.contaminated) - 3} more; see ClairResult.reasons)")
    return 0
