"""CLAIR scale and solver benchmark. Prints ratios measured in the same run.

Usage (from the repository root, with the project's virtual environment):

    python benchmarks/bench_clair.py                      # full size: K=1000, 4096 x 4096, LoRA rank 16
    python benchmarks/bench_clair.py --quick              # small sanity size, a few seconds
    python benchmarks/bench_clair.py --json out.json      # also dump every number as JSON
    python benchmarks/bench_clair.py --skip-cvxpy         # part 1 only
    python benchmarks/bench_clair.py --skip-fast          # part 2 only

Part 1, fast path against its floor. K clients share one p x q module (p = q = --dim) with LoRA rank r.
Honest clients have B_k = U V_k + noise with U (p, r) orthonormal and shared, V_k (r, r) their own; a
--fraction of clients is contaminated from another subspace (B_k = U'_k V_k, U'_k a random rank-r
subspace per client, rescaled to the honest median norm, same noise). A_k is Gaussian. Everything is
built in float32 as factor pairs: the dense p x Kq stack (K p q 4 bytes, 64 GB at full size) is never
formed. Timed, best of --repeats, in the same process:
    fast   clair_ray.clair(pairs, rank=r, solver="fast", refine=0)  (the whole call: checks, padding,
           compaction, randomized fit, detection, factored refinement object; refine=0 because the
           "auto" rule's rotation null at this size takes minutes, see RESULTS.md)
    floor  torch.svd_lowrank(C, q=r+10, niter=2) on the compact p x (K r) float32 matrix C (row-major,
           ops.compact_factors on the stacked factors, then ops.stack; clair builds the same matrix pair
           by pair, column-major, inside the timed call: ops.compact_pairs); building C is not part of
           the floor.
It prints fast/floor (target <= 3), detection precision/recall/F1 against the true contaminated set,
the sin-Theta subspace error against the true U, and the peak resident memory (ru_maxrss) of a child
process (``subprocess``) that only builds the pairs and runs the fast path, beside the dense stack's size.

Part 2, exact ADMM against cvxpy on a small P1 instance at equal accuracy. A small instance
(K=20, p=20, q=5, r=3, 20% contaminated, noise 0.05) with (lam, tau) chosen by clair's own parameter
rule (``clair(..., solver="admm").info``), checked to give a non-trivial L and S. P1 is solved by cvxpy
(SCS with eps 1e-9 by default; --cvxpy-solvers SCS,CLARABEL adds Clarabel, which took 80 s on this
instance and ended 3e-9 above SCS's objective) and by ``clair_ray.clair.admm.solve_p1``; every objective
is evaluated by the same function (``admm.p1_objective``) in float64. The ADMM tolerance is the loosest of
1e-4 ... 1e-12 whose objective agrees with the best cvxpy objective to <= 1e-6 relative; a "strict" line
also asks L and S within 1e-4 relative of cvxpy's (the test suite's bar). Times are wall clock, best of
several runs: cvxpy's includes building the problem (what a user pays; the solver-only time is printed
too); ADMM's is with 1 intra-op thread (the exact path's own setting) and with the default count.
It prints cvxpy/admm per cvxpy solver (target >= 100).

The machine's load changes timings: run it more than once and compare; --threads 1 is steadier on a
small, busy machine (intra-op threads spin when the cores are taken).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import torch

import clair_ray
from clair_ray.clair.metrics import detection_metrics, subspace_error
from clair_ray.clair.ops import compact_factors, stack

GIB = 1024**3


# ----------------------------------------------------------------------------------------------------
# Part 1: fast path against the floor
# ----------------------------------------------------------------------------------------------------


def make_lora_pairs(
    clients: int, dim: int, lora_rank: int, fraction: float, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Builds float32 LoRA factors of K clients without any dense p x q update.

    Args:
        clients: K.
        dim: p = q.
        lora_rank: r (LoRA rank = shared subspace rank).
        fraction: Contaminated fraction (another random rank-r subspace per contaminated client).
        noise: Frobenius norm of the noise on B_k relative to the honest B_k's.
        seed: Seed.

    Returns:
        B (K, p, r), A (K, r, q), the true U (p, r), and the sorted contaminated indices.
    """
    gen = torch.Generator().manual_seed(seed)
    p = q = dim
    r = lora_rank
    f32 = torch.float32
    u, _ = torch.linalg.qr(torch.randn(p, r, generator=gen, dtype=f32))  # (p, r)
    n_bad = round(fraction * clients)
    contaminated = sorted(torch.randperm(clients, generator=gen)[:n_bad].tolist())
    v_bar = torch.randn(r, r, generator=gen, dtype=f32)  # (r, r) common part of the coefficients
    coeffs = v_bar + torch.randn(clients, r, r, generator=gen, dtype=f32)  # (K, r, r) client's own V_k
    b = torch.matmul(u, coeffs)  # (K, p, r): U V_k
    honest_norm = float(torch.linalg.vector_norm(b, dim=(1, 2)).median())
    for k in contaminated:
        other, _ = torch.linalg.qr(torch.randn(p, r, generator=gen, dtype=f32))  # (p, r) random subspace
        bk = other @ coeffs[k]
        b[k] = bk * (honest_norm / float(torch.linalg.matrix_norm(bk)))
    # Noise of relative Frobenius size `noise`: entries of std noise * ||U V|| / sqrt(p r).
    b += (noise * honest_norm / math.sqrt(p * r)) * torch.randn(clients, p, r, generator=gen, dtype=f32)
    a = torch.randn(clients, r, q, generator=gen, dtype=f32) / math.sqrt(q)  # (K, r, q)
    return b, a, u, contaminated


