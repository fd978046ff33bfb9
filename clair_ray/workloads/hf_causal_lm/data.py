"""Any Hugging Face causal LM as a workload: local (or hub) model, local text data, client partitions.

- Model and tokenizer: ``name_or_path`` is a local directory written by ``save_pretrained`` (or a hub id
  on machines that reach a hub), loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``.
- Data: a JSONL or Parquet file (or a directory of them) with a ``text`` column and an optional label
  column, tokenised with the model's tokenizer; the loss is on every real (non-padding) token.
- Partitions among clients: ``iid`` (equal shares of a seeded permutation), ``dirichlet`` (per label,
  client shares ~ Dir(alpha): small alpha = each client sees few labels) and ``quantity`` (client sizes ~
  Dir(alpha), at least ``min_size`` each). All are seeded and cover every sample exactly once.
- Training, factor extraction and evaluation are the shared LoRA functions of
  :mod:`clair_ray.workloads.lora`.

:func:`write_tiny_model` writes a tiny GPT-2 or Llama plus a word-level tokenizer trained on a corpus, for
tests and demos on machines without a hub.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clair_ray.workloads.base import check_fields
from clair_ray.workloads.lora.spec import LoRAWorkloadConfig

if TYPE_CHECKING:
    pass

# peft (through adapters.py) and transformers are imported where a model is loaded or trained: the
# driver reads data and partitions without them.

__all__ = [
    "CLIENT_SELECT",
    "PARTITIONS",
    "HFCausalLMConfig",
    "client_subset",
    "load_model",
    "read_columns",
    "load_texts",
    "load_tokenizer",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "pad_rows",
    "partition_natural",
    "partition_quantity",
    "tokenize",
    "write_tiny_model",
]

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "quantity", "natural")
CLIENT_SELECT: tuple[str, ...] = ("largest", "random")
_SUFFIXES = (".jsonl", ".parquet")


@dataclass
class HFCausalLMConfig(LoRAWorkloadConfig):
    """Any Hugging Face causal LM on local text data (``workload.name: hf_causal_lm``); the LoRA knobs are
    in ``workload.lora``.

    Attributes:
        name_or_path: A local directory written by ``save_pretrained`` (or a hub id where a hub is
            reachable) holding the model and its tokenizer.
        data_path: A ``.jsonl`` / ``.parquet`` file or a directory of them.
        text_column: Column with the text.
        label_column: Column with a label (needed by the ``dirichlet`` partition).
        max_length: Tokens per sequence (truncated / padded).
        partition: ``iid``, ``dirichlet`` (over ``label_column``), ``quantity`` (skewed client sizes) or
            ``natural`` (one client per value of ``client_column``, e.g. a Shakespeare character).
        client_column: ``natural`` partition: the column whose values are the clients.
        client_select: ``natural`` partition: which of the values with at least ``min_size`` samples
            become the K clients: the ``largest`` (ties by value) or a seeded ``random`` sample.
        max_client_samples: ``natural`` partition: at most this many samples per client (a seeded subset
            in file order; 0: all), so that a few very large clients do not dominate the run time.
        partition_alpha: Dirichlet concentration of ``dirichlet`` / ``quantity`` (smaller: more skewed).
        min_size: Fewest samples a client may get.
        test_fraction: Share of each client's samples held out for its evaluation.
        max_samples: Use at most this many samples of the data (0: all), taken before partitioning.
    """

    name: str = "hf_causal_lm"
    name_or_path: str = ""
    data_path: str = ""
    text_column: str = "text"
    label_column: str | None = None
    max_length: int = 64
    partition: str = "iid"
    partition_alpha: float = 0.5
    min_size: int = 2
    test_fraction: float = 0.25
    max_samples: int = 0
    client_column: str | None = None
    client_select: str = "largest"
    max_client_samples: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.partition_alpha
        check_fields(
            "workload",
            [
                (
                    bool(self.name_or_path),
                    "name_or_path",
                    self.name_or_path,
                    "must name a model dir or hub id",
                ),
                (
                    bool(self.data_path),
                    "data_path",
                    self.data_path,
                    "must name a .jsonl/.parquet file or dir",
                ),
                (bool(self.text_column), "text_column", self.text_column, "must name a column"),
                (self.max_length >= 2, "max_length", self.max_length, "must be >= 2"),
                (
                    self.partition in PARTITIONS,
                    "partition",
                    self.partition,
                    f"must be one of {list(PARTITIONS)}",
                ),
                (
                    self.partition != "dirichlet" or bool(self.label_column),
                    "label_column",
                    self.label_column,
                    "must name a column with partition=dirichlet",
                ),
                (math.isfinite(a) and a > 0, "partition_alpha", a, "must be finite and > 0"),
                (
                    self.min_size >= 2,
                    "min_size",
                    self.min_size,
                    "must be >= 2 (a client needs train and test)",
                ),
                (0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "must be in (0, 1)"),
                (self.max_samples >= 0, "max_samples", self.max_samples, "must be >= 0 (0: all)"),
                (
                    self.partition != "natural" or bool(self.client_column),
                    "client_column",
                    self.client_column,
                    "must name a column with partition=natural",
                ),
                (
                    self.client_select in CLIENT_SELECT,
                    "client_select",
                    self.client_select,
                    f"must be one of {list(CLIENT_SELECT)}",
                ),
                (
                    self.max_client_samples == 0 or self.max_client_samples >= self.min_size,
                    "max_client_samples",
                    self.max_client_samples,
                    f"must be 0 (all) or >= min_size={self.min_size}",
                ),
                (
                    self.partition != "natural" or self.max_samples == 0,
                    "max_samples",
                    self.max_samples,
                    "must be 0 with partition=natural (cap clients with max_client_samples)",
                ),
            ],
        )


# ---------------------------------------------------------------------------------------------------------
# Model, tokenizer, data
# ---------------------------------------------------------------------------------------------------------


def check_model_path(name_or_path: str | os.PathLike) -> None:
    """A local-looking ``name_or_path`` (absolute, ``./``, ``../``, ``~``, or more than one ``/``) must be
    a directory with a ``config.json``; otherwise transformers would take it for a hub id and try the
    network (minutes without one).

    Raises:
        ValueError: Naming ``workload.name_or_path`` and what is missing.
    """
    s = str(name_or_path)
    local = s.startswith(("/", "./", "../", "~")) or s.count("/") > 1 or Path(s).exists()
    if not local:
        return
    path = Path(s).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"workload.name_or_path={s!r}: no such directory (a local model written by save_pretrained)"
        )
    if not (path / "config.json").exists():
        raise ValueError(f"workload.name_or_path={s!r}: no config.json in that directory (not a saved model)")


def check_weight_files(model_dir: str | os.PathLike) -> None:
    """Every ``*.safetensors`` file of a local model directory is whole: its header parses and the file is
    as long as the header says (read without loading the weights, so a truncated download fails on the
    driver, not in every actor).

    Raises:
        ValueError: Naming the file and what is wrong.
    """
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        return
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n)) if 0 < n <= size - 8 else None
        except (OSError, ValueError) as exc:
            raise ValueError(f"{f}: not a readable safetensors file ({exc})") from exc
        if not isinstance(header, dict):
            raise ValueError(
                f"{f}: not a safetensors file (no valid header); re-save or re-download the model"
            )
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if size < 8 + n + end:
            raise ValueError(
                f"{f}: truncated ({size} bytes, the header describes {8 + n + end}); re-save or re-download "
                "the model"
            )


def load_model(name_or_path: str | os.PathLike) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` (eval mode, loss type named so transformers stays quiet)."""
    from transformers import AutoModelForCausalLM

    from clair_ray.workloads.lora import adapters as lora

    check_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path))
    model.eval()
    return lora.quiet_model(model)


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """``AutoTokenizer.from_pretrained``; a missing pad token falls back to EOS (many causal LMs lack one).

    Returns:
        A transformers ``PreTrainedTokenizerBase``.
    """
    from transformers import AutoTokenizer

    check_model_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer at {name_or_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES)
        if not files:
            raise ValueError(f"workload.data_path={str(path)!r}: no .jsonl or .parquet files in it")
        return files
    if path.suffix not in _SUFFIXES:
        raise ValueError(f"workload.data_path={str(path)!r}: expected a .jsonl or .parquet file")
    if not path.exists():
        raise ValueError(f"workload.data_path={str(path)!r}: no such file")
    return [path]


