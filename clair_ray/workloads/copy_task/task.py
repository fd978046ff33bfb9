"""The paper's copy-task workload: a tiny decoder-only Transformer whose clients LoRA-adapt a shared base.

A sequence is ``prefix (L content tokens) + SEP + target (L tokens)`` with ``target_i = σ(prefix_i)`` for
a token map σ; the loss is on the target positions only. Token ids: content tokens ``0 .. V-2``, SEP =
``V-1`` (V = ``vocab_size``).

- **Base W_0**: full fine-tuning of a freshly initialised GPT-2 (or Llama) on the identity copy (σ = id),
  cached on disk under a hash of its config (:func:`build_base`), reloaded with ``from_pretrained``.
  LoRA cannot learn the copy from a random init (a randomly initialised GPT-2 with LoRA reaches a few
  percent copy accuracy where full fine-tuning solves it in a few hundred steps).
- **Client variants**: every honest client's σ applies
  ``n_common`` *common* substitutions (the shared component, hard to learn from a few sequences) plus
  ``n_personal`` *personal* substitutions on the same tokens for everyone, whose targets depend on the
  client's cluster (``client_id % n_clusters``): the clusters conflict. ``heterogeneity`` h in [0, 1] sets
  how many personal tokens conflict, ``round(h · n_personal)``; the others map alike in every cluster, so
  h = 0 makes every honest task identical. The local data size is ``n_sequences`` of :func:`client_data`.
- **Data contamination** (:func:`corrupt_copy_targets`): ``random``, ``shuffle`` and ``shifted`` from
  :func:`clair_ray.attacks.corrupt_targets` (``shifted`` = token id + 1 mod the content vocabulary), and
  two kinds defined here: ``reversed`` (target in reverse order) and the subtle ``flip`` (1–2 pairs of
  target tokens swapped everywhere, a consistent small change of σ). In an attack mix they are named
  ``data_<kind>`` as in attacks.py; :data:`DATA_ATTACK_KINDS` lists them.

Everything is deterministic given the seeds; ``torch.set_num_threads`` is left to the caller.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clair_ray import attacks
from clair_ray.workloads.base import check_fields
from clair_ray.workloads.lora.spec import LoRAWorkloadConfig

if TYPE_CHECKING:
    pass

# transformers and peft (through lora.py) are imported where a model is built or trained, so that the
# task's configs and data (what a driver or an aggregator needs) load without them.

__all__ = [
    "ARCHS",
    "COPY_CORRUPTIONS",
    "DATA_ATTACK_KINDS",
    "CopyBaseConfig",
    "CopyTaskConfig",
    "base_key",
    "base_metrics",
    "base_path",
    "build_base",
    "client_data",
    "cluster_of",
    "corrupt_copy_targets",
    "default_targets",
    "is_cached",
    "load_base",
    "make_model",
    "substitution_map",
]

ARCHS: tuple[str, ...] = ("gpt2", "llama")
#: Target corruptions of this workload: attacks.py's three plus two copy-specific ones.
COPY_CORRUPTIONS: tuple[str, ...] = (*attacks.TARGET_CORRUPTIONS, "reversed", "flip")
#: As they appear in an attack mix.
DATA_ATTACK_KINDS: tuple[str, ...] = tuple(f"data_{k}" for k in COPY_CORRUPTIONS)
_CACHE_FORMAT = 1  # bump when the base training changes, so stale caches are not reused
_MARKER = "clair_copy_base.json"
_SPLITS = {"train": 0, "test": 1, "base": 2}


@dataclass
class CopyBaseConfig:
    """What the base W_0 is (``workload.base``; all fields enter the cache key).

    Attributes:
        arch: "gpt2" or "llama".
        vocab_size: V; content tokens are 0..V-2 and SEP is V-1.
        prefix_len: L, tokens to copy (sequence length 2L + 1).
        n_layer: Transformer blocks.
        n_embd: Model width.
        n_head: Attention heads (must divide n_embd).
        steps: Full fine-tuning steps on the identity copy.
        lr: AdamW learning rate of that training.
        batch_size: Sequences per step (fresh random prefixes every step).
        seed: Seed of the initialisation and of the base data.
    """

    arch: str = "gpt2"
    vocab_size: int = 32
    prefix_len: int = 8
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        mins = (("vocab_size", 4), ("prefix_len", 1), ("n_layer", 1), ("n_embd", 2), ("n_head", 1))
        mins += (("steps", 0), ("batch_size", 1), ("seed", 0))
        checks = [
            (_is_int(getattr(self, n), lo), n, getattr(self, n), f"must be an integer >= {lo}")
            for n, lo in mins
        ]
        checks += [
            (self.arch in ARCHS, "arch", self.arch, f"must be one of {list(ARCHS)}"),
            (
                self.n_head < 1 or self.n_embd % self.n_head == 0,
                "n_head",
                self.n_head,
                f"must divide n_embd={self.n_embd}",
            ),
            (_is_real(self.lr) and self.lr > 0, "lr", self.lr, "must be finite and > 0"),
        ]
        check_fields("workload.base", checks)

    @property
    def n_content(self) -> int:
        """Number of content tokens (everything but SEP)."""
        return self.vocab_size - 1

    @property
    def sep(self) -> int:
        """The separator token id."""
        return self.vocab_size - 1


def _is_int(v: object, lo: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= lo


def _is_real(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass
class CopyTaskConfig(LoRAWorkloadConfig):
    """The copy-task workload's section (``workload.name: copy_task``): the base, the clients' task
    variants on top of it, and the data sizes. The LoRA knobs are in ``workload.lora``.

    Attributes:
        base: The base model and sequence format (``workload.base``).
        n_common: Substitutions every honest client needs (the shared component).
        n_personal: Tokens with cluster-dependent (personal) substitutions.
        n_clusters: Groups of honest clients whose personal substitutions conflict.
        heterogeneity: h in [0, 1]: round(h · n_personal) personal tokens differ across clusters (0: all
            honest tasks identical; 1: every personal token conflicts).
        task_seed: Seed of which tokens are substituted and by what (the same for every client).
        n_sequences: Local training sequences per client (the data-size knob).
        test_sequences: Held-out sequences per honest client for evaluation.
        n_flips: Token pairs swapped by the ``data_flip`` corruption.
        cache_dir: Where the base is cached (None: ``$CLAIR_CACHE`` or ``~/.cache/clair_ray``).
    """

    name: str = "copy_task"
    base: CopyBaseConfig = field(default_factory=CopyBaseConfig)
    n_common: int = 6
    n_personal: int = 4
    n_clusters: int = 2
    heterogeneity: float = 1.0
    task_seed: int = 0
    n_sequences: int = 8
    test_sequences: int = 128
    n_flips: int = 2
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.base, Mapping):  # e.g. built from a plain dict
            self.base = CopyBaseConfig(**self.base)
        mins = (("n_common", 0), ("n_personal", 0), ("n_clusters", 1), ("task_seed", 0))
        mins += (("n_sequences", 1), ("test_sequences", 1), ("n_flips", 1))
        checks = [
            (_is_int(getattr(self, n), lo), n, getattr(self, n), f"must be an integer >= {lo}")
            for n, lo in mins
        ]
        n, h = self.base.n_content, self.heterogeneity
        checks += [
            (_is_real(h) and 0.0 <= h <= 1.0, "heterogeneity", h, "must be in [0, 1]"),
            (
                self.n_common + self.n_personal <= n,
                "n_common",
                self.n_common,
                f"n_common + n_personal must be <= vocab_size - 1 = {n}",
            ),
            (
                not self.n_personal or self.n_clusters < n,
                "n_clusters",
                self.n_clusters,
                f"must be < {n} content tokens",
            ),
            (2 * self.n_flips <= n, "n_flips", self.n_flips, "must be <= (vocab_size - 1) / 2"),
        ]
        check_fields("workload", checks)


# ---------------------------------------------------------------------------------------------------------
# Tasks and data
# ---------------------------------------------------------------------------------------------------------


def cluster_of(task_cfg: CopyTaskConfig, client_id: int) -> int:
    """The cluster of an honest client: ``client_id % n_clusters``."""
    return int(client_id) % task_cfg.n_clusters


def _distinct_targets(rng: np.random.Generator, token: int, n_content: int, count: int) -> list[int]:
    """``count`` distinct tokens different from ``token`` (so every substitution changes the token)."""
    others = np.array([t for t in range(n_content) if t != token])
    return [int(t) for t in rng.choice(others, size=count, replace=False)]


def substitution_map(task_cfg: CopyTaskConfig, client_id: int | None) -> np.ndarray:
    """The token map σ of a client's task (``None``: the base task, the identity).

    Args:
        task_cfg: The task variants.
        client_id: The client (its cluster picks the personal substitutions), or None.

    Returns:
        (n_content,) int64 array: target token of each content token.
    """
    n = task_cfg.base.n_content
    sigma = np.arange(n, dtype=np.int64)
    if client_id is None:
        return sigma
    rng = np.random.default_rng(np.random.SeedSequence([task_cfg.task_seed, 0xC0B1]))
    tokens = rng.permutation(n)[: task_cfg.n_common + task_cfg.n_personal]
    common, personal = tokens[: task_cfg.n_common], tokens[task_cfg.n_common :]
    for t in common:
        sigma[t] = _distinct_targets(rng, int(t), n, 1)[0]
    n_conflict = int(round(task_cfg.heterogeneity * task_cfg.n_personal))
    cluster = cluster_of(task_cfg, client_id)
    for i, t in enumerate(personal):
        # Draw a target per cluster for every personal token (fixed draws whatever h is), so changing h
        # only changes which tokens conflict, not the maps themselves.
        per_cluster = _distinct_targets(rng, int(t), n, task_cfg.n_clusters)
        sigma[t] = per_cluster[cluster] if i < n_conflict else per_cluster[0]
    return sigma


def corrupt_copy_targets(
    kind: str, targets: torch.Tensor, generator: torch.Generator, *, num_classes: int, n_flips: int = 1
) -> torch.Tensor:
    """Corrupts copy-task targets (data contamination).

    Kinds: ``random`` (uniform tokens), ``shuffle`` (targets of other sequences), ``shifted`` (token id
    + 1 mod ``num_classes``), all from :func:`clair_ray.attacks.corrupt_targets`; ``reversed`` (each
    target in reverse order); ``flip`` (``n_flips`` random pairs of tokens swapped wherever they occur:
    a subtle, consistent change of 1–2 entries of σ). A ``data_`` prefix is accepted.

    Args:
        kind: One of :data:`COPY_CORRUPTIONS`.
        targets: (n, L) int64 target tokens in ``[0, num_classes)``.
        generator: Source of randomness.
        num_classes: Content vocabulary size.
        n_flips: Token pairs swapped by ``flip`` (1 or 2).

    Returns:
        (n, L) corrupted targets.

    Raises:
        ValueError: On an unknown kind or bad parameter.
    """
    kind = kind.removeprefix("data_")
    if kind not in COPY_CORRUPTIONS:
        raise ValueError(f"unknown copy-task corruption {kind!r}; valid kinds: {', '.join(COPY_CORRUPTIONS)}")
    if kind in attacks.TARGET_CORRUPTIONS:
        params = {} if kind == "shuffle" else {"num_classes": num_classes}
        return attacks.corrupt_targets(kind, targets, generator, **params)
    if kind == "reversed":
        return targets.flip(1)  # (n, L)
    if isinstance(n_flips, bool) or not isinstance(n_flips, int) or not 1 <= n_flips <= num_classes // 2:
        raise ValueError(f"n_flips must be an integer in [1, {num_classes // 2}], got {n_flips!r}")
    toks = torch.randperm(num_classes, generator=generator)[: 2 * n_flips]
    perm = torch.arange(num_classes)
    perm[toks[0::2]], perm[toks[1::2]] = toks[1::2], toks[0::2]  # swap each pair
    return perm[targets]


# The copy task's own data attacks, next to the corruption that implements them.
for _kind in ("reversed", "flip"):
    attacks.register_attack(f"data_{_kind}")(corrupt_copy_targets)


def _sequences(cfg: CopyBaseConfig, prefix: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """input_ids = prefix + SEP + target; labels = -100 except on the target positions."""
    n = prefix.shape[0]
    sep = torch.full((n, 1), cfg.sep, dtype=torch.long)
    ids = torch.cat([prefix, sep, target], dim=1)  # (n, 2L+1)
    labels = ids.clone()
    labels[:, : cfg.prefix_len + 1] = -100  # loss on the target only
    return {"input_ids": ids, "labels": labels, "prefix": prefix, "target": target}


def client_data(
    task_cfg: CopyTaskConfig,
    client_id: int | None,
    seed: int,
    n_sequences: int,
    *,
    split: str = "train",
    corruption: str | None = None,
    n_flips: int = 1,
) -> dict[str, torch.Tensor]:
    """A client's sequences: deterministic in (task, client, seed, split).

    Args:
        task_cfg: The task variants.
        client_id: The client (None: the base identity task).
        seed: Data seed (e.g. derived per trial and client by the engine).
        n_sequences: Local data size.
        split: "train" or "test" (independent draws for the same seed), or "base".
        corruption: Optional data contamination kind (:data:`COPY_CORRUPTIONS`, ``data_`` prefix ok),
            applied to the targets; the clean task is unchanged. Use None for held-out evaluation.
        n_flips: Token pairs swapped by ``flip``.

    Returns:
        ``input_ids`` and ``labels`` (n, 2L+1), ``prefix`` and ``target`` (n, L), all int64.
    """
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 1:
        raise ValueError(f"n_sequences must be a positive integer, got {n_sequences!r}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    cfg = task_cfg.base
    cid = -1 if client_id is None else int(client_id)
    ss = np.random.SeedSequence([int(seed), cid + 1, _SPLITS[split]])
    rng = np.random.default_rng(ss)
    prefix = torch.from_numpy(rng.integers(0, cfg.n_content, size=(n_sequences, cfg.prefix_len)))  # (n, L)
    sigma = torch.from_numpy(substitution_map(task_cfg, client_id))
    target = sigma[prefix]  # (n, L)
    if corruption is not None:
        gen = torch.Generator().manual_seed(int(ss.spawn(1)[0].generate_state(1)[0]))
        target = corrupt_copy_targets(corruption, target, gen, num_classes=cfg.n_content, n_flips=n_flips)
    return _sequences(cfg, prefix, target)


# ---------------------------------------------------------------------------------------------------------
# Model and cached base
# ---------------------------------------------------------------------------------------------------------


def default_targets(arch: str) -> list[str]:
    """LoRA target modules of an architecture (every projection of attention and MLP)."""
    if arch == "gpt2":
        return ["c_attn", "c_proj", "c_fc"]
    if arch == "llama":
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def make_model(cfg: CopyBaseConfig) -> torch.nn.Module:
    """A freshly initialised tiny causal LM (no dropout), seeded by ``cfg.seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from clair_ray.workloads.lora import adapters as lora

    n_pos = 2 * cfg.prefix_len + 1
    # bos/eos inside the vocabulary (transformers warns about GPT-2's default 50256 otherwise).
    ids = {"bos_token_id": cfg.sep, "eos_token_id": cfg.sep, "pad_token_id": cfg.sep}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.arch == "gpt2":
            conf = GPT2Config(
                vocab_size=cfg.vocab_size,
                n_positions=n_pos,
                n_embd=cfg.n_embd,
                n_layer=cfg.n_layer,
                n_head=cfg.n_head,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **ids,
            )
            model: torch.nn.Module = GPT2LMHeadModel(conf)
        else:
            conf = LlamaConfig(
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.n_embd,
                intermediate_size=2 * cfg.n_embd,
                num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head,
                num_key_value_heads=cfg.n_head,
                max_position_embeddings=n_pos,
                attention_dropout=0.0,
                **ids,
            )
            model = LlamaForCausalLM(conf)
    return lora.quiet_model(model)


