"""The copy-task LoRA workload on the Ray engine (issue 4): training in client actors, CLAIR per module.

What runs where:

- **Driver** (:meth:`CopyTaskWorkload.prepare`): builds the base W_0 once into the disk cache
  (:func:`clair_ray.workloads.copy_task.build_base`, keyed by the base config's hash), before any actor
  starts, so actors only ever load it.
- **Client actors** (:meth:`CopyTaskWorkload.train_batch`): each keeps ONE base model resident (loaded on
  its first call) wrapped as a :class:`~clair_ray.workloads.grouped_lora.GroupedLoRAModel`, and trains the
  batch of virtual clients it is handed (``engine.batch_size`` clients) in one forward/backward per step:
  the same numbers as training them one at a time (grouped_lora.py's docstring; ``batch_size=1`` is the
  one-at-a-time case). Every client starts from the same peft initialisation (``lora_init_seed``), draws
  its mini-batches exactly as :func:`clair_ray.workloads.lora.train_lora` does from its (trial, round,
  client) seed, and returns its per-module factor pairs (B (out, r) with alpha/r folded in, A (r, in)) as
  float64 numpy, plus the snapshot after ``early_steps`` (the early-stopped local baseline: AdamW's first
  ``early_steps`` steps do not depend on how many follow, so the snapshot equals a separate short run).
- **Aggregator actor** (:meth:`CopyTaskWorkload.aggregate_round`): applies update attacks per module,
  runs every method per module, and evaluates each honest client on its own held-out data (target loss
  and exact match). Evaluation runs on CPU in float32 there (the model is tiny).

Methods (all per LoRA module; every result is applied as ONE shared dense correction per module folded
into one shared base copy plus each client's own adapter, never a merged weight copy per client):

- ``clair``: :func:`run_clair` (below) per module with ``offset=True`` on the dense updates B_k A_k (the
  modules are tiny; see :func:`run_clair` for the factored path), evidence combined over modules as the
  mean of score / threshold (``clair_ray.clair.combine_modules``), flagged above 1. Refinement, ``side``
  both: mean_Ĉ + P_U (Δ_k − mean_Ĉ) P_V (column: no P_V; row: no P_U): the shared correction is mean_Ĉ,
  the client's adapter the projected deviation (rank ≤ CLAIR's rank ≤ the LoRA rank).
- ``oracle``: the same refinement with the true honest set and U, V from the centred honest updates.
- ``fedavg``: mean over all clients; ``fedavg_honest``: mean over the truly honest clients only (an
  oracle-ish reference); ``median``, ``trimmed_mean``, ``multi_krum``, ``geometric_median``: the
  aggregator on the dense per-module updates; all as the shared correction with no personal adapter.
- ``local``: the client's own adapter; ``local_early``: its adapter after ``early_steps``.

Detection truth: every contaminated client except the in-subspace update attacks (sign flip, scaling,
IPM), which no subspace method can see (results.py). The copy task has no known true subspace, so
``subspace_error``, ``error`` and ``test_mse`` are NaN.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clair_ray import attacks
from clair_ray.aggregators import AggContext, get_aggregator
from clair_ray.config import COPY_DATA_ATTACKS, ExperimentConfig
from clair_ray.engine import seeds
from clair_ray.workloads import copy_task as ct
from clair_ray.workloads import lora

__all__ = ["CopyProblem", "CopyTaskWorkload", "assign_copy_attacks", "combine_evidence", "run_clair"]

#: Methods whose result is one global update for everyone (the shared correction, no personal adapter).
GLOBAL_METHODS = ("fedavg", "median", "trimmed_mean", "multi_krum", "geometric_median")
#: Module name -> (B (n, out, r), A (n, r, in)): a batch of clients' factors of one module.
StackedFactors = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class CopyProblem:
    """Ground truth of one trial (cheap: no model, no data).

    Attributes:
        n: (K,) local sequences per client.
        contaminated: Sorted contaminated client ids.
        attack: Client id -> attack kind (update attack or ``data_<corruption>``).
    """

    n: np.ndarray
    contaminated: list[int]
    attack: dict[int, str]

    def is_data_attack(self, k: int) -> bool:
        """Whether client k's contamination corrupts its data (else it attacks its update)."""
        return self.attack.get(k, "").startswith("data_")


