"""LoRA workloads on the Ray engine: grouped training in client actors, per-module aggregation, evaluation.

:class:`LoRAEngineWorkload` is what every LoRA workload shares (the copy task,
:mod:`clair_ray.workloads.copy_task_engine`; any Hugging Face causal LM,
:mod:`clair_ray.workloads.hf_causal_lm_engine`). A subclass says only what its task is: the base model
(:meth:`~LoRAEngineWorkload.load_base_model`), each client's train and test data, the default LoRA targets,
and which data corruptions it implements.

What runs where:

- **Driver** (``prepare``): one-off work before any actor starts (the copy task builds its cached base).
- **Client actors** (:meth:`~LoRAEngineWorkload.train_batch`): each keeps ONE base model resident (loaded
  on its first call) wrapped as a :class:`~clair_ray.workloads.grouped_lora.GroupedLoRAModel`, and trains
  the batch of virtual clients it is handed (``engine.batch_size`` clients) in one forward/backward per
  step: the same numbers as training them one at a time (grouped_lora.py; ``batch_size=1`` is the
  one-at-a-time case, :meth:`~LoRAEngineWorkload.train_one` the plain-peft reference). Every client starts
  from the same peft initialisation (``workload.lora.init_seed``) or, in multi-round mode, from the round's
  global adapter; it draws its mini-batches from its (trial, round, client) seed and returns its
  per-module factor pairs (B (out, r) with alpha/r folded in, A (r, in)) as float64 numpy, plus the
  snapshot after ``early_steps`` (the early-stopped local baseline: AdamW's first ``early_steps`` steps do
  not depend on how many follow, so the snapshot equals a separate short run).
- **Aggregator actor** (:meth:`~LoRAEngineWorkload.aggregate_round`): applies update attacks per module and
  runs every method per module; it returns an evaluation plan (each method's shared correction and the
  honest clients' adapters) instead of evaluating.
- **Client actors again** (:meth:`~LoRAEngineWorkload.evaluate_batch`): the engine hands the plan back to
  the client actors, which evaluate their batch of honest clients under every method on the model they
  already hold (loss and exact match on each client's own held-out data; float32 on CPU, bf16 on GPU).
  Called without Ray (``evaluate=True``), the aggregation evaluates in place.

One-shot methods (CLAIR per module on the factor pairs, the oracle, FedAvg, FedAvg over the honest
clients, the robust baselines, local and early-stopped local) are pure functions in
:mod:`clair_ray.workloads.lora_aggregate`; each gives one shared dense correction per module, folded into
one shared base copy, plus each client's own adapter, never a merged weight copy per client. Evaluation
loads up to ``EVAL_GROUP`` clients' adapters at once into a grouped model
(:func:`~clair_ray.workloads.grouped_lora.grouped_evaluate`).

Multi-round mode (``workload.mode: multi_round``) runs ``fedavg`` as FedIT does: every round each client
starts from the global adapter, trains ``steps`` local steps with a fresh AdamW, and the server averages
the B factors and the A factors (:func:`fedavg_factors`); clients are evaluated on the global adapter
every ``eval_every`` rounds and in the last one. Update attacks need a dense update, so this mode takes
data attacks only.

Detection truth: every contaminated client except the in-subspace update attacks (sign flip, scaling,
IPM), which no subspace method can see (results.py). A LoRA task has no known true subspace, so
``subspace_error``, ``error`` and ``test_mse`` are NaN.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clair_ray import attacks
from clair_ray.config import ExperimentConfig
from clair_ray.engine import seeds
from clair_ray.workloads.lora_aggregate import ModuleUpdates, run_method

if TYPE_CHECKING:
    from clair_ray.workloads import lora

# peft and transformers (lora.py, grouped_lora.py) are imported where a model is built, trained or
# evaluated: the driver and the aggregator actor of a LoRA task never need them.

__all__ = [
    "LoRAEngineWorkload",
    "LoRAProblem",
    "fedavg_factors",
]

#: Module name -> (B (n, out, r), A (n, r, in)): a batch of clients' factors of one module.
StackedFactors = dict[str, tuple[np.ndarray, np.ndarray]]
#: Evaluation: clients per grouped forward, and held-out sequences per client per forward.
EVAL_GROUP = 16
EVAL_ROWS = 64
#: Held-out metrics recorded per client: result column -> key of ``lora.evaluate_lm``'s answer.
EVAL_METRICS = {"test_loss": "loss", "exact_match": "exact_match", "token_accuracy": "token_accuracy"}


def _nan_metrics(K: int) -> dict[str, np.ndarray]:
    return {name: np.full(K, np.nan) for name in EVAL_METRICS}


@dataclass
class LoRAProblem:
    """Ground truth of one trial (cheap: no model, no data).

    Attributes:
        n: (K,) local training sequences per client.
        contaminated: Sorted contaminated client ids.
        attack: Client id -> attack kind (update attack or ``data_<corruption>``).
    """

    n: np.ndarray
    contaminated: list[int]
    attack: dict[int, str]

    def is_data_attack(self, k: int) -> bool:
        """Whether client k's contamination corrupts its data (else it attacks its update)."""
        return self.attack.get(k, "").startswith("data_")


