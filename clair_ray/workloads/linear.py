"""Linear-regression workload: the setting in which CLAIR's theory is stated, with its own round.

Client k holds X_k (n_k × p, standard normal rows) and Y_k = X_k W_k + σ Z_k with
W_k = W_0 + U V_kᵀ (p × q): U (p × r) orthonormal and shared by everyone, V_k = V̄ + h·G_k its own
(h = ``heterogeneity``; 0 makes every honest client alike). One-shot mode: the client's update is its OLS
estimate M_k = W_k + E_k. Multi-round mode: ``local_steps`` full-batch gradient steps from the model the
client continues from.

A client batch's payload is the (B, p, q) float64 array of its updates. The round (aggregator actor):

1. applies the contaminated clients' update attacks after every honest update of the round exists (ALIE
   and IPM are omniscient); each attack draws from its own (trial, round, client) seed;
2. excludes dropouts and non-finite updates (the latter flagged "non-finite"), so no NaN reaches a method;
3. runs each configured aggregator on the remaining clients and maps the results back to client ids;
4. computes per-client metrics against the truth (error, held-out MSE, energy outside U, detectability).

Everything is a deterministic function of (config, root seed, trial, round, client), so an actor
restarted from scratch rebuilds exactly the same problem and data; the models clients continue from
travel with every call (the round's ``nexts``), never kept here.
"""

from __future__ import annotations

import math
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clair_ray import attacks, seeds
from clair_ray.aggregators import AggContext, get_aggregator
from clair_ray.workloads.base import (
    REFINE_COLUMNS,
    ClientJob,
    Column,
    Group,
    MethodRound,
    RoundOutput,
    TrainOutput,
    Workload,
    WorkloadConfig,
    check_fields,
    non_finite_flags,
    refine_scalars,
    register_workload,
)

if TYPE_CHECKING:
    from clair_ray.config import ExperimentConfig

__all__ = ["LinearConfig", "LinearProblem", "LinearWorkload", "MethodError"]

DTYPE = torch.float64  # small exact problems: float64 throughout


class MethodError(RuntimeError):
    """An aggregation method failed (its message says which, where, and why)."""


@dataclass
class LinearConfig(WorkloadConfig):
    """The linear-regression workload (``workload.name: linear``): Y_k = X_k W_k + noise,
    W_k = W_0 + U V_kᵀ.

    Attributes:
        p: Rows of W (input features of the regression; the shared side, U is p × r).
        q: Columns of W (outputs).
        true_rank: r, the rank of the true shared subspace U the data are drawn from (CLAIR's own rank is
            ``aggregation.rank``).
        signal_scale: Standard deviation of the entries of the common V̄.
        heterogeneity: Spread of honest V_k around V̄ (V_k = V̄ + heterogeneity · G_k); 0 = all alike.
        n_median: Median client sample size n_k.
        quantity_skew: Log-normal sigma of n_k around n_median (0: every client has n_median samples).
        n_min: Smallest allowed n_k (at least p + 2 so OLS is defined with finite noise).
        noise_std: Noise standard deviation σ of Y.
        base_scale: Entry std of the common offset W_0 (0: no offset; > 0: CLAIR runs with offset=True).
        local_steps: Full-batch gradient steps per round in multi-round mode.
        lr: Gradient step size in multi-round mode.
        truth_factor: A contaminated client counts as detectable when its update's energy outside U
            exceeds this multiple of its own noise level there. An honest client's ratio is a chi-type
            variable with (p - r)·q degrees of freedom, 1 ± 0.03 for the default shapes, so 1.2 is far
            above any honest fluctuation yet still counts a weak ALIE attacker (about 1.3) as visible.
    """

    name: str = "linear"
    p: int = 64
    q: int = 16
    true_rank: int = 4
    signal_scale: float = 1.0
    heterogeneity: float = 0.5
    n_median: int = 200
    quantity_skew: float = 0.0
    n_min: int = 80
    noise_std: float = 0.5
    base_scale: float = 0.0
    local_steps: int = 5
    lr: float = 0.3
    truth_factor: float = 1.2

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (getattr(self, k) >= 1, k, getattr(self, k), "must be >= 1") for k in ("p", "q", "true_rank")
        ]
        checks += [
            (
                self.true_rank <= min(self.p, self.q),
                "true_rank",
                self.true_rank,
                f"must be <= min(p, q) = {min(self.p, self.q)}",
            ),
            (
                self.n_min >= self.p + 2,
                "n_min",
                self.n_min,
                f"must be >= p + 2 = {self.p + 2} (OLS needs n > p)",
            ),
            (
                self.n_median >= self.n_min,
                "n_median",
                self.n_median,
                f"must be >= workload.n_min={self.n_min}",
            ),
            (self.local_steps >= 1, "local_steps", self.local_steps, "must be >= 1"),
            (0 < self.lr < 2, "lr", self.lr, "must be in (0, 2) (gradient steps on whitened inputs)"),
            (self.truth_factor > 0, "truth_factor", self.truth_factor, "must be > 0"),
        ]
        for key in ("signal_scale", "heterogeneity", "quantity_skew", "noise_std", "base_scale"):
            v = getattr(self, key)
            checks.append((math.isfinite(v) and v >= 0, key, v, "must be finite and >= 0"))
        check_fields("workload", checks)


