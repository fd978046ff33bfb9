"""Linear-regression workload: the setting in which CLAIR's theory is stated.

Client k holds X_k (n_k × p, standard normal rows) and Y_k = X_k W_k + σ Z_k with
W_k = W_0 + U V_kᵀ (p × q): U (p × r) orthonormal and shared by everyone, V_k = V̄ + h·G_k its own
(h = ``heterogeneity``; 0 makes every honest client alike). One-shot mode: the client's update is its OLS
estimate M_k = W_k + E_k. Multi-round mode: ``local_steps`` full-batch gradient steps from the model the
client continues from.

Everything here is a deterministic function of (config, root seed, trial, round, client), so an actor
restarted from scratch rebuilds exactly the same problem and data; nothing in this module is mutable
per-client state (that lives in the driver: the model each client continues from).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from clair_ray import attacks
from clair_ray.config import ExperimentConfig
from clair_ray.engine import seeds

DTYPE = torch.float64  # small exact problems: float64 throughout (DESIGN.md §1)


@dataclass
class LinearProblem:
    """Ground truth of one trial.

    Attributes:
        U: (p, r) orthonormal shared subspace.
        W0: (p, q) common offset (zeros when ``base_scale`` is 0).
        W: (K, p, q) every client's true matrix W_0 + U V_kᵀ.
        n: (K,) client sample sizes.
        contaminated: Sorted contaminated client ids.
        attack: Client id -> attack kind, for contaminated clients.
    """

    U: torch.Tensor
    W0: torch.Tensor
    W: torch.Tensor
    n: np.ndarray
    contaminated: list[int]
    attack: dict[int, str]

    def is_data_attack(self, k: int) -> bool:
        """Whether client k's contamination corrupts its data (else it attacks its update)."""
        return k in self.attack and attacks.is_data_attack(self.attack[k])


class LinearWorkload:
    """Builds problems and trains virtual clients of the linear workload.

    One instance per actor; problems and client data are cached per trial, which is safe because they
    are pure functions of the seeds.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        """Stores the config.

        Args:
            cfg: The validated experiment config.
        """
        self.cfg = cfg
        self.w = cfg.workload
        self._problems: dict[int, LinearProblem] = {}
        # A few batches' worth of client data (train and noise_level both read it), not every client's:
        # caching all of them made an actor's memory grow with K (1.35 GiB at K = 10,000); regenerating a
        # client's data from its seed costs tens of microseconds.
        self._data: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._data_cap = 2 * cfg.engine.batch_size

    # ---- truth ----------------------------------------------------------------------------------------
    def problem(self, trial: int) -> LinearProblem:
        """The ground truth of ``trial`` (built once, then cached)."""
        if trial not in self._problems:
            self._problems[trial] = self._build_problem(trial)
        return self._problems[trial]

    def _build_problem(self, trial: int) -> LinearProblem:
        w, root = self.w, self.cfg.seed
        g = seeds.torch_generator(seeds.derive_seed(root, seeds.PROBLEM, trial))
        K, p, q, r = w.num_clients, w.p, w.q, w.r
        U, _ = torch.linalg.qr(torch.randn(p, r, generator=g, dtype=DTYPE))  # (p, r)
        vbar = w.signal_scale * torch.randn(q, r, generator=g, dtype=DTYPE)  # (q, r)
        V = vbar + w.heterogeneity * torch.randn(K, q, r, generator=g, dtype=DTYPE)  # (K, q, r)
        W0 = w.base_scale * torch.randn(p, q, generator=g, dtype=DTYPE)  # (p, q)
        W = W0 + torch.einsum("pr,kqr->kpq", U, V)  # (K, p, q)
        z = torch.randn(K, generator=g, dtype=DTYPE).numpy()
        n = np.maximum(np.round(w.n_median * np.exp(w.quantity_skew * z)), w.n_min).astype(np.int64)
        sel_seed = seeds.derive_seed(root, seeds.SELECT, trial)
        contaminated = sorted(attacks.select_contaminated(K, self.cfg.contamination.fraction, sel_seed))
        mix = {k: float(v) for k, v in self.cfg.contamination.mix.items() if v > 0}
        attack = dict(attacks.assign_attacks(contaminated, mix, sel_seed)) if contaminated else {}
        return LinearProblem(U=U, W0=W0, W=W, n=n, contaminated=contaminated, attack=attack)

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
            if prob.is_data_attack(k):
                kind = prob.attack[k]
                Y = attacks.corrupt_targets(kind, Y, g, **self.cfg.contamination.params.get(kind, {}))
            self._data[key] = (X, Y)
            while len(self._data) > self._data_cap:
                self._data.popitem(last=False)
        return self._data[key]

    # ---- client work ----------------------------------------------------------------------------------
    def train(
        self, trial: int, round_: int, k: int, start: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Client k's local update for this round.

        Args:
            trial: Trial index.
            round_: Round index.
            k: Client id.
            start: (p, q) model the client continues from (None: zeros, the first round).

        Returns:
            The (p, q) update (the client's local estimate M_k) and two numbers: ``noise_scale``, the
            relative noise level the client reports with its update, sqrt(tr((X_kᵀX_k)⁻¹)) (computable from
            its own inputs alone; exactly proportional to its OLS error, unlike 1/sqrt(n_k) when n_k is
            close to p), and ``noise_level``, the truth's expected ‖P_U⊥ E_k‖_F (detection ground truth
            only; it uses U and σ, which no method sees).
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
            for _ in range(self.w.local_steps):
                M -= self.w.lr * (X.T @ (X @ M - Y)) / n
        scale = float(torch.sqrt(torch.trace(torch.linalg.inv(X.T @ X))))
        return M.numpy(), {"noise_scale": scale, "noise_level": self.noise_level(trial, k)}

    def noise_level(self, trial: int, k: int) -> float:
        """sqrt(E‖P_U⊥ E_k‖_F²) = σ sqrt(q · tr(P_U⊥ (XᵀX)⁻¹)) for client k's OLS error E_k."""
        X, _ = self.client_data(trial, k)
        U = self.problem(trial).U
        G = torch.linalg.inv(X.T @ X)  # (p, p)
        tr = torch.trace(G) - torch.trace(U.T @ G @ U)
        return float(self.w.noise_std * torch.sqrt(self.w.q * tr.clamp_min(0.0)))

    # ---- metrics --------------------------------------------------------------------------------------
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

    def initial_model(self) -> np.ndarray:
        """(p, q) zeros: where every client starts."""
        return np.zeros((self.w.p, self.w.q))