def base_key(cfg: CopyBaseConfig) -> str:
    """The cache key: a hash of the base config (and of the cache format)."""
    blob = json.dumps({"format": _CACHE_FORMAT, **asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _train_base(cfg: CopyBaseConfig) -> torch.nn.Module:
    """Full fine-tuning on the identity copy with fresh random prefixes every step."""
    from clair_ray.workloads.lora import adapters as lora

    model = make_model(cfg)
    task = CopyTaskConfig(base=cfg, n_common=0, n_personal=0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    model.train()
    for step in range(cfg.steps):
        batch = client_data(task, None, cfg.seed * 1_000_003 + step, cfg.batch_size, split="base")
        loss = lora.lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


def base_path(cfg: CopyBaseConfig, cache_dir: str | os.PathLike) -> Path:
    """Where the base of ``cfg`` is cached (it exists once :func:`build_base` finished)."""
    return Path(cache_dir) / f"copy-base-{cfg.arch}-{base_key(cfg)}"


def is_cached(cfg: CopyBaseConfig, cache_dir: str | os.PathLike) -> bool:
    """Whether the base of ``cfg`` is in the cache already."""
    return (base_path(cfg, cache_dir) / _MARKER).exists()


def build_base(cfg: CopyBaseConfig, cache_dir: str | os.PathLike) -> Path:
    """Trains the base W_0 on the identity copy, or finds it in the cache.

    The directory is ``cache_dir/copy-base-<arch>-<hash of cfg>``, written by ``save_pretrained`` into a
    temporary directory and renamed into place, so a crash never leaves a half-written cache entry and
    two concurrent builders cannot corrupt each other (the second rename loses and is discarded).

    Args:
        cfg: The base config.
        cache_dir: Cache root (created if missing).

    Returns:
        The model directory; load it with :func:`load_base`.
    """
    root = Path(cache_dir)
    path = base_path(cfg, root)
    if (path / _MARKER).exists():
        return path  # before importing peft: a run with a cached base starts seconds sooner
    from clair_ray.workloads.lora import adapters as lora

    root.mkdir(parents=True, exist_ok=True)
    model = _train_base(cfg)
    heldout = client_data(
        CopyTaskConfig(base=cfg, n_common=0, n_personal=0), None, cfg.seed, 256, split="test"
    )
    metrics = lora.evaluate_lm(model, heldout)
    tmp = Path(tempfile.mkdtemp(prefix=".copy-base-", dir=root))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Writing model shards" bar in a run's output
        model.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"config": asdict(cfg), "identity_copy": metrics}, indent=1))
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / _MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_base(path: str | os.PathLike) -> torch.nn.Module:
    """Loads a base model directory with ``AutoModelForCausalLM.from_pretrained`` (eval mode)."""
    from transformers import AutoModelForCausalLM

    from clair_ray.workloads.lora import adapters as lora

    model = AutoModelForCausalLM.from_pretrained(str(path))
    model.eval()
    return lora.quiet_model(model)


def base_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """What :func:`build_base` recorded next to the model (config and identity-copy metrics)."""
    return json.loads((Path(path) / _MARKER).read_text())


# ---------------------------------------------------------------------------------------------------------
# Client training and evaluation (shared LoRA code in lora.py)
# ---------------------------------------------------------------------------------------------------------