def read_columns(data_path: str | os.PathLike, columns: Sequence[str]) -> dict[str, list]:
    """Columns of a JSONL / Parquet file (or a directory of them), in file order.

    Raises:
        ValueError: On a missing file or column, or a JSONL line that is not a JSON object (naming the
            file and line).
    """
    rows: dict[str, list] = {c: [] for c in columns}
    for f in _data_files(Path(data_path)):
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(f).names
            for col in rows:
                if col not in names:
                    raise ValueError(f"{f}: no column {col!r}; columns: {names}")
            table = pq.read_table(f, columns=list(rows))
            for col in rows:
                rows[col].extend(table.column(col).to_pylist())
        else:
            with open(f, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:  # json's own "line 1" is of the one record
                        raise ValueError(
                            f"{f}:{i + 1}: not valid JSON ({exc.msg} at column {exc.colno})"
                        ) from exc
                    if not isinstance(rec, dict):
                        raise ValueError(
                            f"{f}:{i + 1}: expected a JSON object per line, got {type(rec).__name__}"
                        )
                    for col in rows:
                        if col not in rec:
                            raise ValueError(f"{f}:{i + 1}: no field {col!r}")
                        rows[col].append(rec[col])
    return rows


def load_texts(cfg: HFCausalLMConfig) -> tuple[list[str], list | None]:
    """Reads texts (and labels) from JSONL / Parquet.

    Args:
        cfg: The workload section (``data_path``, ``text_column``, ``label_column``).

    Returns:
        (texts, labels or None), in file order.

    Raises:
        ValueError: On a missing file or column.
    """
    rows = read_columns(cfg.data_path, [cfg.text_column, *([cfg.label_column] if cfg.label_column else [])])
    texts = rows[cfg.text_column]
    if not texts:
        raise ValueError(f"workload.data_path={cfg.data_path!r}: no rows (empty data)")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:  # str(None) would silently train on the text "None"
        raise ValueError(
            f"workload.data_path={cfg.data_path!r}: {len(bad)} row(s) with a {cfg.text_column!r} that is not "
            f"text (row {bad[0] + 1}: {texts[bad[0]]!r})"
        )
    return list(texts), (rows[cfg.label_column] if cfg.label_column else None)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenises texts to fixed-length rows; padding is masked out of the loss.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (n, T), T = min(max_length, longest text);
        labels are the input ids with -100 on padding.
    """
    enc = tokenizer(
        list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt"
    )
    ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()  # (n, T)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_rows(data: Mapping[str, torch.Tensor], t: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads tokenised rows to T = ``t`` tokens (padding masked out and unlabelled)."""
    extra = t - data["input_ids"].shape[1]
    if extra <= 0:
        return dict(data)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) for k, v in data.items()}