def assign_copy_attacks(contaminated: list[int], mix: dict[str, float], seed: int) -> dict[int, str]:
    """:func:`clair_ray.attacks.assign_attacks`'s rule over the copy task's kinds.

    The same largest-remainder (Hamilton) counts and the same seeded permutation, with the canonical kind
    order extended by the copy task's own corruptions (``data_reversed``, ``data_flip``), which attacks.py
    does not know. For mixes of attacks.py's kinds only, the result equals ``attacks.assign_attacks``.

    Args:
        contaminated: Contaminated client ids.
        mix: Attack kind -> weight (update attacks and :data:`clair_ray.config.COPY_DATA_ATTACKS`).
        seed: Assignment seed.

    Returns:
        Client id -> attack kind.

    Raises:
        ValueError: On an unknown kind or an all-zero mix.
    """
    valid = attacks.ATTACK_KINDS + COPY_DATA_ATTACKS
    unknown = [k for k in mix if k not in valid]
    if unknown:
        raise ValueError(f"mix has unknown attack kind(s) {unknown!r}; valid kinds: {', '.join(valid)}")
    if not contaminated:
        return {}
    kinds = [k for k in valid if mix.get(k, 0.0) > 0]
    if not kinds:
        raise ValueError(f"mix must have at least one positive weight, got {dict(mix)!r}")
    total, n = sum(mix[k] for k in kinds), len(contaminated)
    quotas = [n * mix[k] / total for k in kinds]
    counts = [int(math.floor(q)) for q in quotas]
    for i in sorted(range(len(kinds)), key=lambda i: -(quotas[i] - counts[i]))[: n - sum(counts)]:
        counts[i] += 1
    order = np.random.default_rng(seed).permutation(sorted(contaminated))
    labels = [k for k, c in zip(kinds, counts, strict=True) for _ in range(c)]
    return dict(sorted((int(c), kind) for c, kind in zip(order, labels, strict=True)))


def run_clair(deltas: torch.Tensor, rank: int, side: str, *, seed: int, **params: Any) -> dict[str, Any]:
    """CLAIR on one module's updates, centred (``offset=True``), on the side(s) refinement needs.

    Dense, as the feasibility study measured it: the copy task's modules are tiny (at most 256 x 64). The
    core now also takes factor pairs with offset=True (a low-rank centre) and ``side="both"``; this is
    the one place to switch to them (not yet measured on this workload, so not switched).

    Args:
        deltas: (K, out, in) float64 dense updates B_k A_k of the clients the method sees.
        rank: Subspace rank per module.
        side: ``column``, ``row`` or ``both``.
        seed: The core's seed.
        **params: Further keyword arguments of ``clair_ray.clair`` (``aggregation.params.clair``:
            ``solver``, ``mad_k``, ``lam``, ``tau``).

    Returns:
        ``detect``: the ClairResult whose scores/threshold are the evidence (column run unless side is
        ``row``), ``U`` (out, rank) or None, ``V`` (in, rank) or None.
    """
    import clair_ray  # late: clair_ray's __init__ imports the core

    reserved = sorted({"rank", "offset", "seed", "side"} & set(params))
    if reserved:
        raise ValueError(f"aggregation.params.clair must not set {reserved}: they come from the config")
    kw: dict[str, Any] = {"rank": rank, "offset": True, "seed": seed, **params}
    col = clair_ray.clair(deltas, side="column", **kw) if side in ("column", "both") else None
    row = clair_ray.clair(deltas, side="row", **kw) if side in ("row", "both") else None
    return {
        "detect": col if col is not None else row,
        "U": None if col is None else col.subspace.double().numpy(),
        "V": None if row is None else row.subspace.double().numpy(),
    }