def best_time(fn, repeats: int) -> tuple[float, list[float], Any]:
    """Runs ``fn`` ``repeats`` times; returns the best wall time, all times and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, out


def vm_hwm_bytes() -> float:
    """Peak resident set of this process's address space (/proc/self/status VmHWM), NaN if unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


def child_fast_memory(args: argparse.Namespace) -> dict[str, float]:
    """Entry point of the memory child: builds the pairs, runs the fast path once, reports ru_maxrss."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    # ru_maxrss is in kilobytes on Linux. It also keeps the parent's RSS at fork time (Linux carries it
    # across fork + exec), which is why the parent starts this child before it builds anything large.
    # VmHWM (the peak RSS of this process's own address space, reset by exec) is reported beside it.
    before_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hwm_before = vm_hwm_bytes()
    b, a, _, _ = make_lora_pairs(args.clients, args.dim, args.lora_rank, args.fraction, args.noise, args.seed)
    pairs = [(b[k], a[k]) for k in range(args.clients)]
    after_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    res = clair_ray.clair(pairs, rank=args.lora_rank, solver="fast", seed=args.seed, refine=0)
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "peak_rss_bytes": float(peak),
        "vm_hwm_bytes": float(vm_hwm_bytes()),
        "vm_hwm_before_inputs_bytes": float(hwm_before),
        "rss_before_inputs_bytes": float(before_inputs),
        "peak_rss_after_inputs_bytes": float(after_inputs),
        "fast_seconds_in_child": elapsed,
        "flagged": float(len(res.contaminated)),
    }


def run_memory_child(args: argparse.Namespace) -> dict[str, float]:
    """Starts a fresh interpreter that runs only the fast path and returns its ru_maxrss report."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child-fast-memory",
        "--clients",
        str(args.clients),
        "--dim",
        str(args.dim),
        "--lora-rank",
        str(args.lora_rank),
        "--fraction",
        str(args.fraction),
        "--noise",
        str(args.noise),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads or torch.get_num_threads()),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed (rc {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_fast(args: argparse.Namespace) -> dict[str, Any]:
    k, p, r = args.clients, args.dim, args.lora_rank
    print(
        f"\n== Part 1: fast path vs floor  (K={k}, p=q={p}, LoRA rank {r}, {args.fraction:.0%} contaminated)"
    )
    # The memory child runs first, while this process is still small (see child_fast_memory).
    mem = None if args.skip_memory else run_memory_child(args)
    t0 = time.perf_counter()
    b, a, u, truth = make_lora_pairs(k, p, r, args.fraction, args.noise, args.seed)
    pairs = [(b[i], a[i]) for i in range(k)]  # float32 views, one (B_k, A_k) per client
    print(f"built {k} factor pairs in {time.perf_counter() - t0:.1f} s")

    # The floor's input, built as clair builds it (not timed as part of the floor).
    t0 = time.perf_counter()
    c_mat = stack(compact_factors(b, a))  # (p, K r) float32
    build_c = time.perf_counter() - t0
    assert c_mat.dtype == torch.float32 and c_mat.shape == (p, k * r)

    def run_fast():  # detection only: refine="auto"'s null at this size costs minutes (RESULTS.md)
        return clair_ray.clair(pairs, rank=r, solver="fast", seed=args.seed, refine=0)

    def run_floor():
        return torch.svd_lowrank(c_mat, q=r + 10, niter=2)

    # One untimed warm-up of the floor (allocator, thread pool; the fast path's first call pays that too
    # and best-of-N drops it), then interleaved repeats so that a burst of load on the machine hits both.
    run_floor()
    fast_times, floor_times = [], []
    res = None
    for _ in range(args.repeats):
        tf, _, _ = best_time(run_floor, 1)
        floor_times.append(tf)
        tc, _, res = best_time(run_fast, 1)
        fast_times.append(tc)
    fast_s, floor_s = min(fast_times), min(floor_times)
    det = detection_metrics(res.contaminated, truth)
    err = subspace_error(res.subspace, u)
    out: dict[str, Any] = {
        "clients": k,
        "dim": p,
        "lora_rank": r,
        "fraction": args.fraction,
        "noise": args.noise,
        "fast_seconds": fast_s,
        "fast_seconds_all": fast_times,
        "floor_seconds": floor_s,
        "floor_seconds_all": floor_times,
        "build_compact_seconds": build_c,
        "fast_over_floor": fast_s / floor_s,
        "fast_iterations": res.info.get("iterations"),
        "precision": det["precision"],
        "recall": det["recall"],
        "f1": det["f1"],
        "flagged": len(res.contaminated),
        "true_contaminated": len(truth),
        "subspace_error": err,
        "dense_stack_bytes": float(k * p * p * 4),
        "compact_bytes": float(c_mat.numel() * 4),
    }
    print(f"fast   clair(solver='fast'):  best {fast_s:.3f} s   all {[round(t, 3) for t in fast_times]}")
    print(
        f"floor  svd_lowrank(C, q={r + 10}, niter=2): best {floor_s:.3f} s   "
        f"all {[round(t, 3) for t in floor_times]}"
    )
    print(f"(building C = stack(compact_factors(B, A)) outside the floor: {build_c:.3f} s)")
    print(f"fast/floor = {out['fast_over_floor']:.2f}   (target <= 3)")
    print(
        f"detection: flagged {len(res.contaminated)} of {len(truth)} true;  "
        f"precision {det['precision']:.4f}  "
        f"recall {det['recall']:.4f}  F1 {det['f1']:.4f};  subspace error {err:.3e};  "
        f"iterations {res.info.get('iterations')}"
    )
    # (pairs, C and the factors stay alive here, about 1 GB; the child below measures its own memory.)
    if mem is not None:
        out.update(mem)
        print(
            "peak memory (ru_maxrss of a child running only the fast path): "
            f"{mem['peak_rss_bytes'] / GIB:.2f} GiB (VmHWM {mem['vm_hwm_bytes'] / GIB:.2f} GiB)"
            f"  (interpreter {mem['rss_before_inputs_bytes'] / GIB:.2f} GiB, after building the inputs "
            f"{mem['peak_rss_after_inputs_bytes'] / GIB:.2f} GiB);  dense p x Kq stack would be "
            f"{out['dense_stack_bytes'] / GIB:.1f} GiB ({out['dense_stack_bytes'] / 1e9:.1f} GB);  "
            f"child's fast call {mem['fast_seconds_in_child']:.2f} s"
        )
    return out


# ----------------------------------------------------------------------------------------------------
# Part 2: ADMM against cvxpy on a small P1 instance
# ----------------------------------------------------------------------------------------------------


def cvxpy_p1(m, lam: float, tau: float, solver: str):
    """P1 written out literally in cvxpy (no offset). Returns (L, S) as (K, p, w) arrays and solver time."""
    import cvxpy as cp
    import numpy as np

    k, p, w = m.shape
    low = [cp.Variable((p, w)) for _ in range(k)]
    sparse = [cp.Variable((p, w)) for _ in range(k)]
    fit = 0.5 * sum(cp.sum_squares(m[i] - low[i] - sparse[i]) for i in range(k))
    pen = tau * cp.normNuc(cp.hstack(low)) + lam * sum(cp.norm(s, "fro") for s in sparse)
    prob = cp.Problem(cp.Minimize(fit + pen))
    if solver == "SCS":
        prob.solve(solver=cp.SCS, eps=1e-9, max_iters=200_000)
    else:
        prob.solve(solver=cp.CLARABEL)
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"cvxpy {solver}: status {prob.status}")
    return (
        np.stack([v.value for v in low]),
        np.stack([v.value for v in sparse]),
        float(prob.solver_stats.solve_time or float("nan")),
        prob.status,
    )


def part_admm(args: argparse.Namespace) -> dict[str, Any]:
    from clair_ray.clair.admm import p1_objective, solve_p1
    from clair_ray.clair.synthetic import make_instance

    kc, pc, qc, rc = 20, 20, 5, 3
    print(f"\n== Part 2: ADMM vs cvxpy on P1  (K={kc}, p={pc}, q={qc}, r={rc}, 20% contaminated, sigma 0.05)")
    inst = make_instance(kc, pc, qc, rc, fraction=0.2, sigma=0.05, seed=args.seed)
    m = inst.estimates  # (K, p, q) float64
    auto = clair_ray.clair(m, rank=rc, solver="admm")
    lam, tau = float(auto.info["lam"]), float(auto.info["tau"])
    ref = solve_p1(m, lam, tau, tol=1e-12, max_iter=200_000)
    s_blocks = int((torch.linalg.vector_norm(ref.sparse, dim=(1, 2)) > 1e-8).sum())
    print(
        f"lam = {lam:.6g}, tau = {tau:.6g} (clair's parameter rule, problem {auto.info.get('problem')}); "
        f"at the optimum rank(L) = {ref.rank}, {s_blocks} non-zero S blocks, "
        f"true contaminated {len(inst.contaminated)}"
    )
    if ref.rank == 0 or s_blocks == 0:
        raise RuntimeError("the P1 instance is trivial (L or S is zero); pick another seed")

    def objective(low, sparse) -> float:
        return p1_objective(m, torch.as_tensor(low), torch.as_tensor(sparse), None, lam, tau)

    m_np = m.numpy()
    cvx: dict[str, dict[str, Any]] = {}
    for name in args.cvxpy_solvers.upper().split(","):
        holder: dict[str, Any] = {}

        def run(name=name, holder=holder):
            holder["out"] = cvxpy_p1(m_np, lam, tau, name)

        try:
            best, all_t, _ = best_time(run, args.cvxpy_repeats)
        except Exception as exc:  # a missing solver should not hide the other one
            print(f"cvxpy {name}: failed: {exc}")
            continue
        low, sparse, solve_only, status = holder["out"]
        cvx[name] = {
            "seconds": best,
            "seconds_all": all_t,
            "solver_only_seconds": solve_only,
            "objective": objective(low, sparse),
            "status": status,
            "low_rank": low,
            "sparse": sparse,
        }
    if not cvx:
        raise RuntimeError("no cvxpy solver ran")
    obj_ref = min(v["objective"] for v in cvx.values())

    best_name = min(cvx, key=lambda n: cvx[n]["objective"])
    low_ref, sparse_ref = cvx[best_name]["low_rank"], cvx[best_name]["sparse"]

    def rel(x: torch.Tensor, ref) -> float:
        ref_t = torch.as_tensor(ref)
        return float(torch.linalg.vector_norm(x - ref_t) / torch.linalg.vector_norm(ref_t).clamp_min(1e-300))

    # "Equal accuracy": the loosest ADMM tolerance whose objective agrees with the best cvxpy objective to
    # <= 1e-6 relative. "Strict": also L and S within 1e-4 relative of cvxpy's (the test suite's bar).
    tols = (1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12)
    chosen: dict[str, tuple[float, Any]] = {}
    for tol in tols:
        d = solve_p1(m, lam, tau, tol=tol, max_iter=200_000)
        gap = abs(d.objective - obj_ref) / abs(obj_ref)
        if gap <= 1e-6 and "objective" not in chosen:
            chosen["objective"] = (tol, d)
        if gap <= 1e-6 and rel(d.low_rank, low_ref) <= 1e-4 and rel(d.sparse, sparse_ref) <= 1e-4:
            chosen["strict"] = (tol, d)
            break
    if "objective" not in chosen:
        raise RuntimeError("ADMM never reached 1e-6 relative agreement with cvxpy")
    tol, dec = chosen["objective"]
    threads_before = torch.get_num_threads()
    n_rep = max(5, args.repeats * 3)

    def time_admm(t: float, threads: int) -> tuple[float, list[float]]:
        torch.set_num_threads(threads)
        try:
            best, all_t, _ = best_time(lambda: solve_p1(m, lam, tau, tol=t, max_iter=200_000), n_rep)
        finally:
            torch.set_num_threads(threads_before)
        return best, all_t

    admm_1t, admm_1t_all = time_admm(tol, 1)
    admm_nt, admm_nt_all = time_admm(tol, threads_before)
    strict = None
    if "strict" in chosen:
        s_tol, s_dec = chosen["strict"]
        s_time, _ = time_admm(s_tol, 1)
        strict = {
            "tol": s_tol,
            "iterations": s_dec.iterations,
            "objective": s_dec.objective,
            "rel_gap": abs(s_dec.objective - obj_ref) / abs(obj_ref),
            "low_rank_rel_diff": rel(s_dec.low_rank, low_ref),
            "sparse_rel_diff": rel(s_dec.sparse, sparse_ref),
            "seconds_1thread": s_time,
        }
    out: dict[str, Any] = {
        "instance": {"K": kc, "p": pc, "q": qc, "r": rc, "sigma": 0.05, "fraction": 0.2},
        "lam": lam,
        "tau": tau,
        "rank_L": ref.rank,
        "nonzero_S_blocks": s_blocks,
        "admm_tol": tol,
        "admm_iterations": dec.iterations,
        "admm_objective": dec.objective,
        "cvxpy_best_objective": obj_ref,
        "admm_rel_gap": abs(dec.objective - obj_ref) / abs(obj_ref),
        "admm_low_rank_rel_diff": rel(dec.low_rank, low_ref),
        "admm_sparse_rel_diff": rel(dec.sparse, sparse_ref),
        "cvxpy_reference_solver": best_name,
        "strict": strict,
        "admm_seconds_1thread": admm_1t,
        "admm_seconds_1thread_all": admm_1t_all,
        "admm_seconds_default_threads": admm_nt,
        "admm_seconds_default_threads_all": admm_nt_all,
        "default_threads": threads_before,
        "cvxpy": cvx,
    }
    print(
        f"ADMM solve_p1: tol {tol:g}, {dec.iterations} iterations, objective {dec.objective:.12g}, "
        f"best {admm_1t * 1e3:.2f} ms (1 thread), {admm_nt * 1e3:.2f} ms ({threads_before} threads)"
    )
    for name, v in cvx.items():
        gap = abs(v["objective"] - obj_ref) / abs(obj_ref)
        v["rel_gap_to_best"] = gap
        v["over_admm_1thread"] = v["seconds"] / admm_1t
        v["over_admm_default_threads"] = v["seconds"] / admm_nt
        v["solver_only_over_admm_1thread"] = v["solver_only_seconds"] / admm_1t
        print(
            f"cvxpy {name:8s}: objective {v['objective']:.12g} (status {v['status']}, "
            f"rel. gap to best {gap:.1e}), "
            f"best {v['seconds']:.3f} s incl. building ({v['solver_only_seconds']:.3f} s in the solver)"
        )
    gap_admm = out["admm_rel_gap"]
    print(
        f"ADMM vs best cvxpy ({best_name}): objective relative gap {gap_admm:.2e} (required <= 1e-6); "
        f"L differs by {out['admm_low_rank_rel_diff']:.1e}, S by {out['admm_sparse_rel_diff']:.1e} (relative)"
    )
    for name, v in cvx.items():
        v.pop("low_rank")
        v.pop("sparse")
        print(
            f"cvxpy[{name}]/admm = {v['over_admm_1thread']:.0f}  (1 thread; "
            f"{v['over_admm_default_threads']:.0f} with {threads_before} threads; "
            f"solver-only {v['solver_only_over_admm_1thread']:.0f})  (target >= 100)"
        )
        if strict is not None:
            v["over_admm_strict_1thread"] = v["seconds"] / strict["seconds_1thread"]
    if strict is not None:
        print(
            f"strict (objective <= 1e-6 and L, S within 1e-4 of cvxpy's): ADMM tol {strict['tol']:g}, "
            f"{strict['iterations']} iterations, {strict['seconds_1thread'] * 1e3:.2f} ms (1 thread), L diff "
            f"{strict['low_rank_rel_diff']:.1e}, S diff {strict['sparse_rel_diff']:.1e};  "
            + ", ".join(f"cvxpy[{n}]/admm = {v['over_admm_strict_1thread']:.0f}" for n, v in cvx.items())
        )
    else:
        print("strict: no ADMM tolerance down to 1e-12 brought L and S within 1e-4 of cvxpy's")
    return out


# ----------------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    try:
        import ray

        ray_version = ray.__version__
    except Exception:  # ray is not needed by the benchmark itself
        ray_version = "not installed"
    try:
        import cvxpy

        cvxpy_version = cvxpy.__version__
    except Exception:
        cvxpy_version = "not installed"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray_version,
        "cvxpy": cvxpy_version,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--clients", type=int, default=1000, help="K (default 1000)")
    ap.add_argument("--dim", type=int, default=4096, help="p = q of the module (default 4096)")
    ap.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r = subspace rank (default 16)")
    ap.add_argument("--fraction", type=float, default=0.2, help="contaminated fraction (default 0.2)")
    ap.add_argument("--noise", type=float, default=0.01, help="relative noise on honest B_k (default 0.01)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats; the best is reported (default 3)")
    ap.add_argument(
        "--cvxpy-repeats", type=int, default=2, help="timing repeats of each cvxpy solve (default 2)"
    )
    ap.add_argument(
        "--cvxpy-solvers",
        default="SCS",
        help="comma-separated cvxpy solvers for part 2 (default SCS with eps 1e-9; CLARABEL is accepted "
        "but took 80 s here and was less accurate)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="small sanity size (K=100, 512 x 512, rank 8)")
    ap.add_argument("--skip-fast", action="store_true", help="skip part 1 (fast path vs floor)")
    ap.add_argument("--skip-memory", action="store_true", help="skip the peak-memory child of part 1")
    ap.add_argument("--skip-cvxpy", action="store_true", help="skip part 2 (ADMM vs cvxpy)")
    ap.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    ap.add_argument("--child-fast-memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.dim, args.lora_rank = 100, 512, 8
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_fast_memory:
        print(json.dumps(child_fast_memory(args)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    print(
        f"torch {env['torch']}, ray {env['ray']}, cvxpy {env['cvxpy']}, python {env['python']}; "
        f"{env['cpu_count']} cores ({env['affinity_cores']} usable), torch threads {env['torch_threads']}, "
        f"load average {env['loadavg']}"
    )
    results: dict[str, Any] = {"environment": env, "args": vars(args)}
    t_start = time.perf_counter()
    if not args.skip_fast:
        results["fast"] = part_fast(args)
    if not args.skip_cvxpy:
        results["admm_vs_cvxpy"] = part_admm(args)
    results["wall_seconds"] = time.perf_counter() - t_start

    print("\n== Summary")
    print(f"torch {env['torch']}  ray {env['ray']}  cvxpy {env['cvxpy']}  cores {env['cpu_count']}")
    if "fast" in results:
        f = results["fast"]
        print(
            f"fast/floor          = {f['fast_over_floor']:.2f}   "
            f"({f['fast_seconds']:.3f} s / {f['floor_seconds']:.3f} s)"
        )
        print(
            f"detection           = precision {f['precision']:.4f}, recall {f['recall']:.4f}, "
            f"F1 {f['f1']:.4f}"
        )
        print(f"subspace error      = {f['subspace_error']:.3e}")
        if "peak_rss_bytes" in f:
            print(
                f"peak memory         = {f['peak_rss_bytes'] / GIB:.2f} GiB "
                f"(dense stack {f['dense_stack_bytes'] / GIB:.1f} GiB)"
            )
    if "admm_vs_cvxpy" in results:
        a = results["admm_vs_cvxpy"]
        print(f"ADMM objective gap  = {a['admm_rel_gap']:.2e} relative (tol {a['admm_tol']:g})")
        for name, v in a["cvxpy"].items():
            line = f"cvxpy[{name}]/admm = {v['over_admm_1thread']:.0f}  (1-thread ADMM at equal objective)"
            if "over_admm_strict_1thread" in v:
                line += f"; {v['over_admm_strict_1thread']:.0f} at L, S within 1e-4"
            print(line)
    print(f"wall time           = {results['wall_seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