def fedavg_factors(factors: Sequence[lora.Factors], weights: Sequence[float] | None = None) -> lora.Factors:
    """FedIT's aggregate of LoRA adapters: the (weighted) mean of the B factors and of the A factors.

    Args:
        factors: Per client: module name -> (B (out, r), A (r, in)), all with the same modules and shapes.
        weights: Optional per-client weights (e.g. sample counts); default equal.

    Returns:
        Module name -> (mean B (out, r), mean A (r, in)), float64.
    """
    if not factors:
        raise ValueError("fedavg_factors: need at least one client's factors")
    w = np.full(len(factors), 1.0) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(factors),) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError(f"fedavg_factors: weights must be {len(factors)} finite values with a positive sum")
    w = w / w.sum()
    out: lora.Factors = {}
    for name in factors[0]:
        b = sum(wi * np.asarray(f[name][0], dtype=np.float64) for wi, f in zip(w, factors, strict=True))
        a = sum(wi * np.asarray(f[name][1], dtype=np.float64) for wi, f in zip(w, factors, strict=True))
        out[name] = (np.asarray(b), np.asarray(a))
    return out


def batch_order(n: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, b) the sequence indices of every step, drawn exactly as ``lora.train_lora`` draws them."""
    gen = torch.Generator().manual_seed(int(seed))
    bs = min(batch, n)
    order, pos = torch.randperm(n, generator=gen), 0
    out = torch.empty(steps, bs, dtype=torch.long)
    for s in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        out[s] = order[pos : pos + bs]
        pos += bs
    return out


def _stack(factors: list[lora.Factors]) -> StackedFactors:
    names = list(factors[0])
    return {n: (np.stack([f[n][0] for f in factors]), np.stack([f[n][1] for f in factors])) for n in names}


class LoRAEngineWorkload:
    """A LoRA workload on the engine (see the module docstring); subclasses define the task.

    Subclasses implement :meth:`load_base_model`, :meth:`default_targets`, :meth:`client_sizes`,
    :meth:`train_data` and :meth:`test_data`, and may override :meth:`prepare`. ``DATA_KINDS`` lists the
    ``data_<corruption>`` kinds the subclass's :meth:`train_data` implements beyond attacks.py's.

    One instance per process (driver, each client actor, the aggregator actor); models load lazily, so
    the driver's instance stays light.
    """

    DATA_KINDS: tuple[str, ...] = ()

    def __init__(self, cfg: ExperimentConfig) -> None:
        """Stores the config (no model is loaded here).

        Args:
            cfg: The validated experiment config.
        """
        self.cfg = cfg
        self.lw = cfg.workload.lora
        self.K = cfg.workload.num_clients
        self.multi_round = cfg.workload.mode == "multi_round"
        self.rounds = cfg.workload.rounds if self.multi_round else 1
        self.rank = cfg.aggregation.rank or min(2, self.lw.r)
        self._spec: lora.LoraSpec | None = None
        self._problems: dict[int, LoRAProblem] = {}
        self._grouped: Any = None  # client actors: the resident GroupedLoRAModel
        self._init_state: dict[str, torch.Tensor] | None = None
        # The resident peft model (train_one, evaluate_global, evaluation through evaluate_model): every
        # use loads the adapter it needs, so one serves all.
        self._peft: Any = None
        self._eval_grouped: Any = None  # aggregator: (grouped model, pristine base weights) for evaluation

    # ---- what a subclass defines ----------------------------------------------------------------------
    def load_base_model(self) -> torch.nn.Module:
        """A fresh copy of the frozen base causal LM (CPU, float32)."""
        raise NotImplementedError

    def default_targets(self) -> list[str]:
        """LoRA target modules when ``workload.lora.targets`` is empty."""
        raise NotImplementedError

    def client_sizes(self, trial: int) -> np.ndarray:
        """(K,) local training sequences per client."""
        raise NotImplementedError

    def train_data(self, trial: int, k: int) -> dict[str, torch.Tensor]:
        """Client k's training tensors (``input_ids``, ``labels``, optional ``attention_mask``), corrupted
        per its data attack."""
        raise NotImplementedError

    def test_data(self, trial: int, k: int) -> dict[str, torch.Tensor]:
        """Client k's clean held-out tensors."""
        raise NotImplementedError

    def prepare(self, progress: Callable[[str], None] | None = None) -> Any:
        """Driver-side one-off work before the actors start (default: nothing)."""
        del progress
        return None

    @staticmethod
    def _quiet_transformers() -> None:
        """One "Loading weights" progress bar per actor is noise in a run's output."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    # ---- shared -------------------------------------------------------------------------------------
    @property
    def spec(self) -> lora.LoraSpec:
        """The LoRA knobs (targets resolved)."""
        from clair_ray.workloads import lora

        if self._spec is None:
            targets = list(self.lw.targets) or self.default_targets()
            self._spec = lora.LoraSpec(
                r=self.lw.r, alpha=self.lw.alpha, target_modules=targets, init_seed=self.lw.init_seed
            )
        return self._spec

    def problem(self, trial: int) -> LoRAProblem:
        """Who is contaminated and how in ``trial`` (the engine's seeded rule)."""
        if trial not in self._problems:
            sel = seeds.derive_seed(self.cfg.seed, seeds.SELECT, trial)
            bad = attacks.select_contaminated(self.K, self.cfg.contamination.fraction, sel)
            mix = {k: float(v) for k, v in self.cfg.contamination.mix.items() if v > 0}
            attack = attacks.assign_attacks(bad, mix, sel, extra_kinds=self.DATA_KINDS) if bad else {}
            n = np.asarray(self.client_sizes(trial), dtype=np.int64)
            self._problems[trial] = LoRAProblem(n=n, contaminated=sorted(bad), attack=attack)
        return self._problems[trial]

    def data_seed(self, trial: int, k: int) -> int:
        """The seed of client k's data draws in ``trial``."""
        return seeds.derive_seed(self.cfg.seed, seeds.DATA, trial, -1, k)

    def _device(self) -> tuple[torch.device, torch.dtype]:
        if self.lw.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("workload.lora.device='cuda' but this actor sees no GPU")
            return torch.device("cuda"), torch.bfloat16
        return torch.device("cpu"), torch.float32

    # ---- client actors ------------------------------------------------------------------------------
    def _resident(self) -> Any:
        """The actor's resident base with grouped LoRA slots (built on first use)."""
        if self._grouped is None:
            from clair_ray.workloads.grouped_lora import GroupedLoRAModel

            device, dtype = self._device()
            self._quiet_transformers()
            model = self.load_base_model().to(device=device, dtype=dtype)
            spec = self.spec
            self._grouped = GroupedLoRAModel(model, spec.target_modules, spec.r, spec.alpha)
            self._init_state = self._grouped.init_client_state(spec.init_seed)
        return self._grouped

    def _steps_batches(
        self, trial: int, jobs: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(S, G, b, T) input ids, labels and attention mask of every step of every client in ``jobs``.

        Clients with fewer than ``batch`` sequences draw smaller batches; their rows are padded to the
        group's b with copies whose labels are all -100, which adds no labelled token and so leaves the
        client's mean loss (and gradient) unchanged.
        """
        lw = self.lw
        data = [self.train_data(trial, k) for k, _ in jobs]
        idx = [
            batch_order(len(d["input_ids"]), lw.batch, lw.steps, seed)
            for d, (_, seed) in zip(data, jobs, strict=True)
        ]
        b = max(i.shape[1] for i in idx)
        has_mask = "attention_mask" in data[0]
        ids, labels, masks = [], [], []
        for d, i in zip(data, idx, strict=True):  # i: (S, b_k)
            pad = b - i.shape[1]
            x, y = d["input_ids"][i], d["labels"][i]  # (S, b_k, T)
            m = d["attention_mask"][i] if has_mask else None
            if pad:
                x = torch.cat([x, x[:, :1].expand(-1, pad, -1)], dim=1)
                y = torch.cat([y, torch.full_like(y[:, :1], -100).expand(-1, pad, -1)], dim=1)
                if m is not None:
                    m = torch.cat([m, m[:, :1].expand(-1, pad, -1)], dim=1)
            ids.append(x)
            labels.append(y)
            if m is not None:
                masks.append(m)
        mask = torch.stack(masks, dim=1) if has_mask else None
        return torch.stack(ids, dim=1), torch.stack(labels, dim=1), mask  # (S, G, b, T) each

    def _start_state(self, gm: Any, start: lora.Factors | None) -> dict[str, Any]:
        if start is None:
            assert self._init_state is not None
            return self._init_state
        return gm.state_from_factors(start)

    def _train_group(
        self, trial: int, jobs: list[tuple[int, int]], start: lora.Factors | None
    ) -> tuple[list, list | None, np.ndarray]:
        """Trains G clients together; returns (final factors, early factors or None, (G,) last losses)."""
        gm = self._resident()
        device = next(gm.model.parameters()).device
        lw = self.lw
        ids, labels, mask = self._steps_batches(trial, jobs)
        ids, labels = ids.to(device), labels.to(device)
        mask = None if mask is None else mask.to(device)
        gm.load_clients([self._start_state(gm, start)] * len(jobs))
        # The loop of GroupedLoRAModel.train_steps, with a snapshot after early_steps.
        opt = torch.optim.AdamW(gm.parameters(), lr=lw.lr, weight_decay=0.0)
        gm.model.train()
        early = None
        last = torch.zeros(len(jobs), dtype=torch.float64)
        for s in range(lw.steps):
            per_client = gm.client_losses(ids[s], labels[s], None if mask is None else mask[s])  # (G,)
            opt.zero_grad(set_to_none=True)
            per_client.sum().backward()  # sum: each client's gradient is its own
            opt.step()
            last = per_client.detach().double().cpu()
            if s + 1 == lw.early_steps and not self.multi_round:
                early = [gm.client_factors(g) for g in range(len(jobs))]
        final = [gm.client_factors(g) for g in range(len(jobs))]
        return final, early, last.numpy()

    def train_one(
        self, trial: int, round_: int, k: int, start: lora.Factors | None = None
    ) -> tuple[lora.Factors, float]:
        """One client's local training with plain peft, one client at a time (the reference path).

        The same batches, optimiser and numbers (up to float32 round-off) as the grouped path of
        :meth:`train_batch`; what a Flower client or any one-client-per-call engine computes.

        Args:
            trial: Trial index.
            round_: Round index (its seed addresses the batch order).
            k: Client id.
            start: The global adapter to start from (None: the common peft initialisation).

        Returns:
            (module -> (B (out, r), A (r, in)) float64, the last step's training loss).
        """
        from clair_ray.workloads import lora

        model = self._evaluator()
        lora.reset_lora(model)
        if start is not None:
            lora.load_factors(model, start)
        seed = seeds.derive_seed(self.cfg.seed, seeds.TRAIN, trial, round_, k)
        data = self.train_data(trial, k)
        order = batch_order(len(data["input_ids"]), self.lw.batch, self.lw.steps, seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lw.lr, weight_decay=0.0)
        model.train()
        loss = math.nan
        for s in range(self.lw.steps):
            batch = {name: t[order[s]] for name, t in data.items() if isinstance(t, torch.Tensor)}
            out = lora.lm_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
            loss = float(out.detach())
        return lora.extract_factors(model), loss

    def train_batch(
        self,
        trial: int,
        round_: int,
        jobs: list[tuple[int, int]],
        actor_id: int,
        fail: list[int],
        start: lora.Factors | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Trains a batch of virtual clients in one group (the client actor's entry point).

        Args:
            trial: Trial index.
            round_: Round index.
            jobs: (client_id, seed) pairs in client-id order.
            actor_id: The calling actor (recorded in the metadata).
            fail: Test hook ``engine.debug_fail_clients``: these clients raise.
            start: Multi-round mode: the round's global adapter (None: the common initialisation).

        Returns:
            Per-client metadata (as :meth:`clair_ray.engine.client.ClientWorker.train`) and the payload
            ``{"final": StackedFactors, "early": StackedFactors or None}`` over the batch (NaN for
            clients that failed).
        """
        t0 = time.perf_counter()
        n = self.problem(trial).n
        meta = [
            {
                "client_id": k,
                "seed": seed,
                "ok": True,
                "traceback": None,
                "actor_id": actor_id,
                "noise_level": math.nan,
                "noise_scale": math.nan,
                "n_samples": int(n[k]),
                "train_loss": math.nan,
            }
            for k, seed in jobs
        ]
        for m in meta:
            if m["client_id"] in fail:
                m["ok"] = False
                m["traceback"] = f"debug_fail_clients: client {m['client_id']} fails on purpose"
        run = [i for i, m in enumerate(meta) if m["ok"]]
        final: list[lora.Factors | None] = [None] * len(jobs)
        early: list[lora.Factors | None] = [None] * len(jobs)
        if run:
            try:
                f, e, losses = self._train_group(trial, [jobs[i] for i in run], start)
                for j, i in enumerate(run):
                    final[i] = f[j]
                    early[i] = None if e is None else e[j]
                    meta[i]["train_loss"] = float(losses[j])
            except Exception:  # the batch trained together, so it fails together (a dropout each)
                tb = traceback.format_exc()
                for i in run:
                    meta[i]["ok"], meta[i]["traceback"] = False, tb
        template = next((f for f in final if f is not None), None)
        payload: dict[str, Any] = {"final": {}, "early": None}  # {}: nobody in this batch trained
        if template is not None:
            nan_f = {n: (np.full_like(b, np.nan), np.full_like(a, np.nan)) for n, (b, a) in template.items()}
            payload["final"] = _stack([f if f is not None else nan_f for f in final])
            if self.lw.early_steps and any(e is not None for e in early):
                payload["early"] = _stack([e if e is not None else nan_f for e in early])
        dt = (time.perf_counter() - t0) / max(len(jobs), 1)
        for i, m in enumerate(meta):
            f = final[i] if m["ok"] else None
            m["update_norm"] = (
                # ‖B A‖_F² = tr((BᵀB)(AAᵀ)): no dense update, even for large modules.
                math.sqrt(sum(float(np.sum((b.T @ b) * (a @ a.T))) for b, a in f.values())) if f else math.nan
            )
            m["bytes_sent"] = sum(b.nbytes + a.nbytes for b, a in f.values()) if f else 0
            m["train_s"] = dt
        return meta, payload

    # ---- evaluation ---------------------------------------------------------------------------------
    def _evaluator(self) -> Any:
        """The resident peft model (built on first use); callers load the adapter they need."""
        from clair_ray.workloads import lora

        if self._peft is None:
            self._quiet_transformers()
            self._peft = lora.wrap_lora(self.load_base_model(), self.spec)
        return self._peft

    def evaluate_model(self, model: torch.nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
        """Held-out ``loss`` and ``exact_match`` of a model (override for other metrics)."""
        from clair_ray.workloads import lora

        return lora.evaluate_lm(model, data)

    def evaluate_global(
        self, trial: int, factors: lora.Factors, clients: Sequence[int] | None = None
    ) -> float:
        """Mean held-out loss of one global adapter over clients (default: every client).

        Args:
            trial: Trial index.
            factors: Module -> (B, A), e.g. :func:`fedavg_factors` of the clients' adapters.
            clients: Which clients' test data (None: all K).

        Returns:
            The mean over clients of each client's mean held-out token loss.
        """
        from clair_ray.workloads import lora

        model = self._evaluator()
        lora.load_factors(model, factors)
        ids = range(self.K) if clients is None else clients
        return float(np.mean([self.evaluate_model(model, self.test_data(trial, k))["loss"] for k in ids]))

    # ---- aggregator actor ---------------------------------------------------------------------------
    def _attack_params(self, kind: str, n_contaminated: int) -> dict[str, Any]:
        params = dict(self.cfg.contamination.params.get(kind, {}))
        if kind == "alie" and params.get("z") is None:
            params.setdefault("num_clients", self.K)
            params.setdefault("num_attackers", max(n_contaminated, 1))
        if kind == "other_subspace" and params.get("rank") is None:
            params["rank"] = self.lw.r
        return params

    def _collect(
        self, group: dict[str, Any]
    ) -> tuple[list[str], list[lora.Factors], list[lora.Factors], np.ndarray]:
        """(module names, each client's final and early factors ({} if absent), (K,) finite & reported)."""
        K = self.K
        batches = [(ids, pl) for ids, pl in group["batches"] if pl["final"]]
        if not batches:
            raise RuntimeError("no client batch sent any update")
        names = list(batches[0][1]["final"])
        own: list[lora.Factors] = [{} for _ in range(K)]
        own_early: list[lora.Factors] = [{} for _ in range(K)]
        ok = np.zeros(K, dtype=bool)
        for ids, pl in batches:
            for j, k in enumerate(ids):
                # Copies: object-store arrays are read-only views, which torch warns about.
                own[k] = {n: (pl["final"][n][0][j].copy(), pl["final"][n][1][j].copy()) for n in names}
                if pl["early"] is not None:
                    own_early[k] = {
                        n: (pl["early"][n][0][j].copy(), pl["early"][n][1][j].copy()) for n in names
                    }
                ok[k] = all(np.isfinite(b).all() and np.isfinite(a).all() for b, a in own[k].values())
        ok[list(group["dropped"])] = False
        return names, own, own_early, ok

    def _evaluate_all(
        self, trial: int, clients: list[int], corr: dict[str, np.ndarray], adapters: dict[int, lora.Factors]
    ) -> dict[str, np.ndarray]:
        """(K,) held-out metrics of each client (``EVAL_METRICS``): the shared corrected base + its adapter.

        Grouped (:meth:`_evaluate_grouped`: ``EVAL_GROUP`` clients per forward) unless a subclass
        overrides :meth:`evaluate_model`, in which case each client is evaluated through it with peft.
        """
        from clair_ray.workloads import lora

        if type(self).evaluate_model is LoRAEngineWorkload.evaluate_model:
            return self._evaluate_grouped(trial, clients, corr, adapters)
        out = _nan_metrics(self.K)
        model = self._evaluator()
        shared = lora.fold_corrections(model, corr) if corr else model
        for k in clients:
            lora.load_factors(shared, adapters[k])
            r = self.evaluate_model(shared, self.test_data(trial, k))
            for name, key in EVAL_METRICS.items():
                out[name][k] = r.get(key, np.nan)
        return out

    def _eval_grouped_model(self) -> Any:
        """The resident grouped model (the one clients train on) and a pristine copy of its base weights."""
        from clair_ray.workloads import lora

        if self._eval_grouped is None:
            gm = self._resident()
            originals = {n: lora.linear_weight(layer.base).detach().clone() for n, layer in gm.layers.items()}
            self._eval_grouped = (gm, originals)
        return self._eval_grouped

    @torch.no_grad()
    def _evaluate_grouped(
        self, trial: int, clients: list[int], corr: dict[str, np.ndarray], adapters: dict[int, lora.Factors]
    ) -> dict[str, np.ndarray]:
        """:func:`lora.evaluate_lm`'s metrics for many clients per forward.

        The shared correction is added to the resident base weights (restored from a pristine copy
        afterwards, so nothing accumulates between methods); each client's adapter, zero-padded to the
        LoRA rank, is one group (:func:`~clair_ray.workloads.grouped_lora.grouped_evaluate`).
        """
        from clair_ray.workloads import lora
        from clair_ray.workloads.grouped_lora import grouped_evaluate

        res = _nan_metrics(self.K)
        if not clients:
            return res
        gm, originals = self._eval_grouped_model()
        r = self.spec.r
        try:
            for n, layer in gm.layers.items():
                w = lora.linear_weight(layer.base)  # (out, in) view
                w.copy_(originals[n])
                if n in corr:
                    w.add_(torch.as_tensor(corr[n], dtype=w.dtype))
            for c0 in range(0, len(clients), EVAL_GROUP):
                chunk = clients[c0 : c0 + EVAL_GROUP]
                states = []
                for k in chunk:
                    padded = {}
                    for n, (b, a) in adapters[k].items():
                        pb = np.zeros((b.shape[0], r))
                        pa = np.zeros((r, a.shape[1]))
                        pb[:, : b.shape[1]], pa[: a.shape[0]] = b, a
                        padded[n] = (pb, pa)
                    states.append(gm.state_from_factors(padded))
                gm.load_clients(states)
                out = grouped_evaluate(gm, [self.test_data(trial, k) for k in chunk], rows=EVAL_ROWS)
                for j, k in enumerate(chunk):
                    for name, key in EVAL_METRICS.items():
                        res[name][k] = out[j][key]
        finally:
            for n, layer in gm.layers.items():
                lora.linear_weight(layer.base).copy_(originals[n])
        return res

    def aggregate_round(
        self,
        trial: int,
        round_: int,
        groups: list[dict[str, Any]],
        noise: dict[str, np.ndarray],
        prev: Any,
        evaluate: bool = True,
    ) -> tuple[Any, ...]:
        """Attacks, every method per module, and held-out evaluation of the honest clients.

        Args:
            trial: Trial index.
            round_: Round index.
            groups: One-shot: one group with ``methods``, ``dropped``, ``batches`` [(client_ids, payload)];
                multi-round: one group per method after the first round.
            noise: Unused (no noise model for LoRA tasks).
            prev: Unused (the global adapter travels to the clients, not back here).
            evaluate: Evaluate here (tests, no Ray); False: leave ``test_loss`` / ``exact_match`` NaN and
                return an evaluation plan the engine hands to the client actors
                (:meth:`evaluate_batch`), which hold the model already and evaluate in parallel.

        Returns:
            Per method the per-client arrays the runner records (as
            :func:`clair_ray.engine.aggregate.aggregate_round`, plus ``test_loss``, ``exact_match`` and
            ``eval_s``), the next round's global adapters per method (``{}`` one-shot), and with
            ``evaluate=False`` the evaluation plan (method -> what :meth:`evaluate_batch` needs).
        """
        del noise, prev
        plan: dict[str, Any] = {}
        if self.multi_round:
            metas, nexts = self._fedavg_round(trial, round_, groups, evaluate, plan)
        else:
            (group,) = groups
            metas, nexts = self._one_shot(trial, round_, group, evaluate, plan), {}
        for method, p in plan.items():  # the engine dispatches these clients' evaluation
            metas[method]["eval_clients"] = list(p["clients"])
        return (metas, nexts) if evaluate else (metas, nexts, plan)

    def evaluate_batch(self, trial: int, plan: dict[str, Any], clients: list[int]) -> dict[str, Any]:
        """Held-out evaluation of some clients under every method of an evaluation plan (client actors).

        Args:
            trial: Trial index.
            plan: From :meth:`aggregate_round` with ``evaluate=False``: per method the shared
                ``corr`` (module -> (out, in)), and either ``shared`` (one adapter for every client) or
                ``adapters`` (client -> factors), and the ``clients`` it evaluates.
            clients: The clients this call evaluates (each method evaluates those in its own list).

        Returns:
            Method -> ``{"clients": [...]}`` plus one list per ``EVAL_METRICS`` column (``test_loss``,
            ``exact_match``, ``token_accuracy``).
        """
        t0 = time.perf_counter()
        out: dict[str, Any] = {}
        for method, p in plan.items():
            theirs = set(p["clients"])
            mine = [k for k in clients if k in theirs]
            if not mine:
                continue
            adapters = dict.fromkeys(mine, p["shared"]) if p["shared"] is not None else p["adapters"]
            got = self._evaluate_all(trial, mine, p["corr"], adapters)
            out[method] = {"clients": mine, **{name: got[name][mine].tolist() for name in EVAL_METRICS}}
        out["_eval_s"] = time.perf_counter() - t0
        return out

    def _base_meta(self, valid: np.ndarray, reported: np.ndarray, norms: np.ndarray) -> dict[str, Any]:
        nan = np.full(self.K, np.nan)
        return {
            "error": nan,
            "test_mse": nan,
            "update_norm": norms,
            "off_subspace": nan,
            "valid": valid,
            "dropped": ~reported,
            "subspace_error": math.nan,
        }

    def _fedavg_round(
        self, trial: int, round_: int, groups: list[dict[str, Any]], evaluate: bool, plan: dict[str, Any]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Multi-round FedAvg (FedIT): average the factors, evaluate the global adapter when due."""
        K, prob = self.K, self.problem(trial)
        metas: dict[str, dict[str, Any]] = {}
        nexts: dict[str, Any] = {}
        for group in groups:
            _, own, _, valid = self._collect(group)
            reported = np.ones(K, dtype=bool)
            reported[list(group["dropped"])] = False
            active = np.flatnonzero(valid).tolist()
            t0 = time.perf_counter()
            glob = fedavg_factors([own[k] for k in active])
            agg_s = time.perf_counter() - t0
            names = list(next(f for f in own if f))
            norms = ModuleUpdates(
                {n: [own[k][n] if valid[k] else None for k in range(K)] for n in names}
            ).norms()
            every = self.lw.eval_every
            due = round_ + 1 == self.rounds or (every > 0 and (round_ + 1) % every == 0)
            t1 = time.perf_counter()
            honest = [k for k in active if k not in prob.attack]
            metrics = _nan_metrics(K)
            if due and evaluate:
                metrics = self._evaluate_all(trial, honest, {}, dict.fromkeys(honest, glob))
            eval_s = time.perf_counter() - t1
            if due and not evaluate:
                for method in group["methods"]:
                    plan[method] = {"corr": {}, "shared": glob, "adapters": {}, "clients": honest}
            flagged = np.zeros(K, dtype=bool)
            reason = [""] * K
            for k in np.flatnonzero(reported & ~valid):
                flagged[k], reason[k] = True, "non-finite"
            for method in group["methods"]:
                metas[method] = {
                    **self._base_meta(valid, reported, norms),
                    "flagged": flagged,
                    "reason": reason,
                    "detectable": np.zeros(K, dtype=bool),
                    **metrics,
                    "agg_s": agg_s,
                    "eval_s": eval_s,
                }
                nexts[method] = glob
        return metas, nexts

    def _one_shot(
        self, trial: int, round_: int, group: dict[str, Any], evaluate: bool, plan: dict[str, Any]
    ) -> dict[str, dict[str, Any]]:
        K, prob = self.K, self.problem(trial)
        names, own, own_early, finite = self._collect(group)
        reported = np.ones(K, dtype=bool)
        reported[list(group["dropped"])] = False
        ups = ModuleUpdates({n: [own[k][n] if own[k] else None for k in range(K)] for n in names})
        # Update attacks, per module, after every honest update exists (ALIE and IPM are omniscient); they
        # act on dense updates, and the server then holds an exact factorisation of each attacked one.
        honest_ids = [k for k in range(K) if finite[k] and k not in prob.attack]
        for k, kind in prob.attack.items():
            if not finite[k] or prob.is_data_attack(k):
                continue
            g = seeds.torch_generator(seeds.derive_seed(self.cfg.seed, seeds.ATTACK, trial, round_, k))
            params = self._attack_params(kind, len(prob.contaminated))
            for n in names:
                dense = ups.dense(n)
                honest = dense[honest_ids] if honest_ids else None
                ups.set_dense(n, k, attacks.apply_update_attack(kind, dense[k].clone(), honest, g, **params))
        valid = reported & ups.finite()
        active = np.flatnonzero(valid).tolist()
        contaminated = np.zeros(K, dtype=bool)
        contaminated[prob.contaminated] = True
        detectable = np.array(
            [
                valid[k] and k in prob.attack and prob.attack[k] not in attacks.IN_SUBSPACE_KINDS
                for k in range(K)
            ]
        )
        norms = ups.norms()  # (K,)
        honest_eval = [k for k in active if not contaminated[k]]
        method_seed = seeds.derive_seed(self.cfg.seed, seeds.METHOD, trial, round_)
        from clair_ray.engine.aggregate import n_attackers_assumed

        n_att = n_attackers_assumed(self.cfg, len(active))
        metas: dict[str, dict[str, Any]] = {}
        for method in group["methods"]:
            t0 = time.perf_counter()
            flagged = np.zeros(K, dtype=bool)
            reason = [""] * K
            for k in np.flatnonzero(reported & ~valid):
                flagged[k], reason[k] = True, "non-finite"
            corr, adapters, fl, why = run_method(
                method,
                ups,
                own,
                own_early,
                active,
                honest_eval,
                rank=self.rank,
                side=self.lw.side,
                clair_mode=self.lw.clair_input,
                params=self.cfg.aggregation.params,
                n_attackers=n_att,
                seed=method_seed,
            )
            for k in fl:
                flagged[k], reason[k] = True, why.get(k, method)
            agg_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            if evaluate:
                metrics = self._evaluate_all(trial, honest_eval, corr, adapters)
            else:
                metrics = _nan_metrics(K)
                plan[method] = {"corr": corr, "shared": None, "adapters": adapters, "clients": honest_eval}
            metas[method] = {
                **self._base_meta(valid, reported, norms),
                "flagged": flagged,
                "reason": reason,
                "detectable": detectable,
                **metrics,
                "agg_s": agg_s,
                "eval_s": time.perf_counter() - t1,
            }
        return metas