@dataclass
class LinearProblem:
    """Ground truth of one trial.

    Attributes:
        U: (p, r) orthonormal shared subspace.
        W0: (p, q) common offset (zeros when ``base_scale`` is 0).
        W: (K, p, q) every client's true matrix W_0 + U V_kᵀ.
        n: (K,) client sample sizes.
    """

    U: torch.Tensor
    W0: torch.Tensor
    W: torch.Tensor
    n: np.ndarray


@register_workload("linear")
class LinearWorkload(Workload):
    """Builds problems, trains virtual clients and runs the round of the linear workload.

    One instance per process; problems and client data are cached, which is safe because they are pure
    functions of the seeds.
    """

    config_class = LinearConfig
    columns = (
        Column("error", honest_mean=True),  # ‖W̃_k − W_k‖_F of the model the client ends the round with
        Column("test_mse", honest_mean=True),  # held-out MSE per output (exact, no sampling)
        Column("off_subspace"),  # ‖P_U⊥(update − W_0)‖_F
        Column("noise_level"),  # the client's noise level outside U (detection truth)
        Column("subspace_error", level="method"),  # ‖ÛÛᵀ − UUᵀ‖_F, NaN if the method has no subspace
        *REFINE_COLUMNS,  # CLAIR's and the oracle's refinement of the one module "W"
    )

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.w: LinearConfig = cfg.workload  # type: ignore[assignment]
        self._problems: dict[int, LinearProblem] = {}
        # A few batches' worth of client data (train and noise_level both read it), not every client's:
        # caching all of them made an actor's memory grow with K (1.35 GiB at K = 10,000); regenerating a
        # client's data from its seed costs tens of microseconds.
        self._data: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._data_cap = 2 * cfg.engine.batch_size

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """Method names, attacks, and CLAIR's rank against the problem's shape."""
        super().check(cfg)
        w, rank = cfg.workload, cfg.aggregation.rank
        assert isinstance(w, LinearConfig)
        ok = rank is None or 1 <= rank <= min(w.p, w.q)
        refine = cfg.aggregation.refine
        check_fields(
            "aggregation",
            [
                (ok, "rank", rank, "must be in [1, min(p, q)]"),
                (
                    refine != "heldout",
                    "refine",
                    refine,
                    "heldout is for LoRA workloads (their clients hold back rows); use 'auto' or an integer",
                ),
            ],
        )

    # ---- truth ----------------------------------------------------------------------------------------
    def problem(self, trial: int) -> LinearProblem:
        """The ground truth of ``trial`` (built once, then cached)."""
        if trial not in self._problems:
            self._problems[trial] = self._build_problem(trial)
        return self._problems[trial]

    def _build_problem(self, trial: int) -> LinearProblem:
        w, root = self.w, self.cfg.seed
        g = seeds.torch_generator(seeds.derive_seed(root, seeds.PROBLEM, trial))
        K, p, q, r = w.num_clients, w.p, w.q, w.true_rank
        U, _ = torch.linalg.qr(torch.randn(p, r, generator=g, dtype=DTYPE))  # (p, r)
        vbar = w.signal_scale * torch.randn(q, r, generator=g, dtype=DTYPE)  # (q, r)
        V = vbar + w.heterogeneity * torch.randn(K, q, r, generator=g, dtype=DTYPE)  # (K, q, r)
        W0 = w.base_scale * torch.randn(p, q, generator=g, dtype=DTYPE)  # (p, q)
        W = W0 + torch.einsum("pr,kqr->kpq", U, V)  # (K, p, q)
        z = torch.randn(K, generator=g, dtype=DTYPE).numpy()
        n = np.maximum(np.round(w.n_median * np.exp(w.quantity_skew * z)), w.n_min).astype(np.int64)
        return LinearProblem(U=U, W0=W0, W=W, n=n)

    def client_data(self, trial: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client k's (X, Y), with its data contamination applied; (n_k, p), (n_k, q)."""
        key = (trial, k)
        if key not in self._data:
            prob = self.problem(trial)
            g = seeds.torch_generator(seeds.derive_seed(self.cfg.seed, seeds.DATA, trial, -1, k))
            n = int(prob.n[k])
            X = torch.randn(n, self.w.p, generator=g, dtype=DTYPE)  # (n, p)
            Y = X @ prob.W[k] + self.w.noise_std * torch.randn(
                n, self.w.q, generator=g, dtype=DTYPE
            )  # (n, q)
            plan = self.contamination(trial)
            if plan.is_data_attack(k):
                kind = plan.attack[k]
                Y = attacks.corrupt_targets(kind, Y, g, **self.cfg.contamination.params.get(kind, {}))
            self._data[key] = (X, Y)
            while len(self._data) > self._data_cap:
                self._data.popitem(last=False)
        return self._data[key]

    def noise_level(
        self, trial: int, k: int, F: torch.Tensor | None = None, start: torch.Tensor | None = None
    ) -> float:
        """The off-subspace energy an honest client k would send: sqrt(E‖P_U⊥(M_k − W_0)‖_F²).

        One-shot (``F`` None: the OLS fit) that is σ sqrt(q · tr(P_U⊥ (XᵀX)⁻¹)). After gradient steps
        from ``start``, M_k − W_0 = (I − F)(start − W_0) + F (W_ols − W_0) (:meth:`_steps_map`), so it adds
        the deterministic part ‖P_U⊥((I − F)(start − W_0) + F (W_k − W_0))‖² (an unfinished optimisation
        leaves honest energy outside U) to the noise σ² q tr(P_U⊥ F (XᵀX)⁻¹ Fᵀ).
        """
        X, _ = self.client_data(trial, k)
        prob = self.problem(trial)
        U = prob.U
        G = torch.linalg.inv(X.T @ X)  # (p, p)
        C = G if F is None else F @ G @ F.T  # (p, p) row covariance of the estimate's noise / σ²
        tr = torch.trace(C) - torch.trace(U.T @ C @ U)
        energy = self.w.noise_std**2 * self.w.q * tr.clamp_min(0.0)
        if F is not None:
            s0 = torch.zeros_like(prob.W0) if start is None else start - prob.W0  # (p, q)
            bias = s0 - F @ s0 + F @ (prob.W[k] - prob.W0)  # (p, q)
            off = bias - U @ (U.T @ bias)
            energy = energy + (off**2).sum()
        return float(torch.sqrt(energy))

    def _steps_map(self, X: torch.Tensor) -> torch.Tensor:
        """(p, p) F with M_t = (I − F) M_0 + F W_ols after ``local_steps`` full-batch gradient steps:
        M ← M − lr Xᵀ(XM − Y)/n = A M + lr XᵀY/n with A = I − lr XᵀX/n, so F = I − A^t."""
        n, p = X.shape
        A = torch.eye(p, dtype=DTYPE) - self.w.lr * (X.T @ X) / n
        return torch.eye(p, dtype=DTYPE) - torch.linalg.matrix_power(A, self.w.local_steps)

    def errors(self, trial: int, per_client: torch.Tensor) -> dict[str, np.ndarray]:
        """Per-client metrics of the models clients end up with.

        Args:
            trial: Trial index.
            per_client: (K, p, q) models (NaN rows allowed: no result).

        Returns:
            ``error`` ‖W̃_k − W_k‖_F and ``test_mse``, the exact held-out MSE per output for standard normal
            inputs, ‖W̃_k − W_k‖_F² / q + σ² (no sampling needed).
        """
        err = torch.linalg.matrix_norm(per_client - self.problem(trial).W).numpy()  # (K,)
        return {"error": err, "test_mse": err**2 / self.w.q + self.w.noise_std**2}

    def off_subspace_energy(self, trial: int, updates: torch.Tensor) -> np.ndarray:
        """‖P_U⊥(M_k − W_0)‖_F for every submitted update; (K, p, q) -> (K,)."""
        prob = self.problem(trial)
        D = updates - prob.W0  # (K, p, q)
        D = D - prob.U @ (prob.U.T @ D)
        return torch.linalg.matrix_norm(D).numpy()

    def subspace_error(self, trial: int, subspace: torch.Tensor | None) -> float:
        """‖ÛÛᵀ − UUᵀ‖_F (NaN when the method estimates no subspace)."""
        if subspace is None:
            return float("nan")
        U = self.problem(trial).U
        Uh = subspace.to(DTYPE)
        return float(torch.linalg.matrix_norm(Uh @ Uh.T - U @ U.T))

    # ---- client work ----------------------------------------------------------------------------------
    def train(self, trial: int, k: int, start: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        """Client k's local update for this round.

        Args:
            trial: Trial index.
            k: Client id.
            start: (p, q) model the client continues from (None: zeros, the first round).

        Returns:
            The (p, q) update (the client's local estimate M_k) and two numbers: ``noise_scale``, the
            relative noise level the client reports with its update, sqrt(tr((X_kᵀX_k)⁻¹)) (computable from
            its own inputs alone; exactly proportional to its OLS error, unlike 1/sqrt(n_k) when n_k is
            close to p; after gradient steps sqrt(tr(F (X_kᵀX_k)⁻¹ Fᵀ)), the noise of the estimate it
            sends, :meth:`_steps_map`), and ``noise_level``, the off-subspace energy an honest client would
            send (:meth:`noise_level`; detection ground truth only: it uses U, W_k and σ, which no method
            sees).
        """
        X, Y = self.client_data(trial, k)
        n = X.shape[0]
        if self.w.mode == "one_shot":
            # gelsd: the default CPU driver (gelsy) is not bitwise reproducible run to run (measured).
            M = torch.linalg.lstsq(X, Y, driver="gelsd").solution  # (p, q)
        else:
            M = (
                torch.zeros(self.w.p, self.w.q, dtype=DTYPE)
                if start is None
                else torch.from_numpy(start).clone()
            )
            M0 = M.clone()
            for _ in range(self.w.local_steps):
                M -= self.w.lr * (X.T @ (X @ M - Y)) / n
        G = torch.linalg.inv(X.T @ X)  # (p, p)
        if self.w.mode == "one_shot":
            scale = float(torch.sqrt(torch.trace(G)))
            level = self.noise_level(trial, k)
        else:  # the noise of the estimate actually sent: F (XᵀX)⁻¹ Fᵀ, F from the client's own X
            F = self._steps_map(X)
            scale = float(torch.sqrt(torch.trace(F @ G @ F.T)))
            level = self.noise_level(trial, k, F, M0)
        return M.numpy(), {"noise_scale": scale, "noise_level": level}

    def train_batch(self, trial: int, round_: int, jobs: list[ClientJob], start: Any) -> TrainOutput:
        """Each job's OLS fit (one-shot) or gradient steps (multi-round); a client that raises drops out.

        ``start`` is the trajectory's (K, p, q) models, indexed by client id (None in the first round).
        """
        del round_
        p, q = self.w.p, self.w.q
        updates = np.full((len(jobs), p, q), np.nan)  # (B, p, q)
        info: list[dict[str, Any]] = []
        failed: dict[int, str] = {}
        for i, job in enumerate(jobs):
            k = job.client_id
            row: dict[str, Any] = {"n_samples": int(self.problem(trial).n[k]), "bytes_sent": 0}
            try:
                upd, extra = self.train(trial, k, None if start is None else np.array(start[k]))
                updates[i] = upd
                row.update(extra, bytes_sent=int(updates[i].nbytes), finite=bool(np.isfinite(upd).all()))
            except Exception:  # a client's failure is data (a dropout), not the batch's failure
                failed[i] = traceback.format_exc()
            info.append(row)
        return TrainOutput(payload=updates, info=info, failed=failed)

    def corrupt_updates(self, payload: np.ndarray, positions: list[int]) -> np.ndarray:
        """The (B, p, q) updates with rows ``positions`` set to NaN."""
        out = np.array(payload, copy=True)
        out[positions] = np.nan
        return out

    def initial_model(self) -> np.ndarray:
        """(p, q) zeros: where every client starts."""
        return np.zeros((self.w.p, self.w.q))

    # ---- the round (aggregator actor) -------------------------------------------------------------------
    def _noise_scale(self, reported: np.ndarray, n: torch.Tensor) -> torch.Tensor | None:
        """(K,) the ``ctx.noise_scale`` chosen by ``aggregation.noise_scale``."""
        choice = self.cfg.aggregation.noise_scale
        if choice == "none":
            return None
        if choice == "inv_sqrt_n":
            return 1.0 / torch.sqrt(n)
        # "reported": the scale each client computed from its own inputs; 1 where a client reported none.
        return torch.as_tensor(np.nan_to_num(reported, nan=1.0), dtype=torch.float64)

    def apply_attacks(self, trial: int, round_: int, updates: torch.Tensor, ok: np.ndarray) -> torch.Tensor:
        """Replaces contaminated reporting clients' updates by their attacks.

        Args:
            trial: Trial index.
            round_: Round index.
            updates: (K, p, q) honest local updates (data attacks already inside).
            ok: (K,) clients that reported a finite update.

        Returns:
            (K, p, q) the updates the server receives.
        """
        plan = self.contamination(trial)
        honest_ids = [k for k in range(len(ok)) if ok[k] and k not in plan.attack]
        honest = updates[honest_ids] if honest_ids else None  # (H, p, q)
        ctx = attacks.AttackContext(self.K, len(plan.contaminated), self.w.true_rank)
        out = updates.clone()
        for k, kind in plan.update_attackers().items():
            if not ok[k]:
                continue
            g = seeds.torch_generator(seeds.derive_seed(self.cfg.seed, seeds.ATTACK, trial, round_, k))
            params = self.cfg.contamination.params.get(kind, {})
            out[k] = attacks.apply_update_attack(kind, updates[k], honest, g, ctx, **params)
        return out

    def aggregate_round(self, trial: int, round_: int, groups: list[Group], prev: Any) -> RoundOutput:
        """Attacks, every method of every group, truth metrics; ``nexts`` are the (K, p, q) models each
        method's clients continue from (a client without a valid result keeps its previous model; none
        after the last round)."""
        prob, plan, K = self.problem(trial), self.contamination(trial), self.K
        contaminated = np.zeros(K, dtype=bool)
        contaminated[plan.contaminated] = True
        n = torch.as_tensor(prob.n, dtype=torch.float64)
        out = RoundOutput(methods={})
        last = round_ + 1 >= self.w.n_rounds
        p, q = self.w.p, self.w.q
        for group in groups:
            arr = np.full((K, p, q), np.nan)  # (K, p, q)
            for ids, payload in group.batches:
                arr[ids] = payload
            noise = {key: np.full(K, np.nan) for key in ("noise_level", "noise_scale")}
            for k, inf in group.info.items():
                for key in noise:
                    noise[key][k] = inf.get(key, np.nan)
            raw = torch.from_numpy(arr)  # (K, p, q)
            reported = np.ones(K, dtype=bool)
            reported[group.dropped] = False
            finite = torch.isfinite(raw).flatten(1).all(dim=1).numpy() & reported  # (K,)
            sent = self.apply_attacks(trial, round_, raw, finite)  # (K, p, q)
            valid = torch.isfinite(sent).flatten(1).all(dim=1).numpy() & reported  # (K,)
            active = np.flatnonzero(valid).tolist()
            off = self.off_subspace_energy(trial, sent)  # (K,)
            detectable = contaminated & valid & (off > self.w.truth_factor * noise["noise_level"])
            norms = torch.linalg.matrix_norm(sent).numpy()  # (K,)
            scale = self._noise_scale(noise["noise_scale"], n)
            c = self.cfg
            ctx = AggContext(
                rank=c.aggregation.rank,
                refine=c.aggregation.refine,
                n_attackers=attacks.assumed_attackers(
                    c.aggregation.assumed_fraction, c.contamination.fraction, len(active)
                ),
                offset=self.w.base_scale > 0,
                noise_scale=None if scale is None else scale[active],
                seed=seeds.derive_seed(c.seed, seeds.METHOD, trial, round_),
                honest=[i for i, k in enumerate(active) if not contaminated[k]],
                true_subspace=prob.U,
            )
            for method in group.methods:
                t0 = time.perf_counter()
                try:
                    agg = get_aggregator(method, **c.aggregation.params.get(method, {}))
                    res = agg.aggregate(sent[active], ctx) if active else None
                except Exception as exc:
                    raise MethodError(
                        f"trial {trial} round {round_}: method {method!r} failed on {len(active)} clients: "
                        f"{exc}"
                    ) from exc
                agg_s = time.perf_counter() - t0
                result = torch.full_like(sent, float("nan"))  # (K, p, q)
                flagged, reason = non_finite_flags(reported, valid)
                subspace = None
                refine: dict[str, float | str] = {}
                if res is not None:
                    if "refine" in res.info:
                        refine = refine_scalars({"W": res.info["refine"]})
                    result[active] = res.per_client.to(torch.float64)
                    for j in res.flagged:
                        flagged[active[j]] = True
                        reason[active[j]] = str(res.reasons.get(j, method))
                    subspace = res.subspace
                metrics = self.errors(trial, result)
                if not last:  # the last round's models go nowhere: don't build K x p x q of them
                    start = (
                        prev[method]
                        if prev is not None
                        else np.broadcast_to(self.initial_model(), sent.shape)
                    )
                    out.nexts[method] = np.ascontiguousarray(
                        np.where(valid[:, None, None], result.numpy(), start)
                    )
                out.methods[method] = MethodRound(
                    flagged=flagged,
                    reason=reason,
                    detectable=detectable,
                    dropped=~reported,
                    update_norm=norms,
                    metrics={**metrics, "off_subspace": off, "noise_level": noise["noise_level"]},
                    scalars={"subspace_error": self.subspace_error(trial, subspace), **refine},
                    agg_s=agg_s,
                )
        return out
