"""The client side of every LoRA workload: a resident base, grouped training, grouped evaluation.

:class:`LoRAWorkload` is what every LoRA workload shares (the copy task,
:mod:`clair_ray.workloads.copy_task.workload`; any Hugging Face causal LM,
:mod:`clair_ray.workloads.hf_causal_lm.workload`). A subclass says only what its task is: the base model
(:meth:`~LoRAWorkload.load_base_model`), each client's train and test data, the default LoRA targets, and
which data attacks it implements.

What runs where:

- **Driver** (``prepare``): one-off work before any actor starts (the copy task builds its cached base).
- **Client actors** (:meth:`~LoRAWorkload.train_batch`): each keeps ONE base model resident (loaded on
  its first call) wrapped as a :class:`~clair_ray.workloads.lora.grouped.GroupedLoRAModel`, and trains
  the batch of virtual clients it is handed (``engine.batch_size`` clients) in one forward/backward per
  step: the same numbers as training them one at a time (``batch_size=1`` is the one-at-a-time case,
  :meth:`~LoRAWorkload.train_one` the plain-peft reference, both on the one loop
  :func:`~clair_ray.workloads.lora.loop.adamw_steps`). Every client starts from the same peft
  initialisation (``workload.lora.init_seed``) or, in multi-round mode, from the round's global adapter;
  it draws its mini-batches from its (trial, round, client) seed and returns its per-module factor pairs
  (B (out, r) with alpha/r folded in, A (r, in)) as float64 numpy, plus the snapshot after
  ``early_steps`` (the early-stopped local baseline) and, for ``refine: heldout``, its factors trained
  without its held-back rows (``workload.lora.holdout``, ``refit``).
- **Aggregator actor** (:mod:`clair_ray.workloads.lora.rounds`): update attacks and every method per
  module (``refine: heldout`` evaluates its candidates there, :meth:`~LoRAWorkload.heldout_loss`); it
  returns an evaluation plan instead of evaluating.
- **Client actors again** (:meth:`~LoRAWorkload.evaluate_batch`): the clients of the plan, evaluated
  under every method on the model the actor already holds (loss, exact match and next-token accuracy on
  each client's own held-out data, and the workload's probes; float32 on CPU, bf16 on GPU), many clients
  per grouped forward. With ``workload.lora.layers`` the frozen prefix of every client's lines is
  computed once per actor and reused by every step, round and method (:mod:`.prefix`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clair_ray import seeds
from clair_ray.clair.heldout import HELDOUT
from clair_ray.workloads.base import (
    REFINE_COLUMNS,
    ClientJob,
    Column,
    Group,
    RoundOutput,
    TrainOutput,
    Workload,
)
from clair_ray.workloads.lora import rounds, trajectory
from clair_ray.workloads.lora.loop import adamw_steps, batch_order, step_batches
from clair_ray.workloads.lora.methods import OWN_METHODS, REFINING, Factors, lora_methods
from clair_ray.workloads.lora.prefix import PrefixCache, fuse_tanh_gelu
from clair_ray.workloads.lora.rounds import EVAL_METRICS, nan_metrics
from clair_ray.workloads.lora.spec import LoraSpec, LoRAWorkloadConfig, check_lora, held_back
from clair_ray.workloads.lora.trajectory import RoundState

if TYPE_CHECKING:
    from clair_ray.config import ExperimentConfig

# peft and transformers (adapters.py, grouped.py) are imported where a model is built, trained or
# evaluated: the driver and the aggregator actor of a LoRA task never need them.

__all__ = ["EVAL_GROUP", "EVAL_ROWS", "LoRAWorkload", "StackedFactors"]

#: Module name -> (B (n, out, r), A (n, r, in)): a batch of clients' factors of one module.
StackedFactors = dict[str, tuple[np.ndarray, np.ndarray]]
#: Evaluation: clients per grouped forward, and held-out sequences per client per forward.
EVAL_GROUP = 16
EVAL_ROWS = 64
#: Frozen-prefix states an actor keeps before starting over (recomputing them is exact, only slower).
PREFIX_CACHE_BYTES = 2 << 30


def _stack(factors: list[Factors]) -> StackedFactors:
    names = list(factors[0])
    return {n: (np.stack([f[n][0] for f in factors]), np.stack([f[n][1] for f in factors])) for n in names}


class LoRAWorkload(Workload):
    """A LoRA workload (see the module docstring); subclasses define the task.

    Subclasses implement :meth:`load_base_model`, :meth:`default_targets`, :meth:`client_sizes`,
    :meth:`train_data` and :meth:`test_data`, and may override :meth:`prepare`; their config section
    extends :class:`~clair_ray.workloads.lora.spec.LoRAWorkloadConfig`. One instance per process; models
    load lazily, so the driver's and the aggregator's instances stay light.
    """

    config_class = LoRAWorkloadConfig
    columns = (
        *(Column(name, honest_mean=True) for name in EVAL_METRICS),
        *REFINE_COLUMNS,
    )
    own_methods = OWN_METHODS
    supports_sampling = True
    supports_export = True

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.lw: LoraSpec = cfg.workload.lora  # type: ignore[attr-defined]
        self.multi_round = cfg.workload.mode == "multi_round"
        self.rounds = cfg.workload.n_rounds
        self.rank = cfg.aggregation.rank  # CLAIR's and the oracle's (validated: set when they run)
        self._spec: LoraSpec | None = None
        self._sizes: dict[int, np.ndarray] = {}
        self._grouped: Any = None  # client actors: the resident GroupedLoRAModel
        self._init_state: dict[str, torch.Tensor] | None = None
        # The resident peft model (train_one, the plain-peft reference): every use loads its adapter.
        self._peft: Any = None
        self._originals: dict[str, torch.Tensor] | None = None  # pristine base weights (corrections)
        self._prefixes = PrefixCache(PREFIX_CACHE_BYTES, EVAL_ROWS)  # frozen-prefix states (prefix_states)

    @classmethod
    def methods(cls) -> tuple[str, ...]:
        """CLAIR, the oracle, local, every registered global aggregator and the LoRA-only methods."""
        return lora_methods()

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """The contract's checks, then :func:`~clair_ray.workloads.lora.spec.check_lora`."""
        super().check(cfg)
        check_lora(cfg)

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

    @staticmethod
    def _quiet_transformers() -> None:
        """One "Loading weights" progress bar per actor is noise in a run's output."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    # ---- shared -------------------------------------------------------------------------------------
    @property
    def spec(self) -> LoraSpec:
        """The LoRA knobs, targets resolved (the workload's default if ``workload.lora.targets`` is empty)."""
        if self._spec is None:
            self._spec = replace(self.lw, targets=list(self.lw.targets) or self.default_targets())
        return self._spec

    @property
    def every_row(self) -> bool:
        """Whether the aggregated update trains on every row (``refine: heldout`` with ``refit``)."""
        return self.lw.holdout > 0 and self.lw.refit and self.cfg.aggregation.refine == HELDOUT

    @property
    def selects(self) -> bool:
        """Whether clients also train without their held-back rows, for ``refine: heldout`` to choose on:
        :attr:`every_row`, and clair or the oracle (the methods that refine) among the methods."""
        return self.every_row and any(m in REFINING for m in self.cfg.aggregation.methods)

    def sizes(self, trial: int) -> np.ndarray:
        """(K,) rows each client's aggregated update trains on (cached): its local rows, less the held-back
        ones unless it trains on all of them (:attr:`every_row`)."""
        if trial not in self._sizes:
            n = np.asarray(self.client_sizes(trial), dtype=np.int64)
            held = [0 if self.every_row else held_back(int(x), self.lw.holdout) for x in n]
            self._sizes[trial] = n - np.array(held, dtype=np.int64)
        return self._sizes[trial]

    def local_rows(self, trial: int, k: int, every: bool = False) -> dict[str, torch.Tensor]:
        """Client k's rows it trains on: :meth:`train_data` less the last ``workload.lora.holdout`` share
        (all of it with ``every``)."""
        return self._split_rows(trial, k, every)[0]

    def heldout_rows(self, trial: int, k: int) -> dict[str, torch.Tensor]:
        """Client k's held-back rows (the update the choice is made on never saw them): the last
        ``workload.lora.holdout`` share of :meth:`train_data`, corrupted as the rest (an attacker holds
        back what it has); none without a holdout."""
        return self._split_rows(trial, k)[1]

    def _split_rows(self, trial: int, k: int, every: bool = False) -> tuple[dict, dict]:
        data = self.train_data(trial, k)
        n = len(data["input_ids"])
        cut = n if every else n - held_back(n, self.lw.holdout)
        return {key: v[:cut] for key, v in data.items()}, {key: v[cut:] for key, v in data.items()}

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
            from clair_ray.workloads.lora.grouped import GroupedLoRAModel

            device, dtype = self._device()
            self._quiet_transformers()
            model = self.load_base_model().to(device=device, dtype=dtype)
            fuse_tanh_gelu(model)  # grouped training and evaluation only; train_one stays plain peft
            spec = self.spec
            self._grouped = GroupedLoRAModel(
                model,
                spec.targets,
                spec.r,
                spec.alpha,
                layers=spec.layers,
                reuse_prefix=spec.reuse_prefix,
                loss_chunk=spec.loss_chunk,
            )
            self._init_state = self._grouped.init_client_state(spec.init_seed)
        return self._grouped

    def prefix_states(self, key: tuple, data: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(n, T, H) the frozen prefix's hidden states of ``data``'s rows, computed once per ``key`` (e.g.
        ``(trial, k, "train")``) and reused by every later step, round and method; None without a prefix
        (``workload.lora.reuse_prefix`` off, no ``layers``, or an unsupported architecture)."""
        gm = self._resident()
        if gm.prefix is None:
            return None
        return self._prefixes.get(key, gm.prefix, data, next(gm.model.parameters()).device)

    def _steps_batches(
        self, trial: int, jobs: list[ClientJob], every: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """:func:`~clair_ray.workloads.lora.loop.step_batches` of the clients in ``jobs``."""
        lw = self.lw
        data = [self.local_rows(trial, j.client_id, every) for j in jobs]
        idx = [
            batch_order(len(d["input_ids"]), lw.batch, lw.steps, j.seed)
            for d, j in zip(data, jobs, strict=True)
        ]
        return step_batches(data, idx)

    def _start_state(self, gm: Any, start: Factors | None) -> dict[str, Any]:
        if start is None:
            assert self._init_state is not None
            return self._init_state
        return gm.state_from_factors(start)

    def _train_group(
        self, trial: int, jobs: list[ClientJob], start: RoundState | None, every: bool = False
    ) -> tuple[list, list | None, np.ndarray]:
        """Trains G clients together, each from its start in the trajectory ``start`` (None: the common
        initialisation) on the base plus the trajectory's shared correction, on all their rows (``every``)
        or without the held-back ones; returns (final factors, early factors or None, (G,) last losses)."""
        gm = self._resident()
        device = next(gm.model.parameters()).device
        lw = self.lw
        ids, labels, mask, rows = self._steps_batches(trial, jobs, every)
        ids, labels = ids.to(device), labels.to(device)
        mask = None if mask is None else mask.to(device)
        kind = "all" if every else "train"
        prefixes = [
            self.prefix_states((trial, j.client_id, kind), self.local_rows(trial, j.client_id, every))
            for j in jobs
        ]
        gm.load_clients([self._start_state(gm, trajectory.start_of(start, j.client_id)) for j in jobs])
        gm.model.train()
        early: list | None = None

        def step_losses(s: int) -> torch.Tensor:
            hidden = None
            if prefixes[0] is not None:  # (G, b, T, H): each client's cached rows of this step
                hidden = torch.stack([p[r[s]] for p, r in zip(prefixes, rows, strict=True)])  # type: ignore[index]
            return gm.client_losses(ids[s], labels[s], None if mask is None else mask[s], hidden)  # (G,)

        def snapshot(done: int) -> None:  # the early-stopped local baseline: AdamW's first steps don't
            nonlocal early  # depend on how many follow, so this equals a separate short run
            if done == lw.early_steps and not self.multi_round:
                early = [gm.client_factors(g) for g in range(len(jobs))]

        with self._corrected_base({} if start is None else start.get("corr", {})):
            losses = adamw_steps(gm.parameters(), step_losses, lw.steps, lw.lr, after_step=snapshot)
        final = [gm.client_factors(g) for g in range(len(jobs))]
        return final, early, losses[-1].numpy()

    def train_one(
        self, trial: int, round_: int, k: int, start: Factors | None = None
    ) -> tuple[Factors, float]:
        """One client's local training with plain peft, one client at a time (the reference path).

        The same batches, optimiser loop and numbers (up to float32 round-off) as the grouped path of
        :meth:`train_batch`; what a Flower client or any one-client-per-call engine computes.

        Args:
            trial: Trial index.
            round_: Round index (its seed addresses the batch order).
            k: Client id.
            start: The global adapter to start from (None: the common peft initialisation).

        Returns:
            (module -> (B (out, r), A (r, in)) float64, the last step's training loss).
        """
        from clair_ray.workloads.lora import adapters as lora

        model = self._evaluator()
        lora.reset_lora(model)
        if start is not None:
            lora.load_factors(model, start)
        seed = seeds.derive_seed(self.cfg.seed, seeds.TRAIN, trial, round_, k)
        data = self.local_rows(trial, k, self.every_row)
        losses = lora.train_peft(
            model, data, batch_order(len(data["input_ids"]), self.lw.batch, self.lw.steps, seed), self.lw.lr
        )
        return lora.extract_factors(model), float(losses[-1]) if len(losses) else math.nan

    def train_batch(self, trial: int, round_: int, jobs: list[ClientJob], start: Any) -> TrainOutput:
        """Trains a batch of virtual clients in one group (the client actor's entry point).

        Args:
            trial: Trial index.
            round_: Round index.
            jobs: The clients, in client-id order.
            start: Multi-round mode: the trajectory's state
                (:data:`~clair_ray.workloads.lora.trajectory.RoundState`: shared correction, global adapter,
                personal adapters); None: the common initialisation.

        Returns:
            The payload ``{"final": StackedFactors, "early": StackedFactors or None, "select":
            StackedFactors or None}`` (``select``: trained without the held-back rows, :attr:`selects`) and
            per-client info (``n_samples``, ``bytes_sent``, ``train_loss``); if training raises, every
            client of the batch drops out with the traceback (they trained together).
        """
        import traceback

        del round_
        n = self.sizes(trial)
        info: list[dict[str, Any]] = [
            {"n_samples": int(n[j.client_id]), "bytes_sent": 0, "train_loss": math.nan} for j in jobs
        ]
        failed: dict[int, str] = {}
        final: list[Factors | None] = [None] * len(jobs)
        early: list[Factors | None] = [None] * len(jobs)
        select: list[Factors] | None = None
        if jobs:
            try:
                f, e, losses = self._train_group(trial, jobs, start, self.every_row)
                if self.selects:  # the same clients without their held-back rows: refine=heldout's judge
                    select = self._train_group(trial, jobs, start)[0]
                for i in range(len(jobs)):
                    final[i] = f[i]
                    early[i] = None if e is None else e[i]
                    info[i]["train_loss"] = float(losses[i])
            except Exception:  # the batch trained together, so it fails together (a dropout each)
                tb = traceback.format_exc()
                failed = dict.fromkeys(range(len(jobs)), tb)
        template = next((f for f in final if f is not None), None)
        payload: dict[str, Any] = {"final": {}, "early": None, "select": None}  # {}: nobody trained
        if template is not None:
            nan_f = {m: (np.full_like(b, np.nan), np.full_like(a, np.nan)) for m, (b, a) in template.items()}
            payload["final"] = _stack([f if f is not None else nan_f for f in final])
            if select is not None and not failed:
                payload["select"] = _stack(select)
            if self.lw.early_steps and any(x is not None for x in early):
                payload["early"] = _stack([x if x is not None else nan_f for x in early])
        for i, f in enumerate(final):
            if f is not None and i not in failed:
                info[i]["bytes_sent"] = sum(b.nbytes + a.nbytes for b, a in f.values())
                info[i]["finite"] = all(np.isfinite(b).all() and np.isfinite(a).all() for b, a in f.values())
        return TrainOutput(payload=payload, info=info, failed=failed)

    def corrupt_updates(self, payload: dict[str, Any], positions: list[int]) -> dict[str, Any]:
        """The payload with the final (early, select) factors of the clients at ``positions`` set to NaN."""
        out: dict[str, Any] = {"final": {}, "early": None, "select": None}
        for key in ("final", "early", "select"):
            if payload.get(key) is None:
                continue
            out[key] = {}
            for m, (b, a) in payload[key].items():
                b, a = np.array(b, copy=True), np.array(a, copy=True)
                b[positions], a[positions] = np.nan, np.nan
                out[key][m] = (b, a)
        return out

    # ---- evaluation ---------------------------------------------------------------------------------
    def _evaluator(self) -> Any:
        """The resident peft model (built on first use); callers load the adapter they need."""
        from clair_ray.workloads.lora import adapters as lora

        if self._peft is None:
            self._quiet_transformers()
            self._peft = lora.wrap_lora(self.load_base_model(), self.spec)
        return self._peft

    def evaluate_global(self, trial: int, factors: Factors, clients: Sequence[int] | None = None) -> float:
        """Mean held-out loss of one global adapter over clients (default: every client).

        Args:
            trial: Trial index.
            factors: Module -> (B, A), e.g. :func:`~clair_ray.workloads.lora.methods.fedavg_factors`.
            clients: Which clients' test data (None: all K).

        Returns:
            The mean over clients of each client's mean held-out token loss.
        """
        ids = list(range(self.K) if clients is None else clients)
        res = self.evaluate_clients(trial, ids, {}, dict.fromkeys(ids, factors))
        return float(np.mean(res["test_loss"][ids]))

    @contextlib.contextmanager
    def _corrected_base(self, corr: dict[str, np.ndarray]) -> Iterator[Any]:
        """The resident grouped model with a shared dense correction added to its base weights; the
        corrected layers are restored from a pristine copy afterwards, so the base is pristine outside
        this block (nothing accumulates between methods or rounds) and an empty correction costs nothing.
        """
        from clair_ray.workloads.lora import adapters as lora

        gm = self._resident()
        touched = [n for n in gm.layers if n in corr]
        if self._originals is None and touched:
            self._originals = {
                n: lora.linear_weight(layer.base).detach().clone() for n, layer in gm.layers.items()
            }
        try:
            with torch.no_grad():
                for n in touched:  # a copy: plan arrays are read-only
                    w = lora.linear_weight(gm.layers[n].base)  # (out, in) view
                    w.add_(torch.as_tensor(np.array(corr[n]), dtype=w.dtype, device=w.device))
            yield gm
        finally:
            with torch.no_grad():
                for n in touched:
                    lora.linear_weight(gm.layers[n].base).copy_(self._originals[n])  # type: ignore[index]

    @torch.no_grad()
    def evaluate_clients(
        self, trial: int, clients: list[int], corr: dict[str, np.ndarray], adapters: dict[int, Factors]
    ) -> dict[str, np.ndarray]:
        """(K,) held-out metrics (``EVAL_METRICS``) of ``clients``: the shared corrected base + each one's
        adapter, :func:`~clair_ray.workloads.lora.adapters.evaluate_lm`'s metrics for many clients per
        forward (the one evaluation path).

        The shared correction is added to the resident base weights (:meth:`_corrected_base`); each
        client's adapter, zero-padded to the LoRA rank, is one group
        (:func:`~clair_ray.workloads.lora.loop.grouped_evaluate`).
        """
        res = nan_metrics(self.K)
        for gm, chunk in self._loaded_chunks(clients, corr, adapters):
            out = self._evaluate_set(gm, trial, chunk, "test", self.test_data)
            for j, k in enumerate(chunk):
                for name, key in EVAL_METRICS.items():
                    res[name][k] = out[j][key]
            for name in self.probes():  # exact match on the probe's labelled tokens
                got = self._evaluate_set(
                    gm, trial, chunk, name, lambda t, k, n=name: self.probe_data(t, k, n)
                )
                res.setdefault(name, np.full(self.K, np.nan))
                for j, k in enumerate(chunk):
                    res[name][k] = got[j]["exact_match"]
        return res

    @torch.no_grad()
    def heldout_loss(
        self, trial: int, clients: list[int], corr: dict[str, np.ndarray], adapters: dict[int, Factors]
    ) -> np.ndarray:
        """(K,) each of ``clients``' mean token loss on its held-back rows (:meth:`heldout_rows`) under the
        shared correction plus its adapter, NaN elsewhere: what a client reports for ``refine: heldout``
        (the simulation's aggregator computes the numbers the clients would send back)."""
        res = np.full(self.K, np.nan)
        for gm, chunk in self._loaded_chunks(clients, corr, adapters):
            out = self._evaluate_set(gm, trial, chunk, "heldout", self.heldout_rows)
            res[chunk] = [o["loss"] for o in out]
        return res

    def _loaded_chunks(
        self, clients: list[int], corr: dict[str, np.ndarray], adapters: dict[int, Factors]
    ) -> Iterator[tuple[Any, list[int]]]:
        """(resident model, chunk) for chunks of ``clients``, each client's adapter (zero-padded to rank r)
        loaded as one group on the base plus the shared correction."""
        if not clients:
            return
        with self._corrected_base(corr) as gm:
            for c0 in range(0, len(clients), EVAL_GROUP):
                chunk = clients[c0 : c0 + EVAL_GROUP]
                gm.load_clients([gm.state_from_factors(adapters[k]) for k in chunk])
                yield gm, chunk

    def _evaluate_set(
        self, gm: Any, trial: int, chunk: list[int], kind: str, rows_of: Callable[[int, int], dict]
    ) -> list[dict[str, float]]:
        """:func:`~clair_ray.workloads.lora.loop.grouped_evaluate` of the loaded clients ``chunk`` on
        their ``kind`` rows, through the cached frozen prefix where there is one."""
        from clair_ray.workloads.lora.loop import grouped_evaluate

        data = [rows_of(trial, k) for k in chunk]
        hidden = [self.prefix_states((trial, k, kind), d) for k, d in zip(chunk, data, strict=True)]
        if hidden[0] is None:
            return grouped_evaluate(gm, data, rows=EVAL_ROWS)
        # Only the adapted layers run: forwards of 16 rows per client, each client's rows shortest first, so
        # that each forward is cut to a similar length in every client (the sums do not depend on order).
        order = [torch.argsort(d["attention_mask"].sum(dim=1), stable=True) for d in data]
        data = [{k: v[o] for k, v in d.items()} for d, o in zip(data, order, strict=True)]
        hidden = [h[o] for h, o in zip(hidden, order, strict=True)]  # type: ignore[index]
        return grouped_evaluate(gm, data, rows=16, hidden=hidden)  # type: ignore[arg-type]

    def client_metrics(self) -> tuple[str, ...]:
        """Every per-client column :meth:`evaluate_clients` fills."""
        return (*EVAL_METRICS, *self.probes())

    def probes(self) -> tuple[str, ...]:
        """Extra client metrics: each is the exact match of a client's model on its :meth:`probe_data` rows
        (e.g. a backdoor's attack success rate); none by default."""
        return ()

    def probe_data(self, trial: int, k: int, name: str) -> dict[str, torch.Tensor]:
        """Client k's rows of probe ``name`` (only the tokens to get right labelled)."""
        raise NotImplementedError(f"{type(self).__name__} defines no probe {name!r}")

    def evaluate_batch(self, trial: int, plan: Any, clients: list[int]) -> dict[str, dict[str, Any]]:
        """Held-out evaluation of some clients under every method of an evaluation plan (client actors).

        Args:
            trial: Trial index.
            plan: The plan's data (:func:`clair_ray.workloads.lora.rounds.aggregate_round`): per method the
                shared ``corr`` (module -> (out, in)), and either ``shared`` (one adapter for every client)
                or ``adapters`` (client -> factors), and the ``clients`` it evaluates.
            clients: The clients this call evaluates (each method evaluates those in its own list).

        Returns:
            Method -> ``{"clients": [...]}`` plus one list per ``EVAL_METRICS`` column.
        """
        out: dict[str, Any] = {}
        for method, p in plan.items():
            theirs = set(p["clients"])
            mine = [k for k in clients if k in theirs]
            if not mine:
                continue
            adapters = dict.fromkeys(mine, p["shared"]) if p["shared"] is not None else p["adapters"]
            got = self.evaluate_clients(trial, mine, p["corr"], adapters)
            out[method] = {
                "clients": mine,
                **{name: got[name][mine].tolist() for name in self.client_metrics()},
            }
        return out

    # ---- driver: export -----------------------------------------------------------------------------
    def export(self, trial: int, finals: dict[str, Any], out_dir: Path) -> list[Path]:
        """Writes each method's final models as peft adapter directories (``export_adapters``).

        Per method, under ``out_dir/<method>/``: ``correction.safetensors`` (the shared dense correction
        per module, (out, in), where the method has one; fold it into the base with
        :func:`~clair_ray.workloads.lora.adapters.fold_correction_file`), ``global/`` (the global adapter
        of a multi-round method, or a zero adapter for a one-shot global one, so every method loads the
        same way) and ``clients/client<k>/`` (each honest client's own adapter: ``local``, CLAIR's and
        the oracle's refinement). Load one with ``PeftModel.from_pretrained(base, dir)``.

        Args:
            trial: Trial index.
            finals: Method -> final state (:data:`~clair_ray.workloads.lora.trajectory.RoundState`).
            out_dir: Where the method directories go.

        Returns:
            The files and directories written.
        """
        from clair_ray.workloads.lora.adapters import export_states

        honest = set(range(self.K)) - set(self.contamination(trial).contaminated)
        return export_states(self._evaluator(), finals, honest, self.spec.r, out_dir)

    # ---- aggregator actor ---------------------------------------------------------------------------
    def aggregate_round(
        self, trial: int, round_: int, groups: list[Group], prev: Any, evaluate: bool = False
    ) -> RoundOutput:
        """See :func:`clair_ray.workloads.lora.rounds.aggregate_round`."""
        return rounds.aggregate_round(self, trial, round_, groups, prev, evaluate=evaluate)