def combine_evidence(results: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Per-module evidence combined by ``clair_ray.clair.combine_modules``: mean of score / threshold.

    Dividing by each module's own threshold keeps one large module from dominating (DESIGN.md section 1,
    "Scale"); a client is flagged when its mean exceeds 1.

    Args:
        results: Module name -> ClairResult over the same clients.

    Returns:
        ((K,) bool flagged, (K,) combined evidence, client -> reason).
    """
    from clair_ray.clair import combine_modules

    det = combine_modules(results)
    evidence = det.scores.double().numpy()  # (K,)
    flagged = np.zeros(evidence.shape[0], dtype=bool)
    flagged[det.contaminated] = True
    return flagged, evidence, dict(det.reasons)


def _batch_order(n: int, batch: int, steps: int, seed: int) -> torch.Tensor:
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


class CopyTaskWorkload:
    """The copy-task workload: truth, client training and per-module aggregation (see module docstring).

    One instance per process (driver, each client actor, the aggregator actor); models load lazily, so
    the driver's instance stays light.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        """Stores the config and derives the task objects (no model is loaded here).

        Args:
            cfg: The validated experiment config (``workload.name == "copy_task"``).
        """
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise in a run's output
        self.cfg = cfg
        self.w = cfg.workload.copy_task
        self.K = cfg.workload.num_clients
        t = self.w
        self.base_cfg = ct.CopyBaseConfig(
            arch=t.arch,
            vocab_size=t.vocab_size,
            prefix_len=t.prefix_len,
            n_layer=t.n_layer,
            n_embd=t.n_embd,
            n_head=t.n_head,
            base_steps=t.base_steps,
            base_lr=t.base_lr,
            base_batch_size=t.base_batch_size,
            seed=t.base_seed,
        )
        self.task = ct.CopyTaskConfig(
            base=self.base_cfg,
            n_common=t.n_common,
            n_personal=t.n_personal,
            n_clusters=t.n_clusters,
            heterogeneity=t.heterogeneity,
            task_seed=t.task_seed,
        )
        targets = list(t.lora_targets) or ct.default_targets(t.arch)
        self.spec = lora.LoraSpec(
            r=t.lora_r, alpha=t.lora_alpha, target_modules=targets, init_seed=t.lora_init_seed
        )
        self.rank = cfg.aggregation.rank or min(2, t.lora_r)
        self._problems: dict[int, CopyProblem] = {}
        self._grouped: Any = None  # client actors: the resident GroupedLoRAModel
        self._init_state: dict[str, torch.Tensor] | None = None
        self._eval_model: Any = None  # aggregator: the resident peft model for evaluation

    # ---- truth and data -------------------------------------------------------------------------------
    def cache_dir(self) -> Path:
        """Where the base is cached."""
        if self.w.cache_dir:
            return Path(self.w.cache_dir)
        return Path(os.environ.get("CLAIR_CACHE", str(Path.home() / ".cache" / "clair_ray")))

    def prepare(self, progress: Callable[[str], None] | None = None) -> Path:
        """Builds the base into the cache (driver, once, before the actors start); returns its path."""
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        # One thread: on a shared 2-core machine, torch's default pool oversubscribes the cores and a tiny
        # model's steps slow down by an order of magnitude (measured: 180 ms per step of a 1-layer base).
        torch.set_num_threads(1)
        try:
            path = ct.build_base(self.base_cfg, self.cache_dir())
        finally:
            torch.set_num_threads(threads)
        if progress is not None and time.perf_counter() - t0 > 1.0:
            progress(f"built the copy-task base in {time.perf_counter() - t0:.1f}s: {path}")
        return path

    def problem(self, trial: int) -> CopyProblem:
        """Who is contaminated and how in ``trial`` (the engine's seeded rule)."""
        if trial not in self._problems:
            sel = seeds.derive_seed(self.cfg.seed, seeds.SELECT, trial)
            bad = attacks.select_contaminated(self.K, self.cfg.contamination.fraction, sel)
            mix = {k: float(v) for k, v in self.cfg.contamination.mix.items() if v > 0}
            attack = assign_copy_attacks(bad, mix, sel) if bad else {}
            n = np.full(self.K, self.w.n_sequences, dtype=np.int64)
            self._problems[trial] = CopyProblem(n=n, contaminated=sorted(bad), attack=attack)
        return self._problems[trial]

    def _data_seed(self, trial: int, k: int) -> int:
        return seeds.derive_seed(self.cfg.seed, seeds.DATA, trial, -1, k)

    def train_data(self, trial: int, k: int) -> dict[str, torch.Tensor]:
        """Client k's local sequences, its data corruption applied."""
        prob = self.problem(trial)
        kind = prob.attack[k] if prob.is_data_attack(k) else None
        return ct.client_data(
            self.task,
            k,
            self._data_seed(trial, k),
            self.w.n_sequences,
            corruption=kind,
            n_flips=self.w.n_flips,
        )

    def test_data(self, trial: int, k: int) -> dict[str, torch.Tensor]:
        """Client k's clean held-out sequences (its own task variant)."""
        return ct.client_data(self.task, k, self._data_seed(trial, k), self.w.test_sequences, split="test")

    # ---- client actors --------------------------------------------------------------------------------
    def _device(self) -> tuple[torch.device, torch.dtype]:
        if self.w.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("workload.copy_task.device='cuda' but this actor sees no GPU")
            return torch.device("cuda"), torch.bfloat16
        return torch.device("cpu"), torch.float32

    def _resident(self) -> Any:
        """The actor's resident base with grouped LoRA slots (built on first use, from the disk cache)."""
        if self._grouped is None:
            from clair_ray.workloads.grouped_lora import GroupedLoRAModel

            device, dtype = self._device()
            model = ct.load_base(self.prepare()).to(device=device, dtype=dtype)
            self._grouped = GroupedLoRAModel(model, self.spec.target_modules, self.spec.r, self.spec.alpha)
            self._init_state = self._grouped.init_client_state(self.spec.init_seed)
        return self._grouped

    def _train_group(self, trial: int, jobs: list[tuple[int, int]]) -> tuple[list, list | None, np.ndarray]:
        """Trains G clients together; returns (final factors, early factors or None, (G,) last losses)."""
        gm = self._resident()
        device = next(gm.model.parameters()).device
        t = self.w
        data = [self.train_data(trial, k) for k, _ in jobs]
        idx = [_batch_order(t.n_sequences, t.train_batch, t.steps, seed) for _, seed in jobs]  # G x (S, b)
        ids = torch.stack([d["input_ids"][i] for d, i in zip(data, idx, strict=True)], dim=1)  # (S, G, b, T)
        labels = torch.stack([d["labels"][i] for d, i in zip(data, idx, strict=True)], dim=1)  # (S, G, b, T)
        ids, labels = ids.to(device), labels.to(device)
        gm.load_clients([self._init_state] * len(jobs))
        # The loop of GroupedLoRAModel.train_steps, with a snapshot after early_steps.
        opt = torch.optim.AdamW(gm.parameters(), lr=t.lr, weight_decay=0.0)
        gm.model.train()
        early = None
        last = torch.zeros(len(jobs), dtype=torch.float64)
        for s in range(t.steps):
            per_client = gm.client_losses(ids[s], labels[s])  # (G,)
            opt.zero_grad(set_to_none=True)
            per_client.sum().backward()  # sum: each client's gradient is its own
            opt.step()
            last = per_client.detach().double().cpu()
            if s + 1 == t.early_steps:
                early = [gm.client_factors(g) for g in range(len(jobs))]
        final = [gm.client_factors(g) for g in range(len(jobs))]
        return final, early, last.numpy()

    def train_batch(
        self, trial: int, round_: int, jobs: list[tuple[int, int]], actor_id: int, fail: list[int]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Trains a batch of virtual clients in one group (the client actor's entry point).

        Args:
            trial: Trial index.
            round_: Round index (one-shot: 0).
            jobs: (client_id, seed) pairs in client-id order.
            actor_id: The calling actor (recorded in the metadata).
            fail: Test hook ``engine.debug_fail_clients``: these clients raise.

        Returns:
            Per-client metadata (as :meth:`clair_ray.engine.client.ClientWorker.train`) and the payload
            ``{"final": StackedFactors, "early": StackedFactors or None}`` over the batch (NaN for
            clients that failed).
        """
        t0 = time.perf_counter()
        meta = [
            {
                "client_id": k,
                "seed": seed,
                "ok": True,
                "traceback": None,
                "actor_id": actor_id,
                "noise_level": math.nan,
                "noise_scale": math.nan,
                "n_samples": int(self.w.n_sequences),
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
                f, e, losses = self._train_group(trial, [jobs[i] for i in run])
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
            if self.w.early_steps and any(e is not None for e in early):
                payload["early"] = _stack([e if e is not None else nan_f for e in early])
        dt = (time.perf_counter() - t0) / max(len(jobs), 1)
        for i, m in enumerate(meta):
            f = final[i] if m["ok"] else None
            m["update_norm"] = (
                math.sqrt(sum(float(np.sum((b @ a) ** 2)) for b, a in f.values())) if f else math.nan
            )
            m["bytes_sent"] = sum(b.nbytes + a.nbytes for b, a in f.values()) if f else 0
            m["train_s"] = dt
        return meta, payload

    # ---- aggregator actor -----------------------------------------------------------------------------
    def _evaluator(self) -> Any:
        if self._eval_model is None:
            self._eval_model = lora.wrap_lora(ct.load_base(self.prepare()), self.spec)
        return self._eval_model

    def _attack_params(self, kind: str, n_contaminated: int) -> dict[str, Any]:
        params = dict(self.cfg.contamination.params.get(kind, {}))
        if kind == "alie" and params.get("z") is None:
            params.setdefault("num_clients", self.K)
            params.setdefault("num_attackers", max(n_contaminated, 1))
        if kind == "other_subspace" and params.get("rank") is None:
            params["rank"] = self.w.lora_r
        return params

    def aggregate_round(
        self,
        trial: int,
        round_: int,
        groups: list[dict[str, Any]],
        noise: dict[str, np.ndarray],
        prev: Any,
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Attacks, every method per module, and held-out evaluation of the honest clients.

        Args:
            trial: Trial index.
            round_: Round index.
            groups: One group (one-shot): ``methods``, ``dropped``, ``batches`` [(client_ids, payload)].
            noise: Unused (no noise model for the copy task).
            prev: Unused (one-shot).

        Returns:
            Per method the per-client arrays the runner records (as
            :func:`clair_ray.engine.aggregate.aggregate_round`, plus ``test_loss`` and ``exact_match``),
            and ``{}`` (no next-round models).
        """
        del noise, prev
        (group,) = groups
        K, prob = self.K, self.problem(trial)
        # A batch whose every client failed sends no factors (its clients are in ``dropped``).
        batches = [(ids, pl) for ids, pl in group["batches"] if pl["final"]]
        if not batches:
            raise RuntimeError(f"trial {trial} round {round_}: no client batch sent any update")
        names = list(batches[0][1]["final"])
        fin: dict[str, np.ndarray] = {}  # module -> (K, out, in) dense updates
        own: list[lora.Factors] = [{} for _ in range(K)]
        own_early: list[lora.Factors] = [{} for _ in range(K)]
        for ids, pl in batches:
            for n in names:
                b, a = pl["final"][n]  # (B, out, r), (B, r, in)
                if n not in fin:
                    fin[n] = np.full((K, b.shape[1], a.shape[2]), np.nan)
                fin[n][ids] = b @ a
                for j, k in enumerate(ids):
                    # Copies: object-store arrays are read-only views, which torch warns about.
                    own[k][n] = (b[j].copy(), a[j].copy())
                    if pl["early"] is not None:
                        own_early[k][n] = (pl["early"][n][0][j].copy(), pl["early"][n][1][j].copy())
        reported = np.ones(K, dtype=bool)
        reported[list(group["dropped"])] = False
        finite = reported & np.all([np.isfinite(fin[n]).reshape(K, -1).all(1) for n in names], axis=0)
        # Update attacks, per module, after every honest update exists (ALIE and IPM are omniscient).
        sent = {n: torch.from_numpy(fin[n].copy()) for n in names}  # module -> (K, out, in)
        honest_ids = [k for k in range(K) if finite[k] and k not in prob.attack]
        for k, kind in prob.attack.items():
            if not finite[k] or prob.is_data_attack(k):
                continue
            g = seeds.torch_generator(seeds.derive_seed(self.cfg.seed, seeds.ATTACK, trial, round_, k))
            params = self._attack_params(kind, len(prob.contaminated))
            for n in names:
                honest = sent[n][honest_ids] if honest_ids else None
                sent[n][k] = attacks.apply_update_attack(kind, sent[n][k].clone(), honest, g, **params)
        valid = reported & np.all(
            [torch.isfinite(sent[n]).reshape(K, -1).all(1).numpy() for n in names], axis=0
        )
        active = np.flatnonzero(valid).tolist()
        contaminated = np.zeros(K, dtype=bool)
        contaminated[prob.contaminated] = True
        detectable = np.array(
            [
                valid[k] and k in prob.attack and prob.attack[k] not in attacks.IN_SUBSPACE_KINDS
                for k in range(K)
            ]
        )
        norms = np.sqrt(sum(torch.linalg.matrix_norm(sent[n]).numpy() ** 2 for n in names))  # (K,)
        honest_eval = [k for k in active if not contaminated[k]]
        tests = {k: self.test_data(trial, k) for k in honest_eval}
        zero = {n: (np.zeros((fin[n].shape[1], 1)), np.zeros((1, fin[n].shape[2]))) for n in names}
        method_seed = seeds.derive_seed(self.cfg.seed, seeds.METHOD, trial, round_)
        metas: dict[str, dict[str, Any]] = {}
        for method in group["methods"]:
            t0 = time.perf_counter()
            flagged = np.zeros(K, dtype=bool)
            reason = [""] * K
            for k in np.flatnonzero(reported & ~valid):
                flagged[k], reason[k] = True, "non-finite"
            corr, adapters, fl, why = self._method(
                method, names, sent, own, own_early, active, honest_eval, zero, method_seed
            )
            for k in fl:
                flagged[k], reason[k] = True, why.get(k, method)
            agg_s = time.perf_counter() - t0
            loss = np.full(K, np.nan)
            em = np.full(K, np.nan)
            model = self._evaluator()
            shared = lora.fold_corrections(model, corr) if corr else model
            for k in honest_eval:
                lora.load_factors(shared, adapters[k])
                r = lora.evaluate_lm(shared, tests[k])
                loss[k], em[k] = r["loss"], r["exact_match"]
            nan = np.full(K, np.nan)
            metas[method] = {
                "flagged": flagged,
                "reason": reason,
                "error": nan,
                "test_mse": nan,
                "test_loss": loss,
                "exact_match": em,
                "update_norm": norms,
                "off_subspace": nan,
                "detectable": detectable,
                "valid": valid,
                "dropped": ~reported,
                "subspace_error": math.nan,
                "agg_s": agg_s,
            }
        return metas, {}

    def _method(
        self,
        method: str,
        names: list[str],
        sent: dict[str, torch.Tensor],
        own: list[lora.Factors],
        own_early: list[lora.Factors],
        active: list[int],
        honest: list[int],
        zero: lora.Factors,
        seed: int,
    ) -> tuple[dict[str, np.ndarray], dict[int, lora.Factors], list[int], dict[int, str]]:
        """One method: (shared corrections per module, adapters of the honest clients, flagged, reasons)."""
        if method == "local":
            return {}, {k: own[k] for k in honest}, [], {}
        if method == "local_early":
            return {}, {k: own_early[k] for k in honest}, [], {}
        if method == "fedavg_honest":
            return {n: sent[n][honest].mean(0).numpy() for n in names}, dict.fromkeys(honest, zero), [], {}
        if method in ("clair", "oracle"):
            return self._projected(method, names, sent, active, honest, seed)
        if method in GLOBAL_METHODS:
            from clair_ray.engine.aggregate import n_attackers_assumed

            ctx = AggContext(n_attackers=n_attackers_assumed(self.cfg, len(active)), seed=seed)
            agg = get_aggregator(method, **self.cfg.aggregation.params.get(method, {}))
            corr, votes = {}, np.zeros(len(active))
            for n in names:
                out = agg.aggregate(sent[n][active], ctx)
                keep = [j for j in range(len(active)) if j not in set(out.flagged)]
                corr[n] = out.per_client[keep[0]].double().numpy()  # global: the same for every kept client
                votes[out.flagged] += 1
            # A client counts as flagged when most modules excluded it (multi-Krum selects per module).
            fl = [active[j] for j in np.flatnonzero(votes > len(names) / 2)]
            why = {k: f"{method}: excluded in {int(votes[active.index(k)])}/{len(names)} modules" for k in fl}
            return corr, dict.fromkeys(honest, zero), fl, why
        raise ValueError(f"aggregation.methods: {method!r} is not available for the copy_task workload")

    def _projected(
        self,
        method: str,
        names: list[str],
        sent: dict[str, torch.Tensor],
        active: list[int],
        honest: list[int],
        seed: int,
    ) -> tuple[dict[str, np.ndarray], dict[int, lora.Factors], list[int], dict[int, str]]:
        """CLAIR or the oracle: mean_Ĉ + P_U (Δ_k − mean_Ĉ) P_V per module (shared mean, own adapter)."""
        side, r = self.w.side, self.rank
        bases: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
        if method == "clair":
            params = dict(self.cfg.aggregation.params.get("clair", {}))
            # The exact ADMM path takes 15-35 s per module call at this size (feasibility script).
            params.setdefault("solver", "fast")
            runs = {n: run_clair(sent[n][active], r, side, seed=seed, **params) for n in names}
            flag_local, _, reasons = combine_evidence({n: runs[n]["detect"] for n in names})
            fl = [active[j] for j in np.flatnonzero(flag_local)]
            why = {active[j]: reasons[j] for j in np.flatnonzero(flag_local)}
            keep = [k for k in active if k not in set(fl)]
            bases = {n: (runs[n]["U"], runs[n]["V"]) for n in names}
        else:  # oracle: the true honest set, subspaces of the centred honest updates
            fl, why, keep = [k for k in active if k not in set(honest)], {}, honest
            for n in names:
                centred = (sent[n][keep] - sent[n][keep].mean(0)).numpy()  # (H, out, in)
                u = np.linalg.svd(np.concatenate(list(centred), axis=1), full_matrices=False)[0][:, :r]
                v = np.linalg.svd(np.concatenate([c.T for c in centred], axis=1), full_matrices=False)[0][
                    :, :r
                ]
                bases[n] = (u if side != "row" else None, v if side != "column" else None)
        corr = {n: sent[n][keep].mean(0).numpy() for n in names}  # (out, in) per module: mean_Ĉ
        adapters: dict[int, lora.Factors] = {}
        for k in honest:
            ad: lora.Factors = {}
            for n in names:
                dev = sent[n][k].numpy() - corr[n]  # (out, in)
                u, v = bases[n]
                if u is not None and v is not None:
                    ad[n] = (u, (u.T @ dev @ v) @ v.T)  # (out, r), (r, in)
                elif u is not None:
                    ad[n] = (u, u.T @ dev)
                else:
                    ad[n] = (dev @ v, v.T)
            adapters[k] = ad
        return corr, adapters, fl, why
