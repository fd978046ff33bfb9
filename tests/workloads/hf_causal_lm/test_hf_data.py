"""HF causal-LM workload: tiny GPT-2 / Llama through from_pretrained, JSONL and Parquet data, partitions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import clair_ray
from clair_ray.workloads.hf_causal_lm import data as hf
from clair_ray.workloads.lora import adapters as lora

WORDS = ["red", "green", "blue", "cat", "dog", "runs", "sleeps", "fast", "slow", "the", "a", "big"]


def corpus(n: int = 60, seed: int = 0) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 3
        words = rng.choice(WORDS[label * 4 : label * 4 + 4], size=int(rng.integers(3, 8)))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    texts, labels = corpus()
    jsonl = root / "train.jsonl"
    lines = [json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True)]
    jsonl.write_text("".join(lines))
    parquet = root / "train.parquet"
    pq.write_table(pa.table({"text": texts, "label": labels}), parquet)
    return {"jsonl": jsonl, "parquet": parquet}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, hf.write_tiny_model(
        tmp_path_factory.mktemp(request.param), corpus()[0], arch=request.param
    )


def section(**kw: object) -> hf.HFCausalLMConfig:
    """The hf_causal_lm workload section (the data functions read it)."""
    return hf.HFCausalLMConfig(**{"name_or_path": "unused-model", "data_path": "unused.jsonl", **kw})


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_load_texts(data_files: dict[str, Path], fmt: str) -> None:
    texts, labels = hf.load_texts(section(data_path=str(data_files[fmt]), label_column="label"))
    assert (texts, labels) == corpus()
    texts2, none = hf.load_texts(section(data_path=str(data_files[fmt])))
    assert texts2 == texts and none is None
    with pytest.raises(ValueError, match="no (column|field) 'topic'"):
        hf.load_texts(section(data_path=str(data_files[fmt]), label_column="topic"))


def test_load_texts_dir_and_errors(data_files: dict[str, Path], tmp_path: Path) -> None:
    texts, _ = hf.load_texts(section(data_path=str(data_files["jsonl"].parent)))
    assert len(texts) == 2 * len(corpus()[0])  # both files, sorted by name
    with pytest.raises(ValueError, match="expected a .jsonl or .parquet"):
        hf.load_texts(section(data_path=str(tmp_path / "x.csv")))
    with pytest.raises(ValueError, match=r"workload\.max_length=1"):
        section(data_path="x.jsonl", max_length=1)
    with pytest.raises(ValueError, match=r"workload\.partition='zipf'"):
        section(partition="zipf")
    with pytest.raises(ValueError, match=r"workload\.partition_alpha=0"):
        section(partition_alpha=0)


def test_model_train_extract_evaluate(model_dir: tuple[str, Path], data_files: dict[str, Path]) -> None:
    arch, path = model_dir
    tok = hf.load_tokenizer(path)
    texts, labels = hf.load_texts(section(data_path=str(data_files["parquet"]), label_column="label"))
    data = hf.tokenize(tok, texts, max_length=16)
    assert data["input_ids"].shape == data["labels"].shape and data["input_ids"].shape[1] <= 16
    assert torch.all((data["labels"] == -100) == (data["attention_mask"] == 0))
    split = section(partition="dirichlet", partition_alpha=0.5, label_column="label", min_size=2)
    parts = hf.partition(split, len(texts), 4, seed=0, labels=labels)
    targets = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    spec = lora.LoraSpec(r=2, alpha=4.0, targets=targets)
    base = hf.load_model(path)  # the real from_pretrained path
    before = lora.evaluate_lm(base, data)
    factors = []
    for k, idx in enumerate(parts):
        f, loss = lora.train_client(
            path,
            spec,
            hf.client_subset(data, idx),
            steps=6,
            lr=3e-2,
            batch_size=8,
            seed=k,
            loader=hf.load_model,
        )
        assert np.isfinite(loss)
        factors.append(f)
    f_again, _ = lora.train_client(
        path, spec, hf.client_subset(data, parts[0]), 6, 3e-2, 8, 0, loader=hf.load_model
    )
    assert all(np.array_equal(f_again[n][0], factors[0][n][0]) for n in f_again)
    name = next(iter(factors[0]))
    res = clair_ray.clair(lora.stack_pairs(factors, name), rank=1)
    assert res.subspace.shape[1] == 1
    model = lora.wrap_lora(hf.load_model(path), spec)
    lora.load_factors(model, factors[0])
    after = lora.evaluate_lm(model, hf.client_subset(data, parts[0]))
    assert after["loss"] < before["loss"]


def test_partitioners_cover_each_sample_once() -> None:
    texts, labels = corpus(90)
    n = len(texts)
    for kind, alpha in (("iid", 0.5), ("quantity", 0.3), ("dirichlet", 0.2)):
        cfg = section(partition=kind, partition_alpha=alpha, label_column="label", min_size=2)
        parts = hf.partition(cfg, n, 5, seed=3, labels=labels)
        assert len(parts) == 5 and all(len(p) >= 1 for p in parts)
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n)), kind
        again = hf.partition(cfg, n, 5, seed=3, labels=labels)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
        other = hf.partition(cfg, n, 5, seed=4, labels=labels)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    sizes = [len(p) for p in hf.partition_iid(n, 4, 0)]
    assert max(sizes) - min(sizes) <= 1
    skew = [len(p) for p in hf.partition_quantity(n, 5, alpha=0.1, seed=1)]
    assert max(skew) > 2 * min(skew)
    # Small alpha: clients' label mixes are far more lopsided than under IID.

    def dominance(parts: list[np.ndarray]) -> float:
        return float(np.mean([np.bincount(np.asarray(labels)[p], minlength=3).max() / len(p) for p in parts]))

    assert (
        dominance(hf.partition_dirichlet(labels, 5, alpha=0.05, seed=0))
        > dominance(hf.partition_iid(n, 5, seed=0)) + 0.2
    )
    with pytest.raises(ValueError, match="needs labels"):
        hf.partition(section(partition="dirichlet", label_column="label"), n, 5, seed=0)
    with pytest.raises(ValueError, match="min_size"):
        hf.partition_quantity(4, 5, alpha=1.0, seed=0)


def test_bad_data_files_are_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        hf.load_texts(section(data_path=str(bad)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"workload\.data_path=.*empty\.jsonl.*no rows"):
        hf.load_texts(section(data_path=str(empty)))
    null = tmp_path / "null.jsonl"
    null.write_text('{"text": "a"}\n{"text": null}\n')
    with pytest.raises(ValueError, match=r"1 row\(s\) with a 'text' that is not text \(row 2: None\)"):
        hf.load_texts(section(data_path=str(null)))


def test_a_missing_local_model_is_not_taken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"workload\.name_or_path=.*no such directory"):
        hf.check_model_path(str(tmp_path / "models" / "gpt2-tiny"))
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match=r"no config\.json"):
        hf.check_model_path(str(tmp_path / "m"))
    hf.check_model_path("gpt2")  # a hub id: left to transformers