# ---------------------------------------------------------------------------------------------------------
# Partitions
# ---------------------------------------------------------------------------------------------------------


def _check_clients(n: int, n_clients: int, min_size: int = 0) -> None:
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"n_clients must be a positive integer, got {n_clients!r}")
    if n < n_clients * max(min_size, 0):
        raise ValueError(f"{n} samples cannot give {n_clients} clients at least min_size={min_size} each")


def partition_iid(n: int, n_clients: int, seed: int) -> list[np.ndarray]:
    """Equal shares (sizes differ by at most 1) of a seeded permutation of ``range(n)``."""
    _check_clients(n, n_clients)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, n_clients)]


def partition_quantity(
    n: int, n_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Quantity skew: client sizes are ``min_size`` + a Dir(alpha) share of the rest (largest remainder)."""
    _check_clients(n, n_clients, min_size)
    rng = np.random.default_rng(seed)
    props = rng.dirichlet(np.full(n_clients, float(alpha)))  # (K,)
    extra = n - min_size * n_clients
    quota = props * extra
    counts = np.floor(quota).astype(int)
    counts[np.argsort(-(quota - counts), kind="stable")[: extra - counts.sum()]] += 1
    sizes = counts + min_size
    perm = rng.permutation(n)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def partition_dirichlet(
    labels: Sequence, n_clients: int, alpha: float, seed: int, min_size: int = 1, max_tries: int = 100
) -> list[np.ndarray]:
    """Label skew: each label's samples are split among clients by shares ~ Dir(alpha).

    Draws are redrawn (from the same seeded generator, so still deterministic) until every client has at
    least ``min_size`` samples.

    Raises:
        ValueError: If ``max_tries`` draws never give every client ``min_size`` samples.
    """
    labels_arr = np.asarray(labels)
    n = len(labels_arr)
    _check_clients(n, n_clients, min_size)
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels_arr.tolist()), key=repr)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels_arr == c))
            props = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"partition_dirichlet: no draw in {max_tries} gave every one of {n_clients} clients "
        f"min_size={min_size} samples with alpha={alpha}; raise alpha or lower min_size"
    )


def partition_natural(
    values: Sequence,
    n_clients: int,
    min_size: int,
    select: str = "largest",
    seed: int = 0,
    max_per_client: int = 0,
) -> tuple[list[np.ndarray], list]:
    """One client per value of a column: the data's own partition (e.g. a character of a play).

    Values with at least ``min_size`` samples qualify; the K clients are the ``largest`` of them (more
    samples first, ties by value) or a seeded ``random`` sample, returned in that order.

    Args:
        values: (n,) the client column, one value per sample.
        n_clients: K.
        min_size: Fewest samples a qualifying value has.
        select: ``largest`` or ``random``.
        seed: Seed of the ``random`` selection and of the ``max_per_client`` subsets.
        max_per_client: At most this many samples per client, a seeded subset (0: all).

    Returns:
        (K sorted index arrays into ``values``, the K client values).

    Raises:
        ValueError: If fewer than K values have ``min_size`` samples.
    """
    _check_clients(len(values), n_clients)
    groups: dict = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)
    ok = sorted(
        (v for v, idx in groups.items() if len(idx) >= min_size), key=lambda v: (-len(groups[v]), repr(v))
    )
    if len(ok) < n_clients:
        raise ValueError(
            f"only {len(ok)} of the {len(groups)} client values have at least min_size={min_size} samples, "
            f"fewer than num_clients={n_clients}; lower min_size or num_clients"
        )
    rng = np.random.default_rng(seed)
    if select == "largest":
        chosen = ok[:n_clients]
    elif select == "random":
        chosen = [ok[i] for i in np.sort(rng.choice(len(ok), n_clients, replace=False))]
    else:
        raise ValueError(f"client_select must be one of {list(CLIENT_SELECT)}, got {select!r}")
    parts = []
    for v in chosen:
        idx = np.asarray(groups[v], dtype=np.int64)
        if max_per_client and len(idx) > max_per_client:
            idx = np.sort(rng.choice(idx, max_per_client, replace=False))
        parts.append(idx)
    return parts, chosen


def partition(
    cfg: HFCausalLMConfig, n: int, n_clients: int, seed: int, labels: Sequence | None = None
) -> list[np.ndarray]:
    """Dispatches to the partitioner ``cfg.partition`` names (with ``partition_alpha``, ``min_size``);
    returns K sorted index arrays."""
    if cfg.partition == "iid":
        return partition_iid(n, n_clients, seed)
    if cfg.partition == "natural":
        raise ValueError("the natural partition needs the client column: use partition_natural")
    if cfg.partition == "quantity":
        return partition_quantity(n, n_clients, cfg.partition_alpha, seed, cfg.min_size)
    if labels is None:
        raise ValueError("workload.partition='dirichlet' needs labels (set workload.label_column)")
    if len(labels) != n:
        raise ValueError(f"labels: {len(labels)} labels for {n} samples")
    return partition_dirichlet(labels, n_clients, cfg.partition_alpha, seed, cfg.min_size)


def client_subset(data: Mapping[str, torch.Tensor], indices: np.ndarray) -> dict[str, torch.Tensor]:
    """One client's rows of the tokenised data."""
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    return {k: v[idx] for k, v in data.items()}


# ---------------------------------------------------------------------------------------------------------
# Clients (shared LoRA code)
# ---------------------------------------------------------------------------------------------------------


def write_tiny_model(
    out_dir: str | os.PathLike, texts: Sequence[str], arch: str = "gpt2", width: int = 32, seed: int = 0
) -> Path:
    """Writes a tiny causal LM and a word-level tokenizer trained on ``texts`` (tests and demos).

    Args:
        out_dir: Directory to ``save_pretrained`` both into.
        texts: Corpus for the tokenizer's vocabulary.
        arch: "gpt2" or "llama".
        width: Hidden size.
        seed: Initialisation seed.

    Returns:
        The directory (load it with :func:`load_model` and :func:`load_tokenizer`).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    out = Path(out_dir)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        list(texts), trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    vocab, pad, eos = len(fast), fast.pad_token_id, fast.eos_token_id
    ids = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "gpt2":
            conf = GPT2Config(
                vocab_size=vocab,
                n_positions=128,
                n_embd=width,
                n_layer=1,
                n_head=2,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **ids,
            )
            model: torch.nn.Module = GPT2LMHeadModel(conf)
        elif arch == "llama":
            conf = LlamaConfig(
                vocab_size=vocab,
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=128,
                **ids,
            )
            model = LlamaForCausalLM(conf)
        else:
            raise ValueError(f"arch must be 'gpt2' or 'llama', got {arch!r}")
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out
