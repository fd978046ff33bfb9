"""The Hugging Face causal-LM workload on the engine: data split, data attacks, grouped training, Ray run.

Every model here is a tiny GPT-2 or Llama written by ``save_pretrained`` to a temporary directory and
loaded back through ``from_pretrained``; the data is the templated corpus of ``jobs/make_tiny_hf.py``
written as JSONL and Parquet. The Ray test runs ``configs/hf_causal_lm_small.yaml`` with its paths pointed
at temporary files, on the session's 2-CPU Ray.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from round_helpers import flat

from clair_ray import seeds
from clair_ray.config import ConfigError, load_config
from clair_ray.workloads import get_workload
from clair_ray.workloads.base import ClientJob, Group
from clair_ray.workloads.hf_causal_lm import data as hf
from clair_ray.workloads.hf_causal_lm import workload as hfe
from clair_ray.workloads.hf_causal_lm.workload import HFCausalLMWorkload

REPO = Path(__file__).resolve().parents[3]
SMALL = REPO / "configs" / "hf_causal_lm_small.yaml"
ALL_METHODS = [
    "clair",
    "fedavg",
    "fedavg_honest",
    "local",
    "local_early",
    "oracle",
    "median",
    "trimmed_mean",
    "multi_krum",
    "geometric_median",
]


@pytest.fixture(scope="module")
def maker() -> ModuleType:
    """``jobs/make_tiny_hf.py`` as a module (jobs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_tiny_hf", REPO / "jobs" / "make_tiny_hf.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def files(maker: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The corpus as JSONL and Parquet, and a tiny (untrained) GPT-2 and Llama."""
    root = tmp_path_factory.mktemp("hf")
    records = maker.make_dataset(lines=120, seed=0)
    jsonl = root / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet = root / "data.parquet"
    texts, topics = [r["text"] for r in records], [r["topic"] for r in records]
    pq.write_table(pa.table({"text": texts, "topic": topics}), parquet)
    return {
        "jsonl": jsonl,
        "parquet": parquet,
        "gpt2": hf.write_tiny_model(root / "gpt2", texts, arch="gpt2", width=16),
        "llama": hf.write_tiny_model(root / "llama", texts, arch="llama", width=16),
    }


def config(tmp: Path, files: dict[str, Path], *overrides: str, model: str = "gpt2", data: str = "jsonl"):
    """The shipped small YAML, pointed at the temporary model and data."""
    return load_config(
        SMALL,
        [
            f"output_dir={tmp / 'run'}",
            f"workload.name_or_path={files[model]}",
            f"workload.data_path={files[data]}",
            *overrides,
        ],
    )


def only(kind: str) -> list[str]:
    """Overrides making ``kind`` the only attack (a dotlist merges into the YAML's mix, so zero its kinds)."""
    return [
        "contamination.mix.data_random=0",
        "contamination.mix.data_shuffle=0",
        f"contamination.mix.{kind}=1",
    ]


def test_make_dataset_is_seeded_and_balanced(maker: ModuleType) -> None:
    records = maker.make_dataset(lines=40, seed=1)
    assert records == maker.make_dataset(lines=40, seed=1) and records != maker.make_dataset(lines=40, seed=2)
    topics = [r["topic"] for r in records]
    assert {t: topics.count(t) for t in set(topics)} == dict.fromkeys(maker.TOPICS, 10)


def test_shipped_yaml_loads_with_overrides(tmp_path: Path, files: dict[str, Path]) -> None:
    plain = load_config(SMALL)  # relative paths: validation only checks they are named
    assert plain.workload.name == "hf_causal_lm" and plain.workload.partition == "dirichlet"
    assert plain.workload.name_or_path == "results/tiny_hf/model"
    cfg = config(tmp_path, files, "workload.partition=iid", "workload.lora.steps=6")
    assert cfg.workload.name_or_path == str(files["gpt2"]) and cfg.workload.lora.steps == 6
    assert list(cfg.aggregation.methods) == ["clair", "fedavg", "fedavg_honest", "local", "oracle", "median"]
    assert isinstance(get_workload(cfg), HFCausalLMWorkload)
    with pytest.raises(ConfigError, match=r"workload\.partition='zipf'"):
        config(tmp_path, files, "workload.partition=zipf")
    with pytest.raises(ConfigError, match=r"workload\.label_column=None"):
        config(tmp_path, files, "workload.label_column=null")


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "quantity"])
def test_partition_split_is_disjoint_and_seeded(
    tmp_path: Path, files: dict[str, Path], partition: str
) -> None:
    over = [f"workload.partition={partition}", "workload.min_size=4"]
    cfg = config(tmp_path, files, *over)
    wl = get_workload(cfg)
    K, n_all = cfg.workload.num_clients, len(wl.texts()[0])
    train, test = wl.client_indices(0)
    assert len(train) == len(test) == K
    assert wl.client_sizes(0).tolist() == [len(t) for t in train] == wl.sizes(0).tolist()
    assert all(len(tr) >= 1 and len(te) >= 1 for tr, te in zip(train, test, strict=True))
    every = np.concatenate(train + test)
    assert np.array_equal(np.sort(every), np.arange(n_all)), "each sample in exactly one client's split"
    for k in range(K):
        n_k = len(train[k]) + len(test[k])
        assert len(test[k]) == min(max(1, round(0.25 * n_k)), n_k - 1)
        # the tensors are the rows of those samples: the test rows are the tokenised test texts
        rows = wl.test_data(0, k)
        ref = hf.tokenize(wl.tokenizer(), [wl.texts()[0][i] for i in test[k]], 64)
        t = ref["input_ids"].shape[1]
        assert torch.equal(rows["input_ids"][:, :t], ref["input_ids"])
        assert (rows["attention_mask"][:, t:] == 0).all()
        assert torch.equal(rows["labels"] == -100, rows["attention_mask"] == 0)
    # Deterministic from the root seed: a fresh instance agrees, another seed or trial does not.
    again = get_workload(config(tmp_path, files, *over)).client_indices(0)
    assert all(np.array_equal(a, b) for a, b in zip(train + test, again[0] + again[1], strict=True))
    other = get_workload(config(tmp_path, files, "seed=1", *over))
    assert not all(np.array_equal(a, b) for a, b in zip(train, other.client_indices(0)[0], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(train, wl.client_indices(1)[0], strict=True))
    sizes = wl.client_sizes(0)
    if partition == "iid":
        assert sizes.max() - sizes.min() <= 1
    if partition == "quantity":
        assert sizes.max() > 2 * sizes.min()  # skewed sizes
    if partition == "dirichlet":  # label skew: each client's most common topic is far above 1/4 of it
        topics = np.asarray(wl.texts()[1])
        top = [
            np.unique(topics[np.r_[tr, te]], return_counts=True)[1].max()
            for tr, te in zip(train, test, strict=True)
        ]
        assert np.mean(np.array(top) / (sizes + [len(t) for t in test])) > 0.45


def test_parquet_caches_and_max_samples(tmp_path: Path, files: dict[str, Path]) -> None:
    js = get_workload(config(tmp_path, files))
    pa_ = get_workload(config(tmp_path, files, data="parquet"))
    assert pa_.texts() == js.texts()
    for a, b in zip(js.client_indices(0)[0], pa_.client_indices(0)[0], strict=True):
        assert np.array_equal(a, b)
    assert torch.equal(js.train_data(0, 3)["input_ids"], pa_.train_data(0, 3)["input_ids"])
    # Read and tokenised once per process: a second instance gets the cached objects.
    assert get_workload(config(tmp_path, files)).texts() is js.texts()
    assert get_workload(config(tmp_path, files)).tokens(0) is js.tokens(0)
    sub = get_workload(config(tmp_path, files, "workload.max_samples=80", "workload.partition=iid"))
    train, test = sub.client_indices(0)
    used = np.sort(np.concatenate(train + test))
    assert len(used) == 80 and np.array_equal(used, sub.used(0)) and used.max() < 120
    assert sub.tokens(0)["input_ids"].shape[0] == 80
    i = int(train[2][0])
    want = hf.tokenize(sub.tokenizer(), [sub.texts()[0][i]], 64)["input_ids"][0]
    assert torch.equal(sub.train_data(0, 2)["input_ids"][0, : len(want)], want)


def test_too_little_data_is_a_clear_error(tmp_path: Path, files: dict[str, Path]) -> None:
    wl = get_workload(config(tmp_path, files, "workload.max_samples=12", "workload.partition=iid"))
    with pytest.raises(ValueError, match=r"fewer than 2 samples"):
        wl.client_sizes(0)


def test_unsupported_data_attacks_fail_when_built(tmp_path: Path, files: dict[str, Path]) -> None:
    for kind in ("data_reversed", "data_flip"):  # the copy task's own corruptions: refused at load
        with pytest.raises(ConfigError, match=rf"contamination\.mix\.{kind}=1(\.0)?: unknown attack"):
            config(tmp_path, files, *only(kind))
    with pytest.raises(ConfigError, match=r"contamination\.params\.data_shifted\.num_classes"):
        get_workload(
            config(
                tmp_path,
                files,
                *only("data_shifted"),
                "contamination.params.data_shifted.num_classes=3",
            )
        )
    with pytest.raises(ConfigError, match=r"contamination\.params\.data_shuffle=.*unknown parameter"):
        get_workload(
            config(
                tmp_path,
                files,
                *only("data_shuffle"),
                "contamination.params.data_shuffle.offset=3",
            )
        )


def test_default_targets_from_peft(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    assert hfe.default_targets_for(str(files["gpt2"])) == ["c_attn"]
    assert hfe.default_targets_for(str(files["llama"])) == ["q_proj", "v_proj"]
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    monkeypatch.delitem(MAPPING, "llama")
    with pytest.raises(ValueError, match=r"model_type 'llama'.*set workload\.lora\.targets"):
        hfe.default_targets_for(str(files["llama"]))


@pytest.mark.parametrize("kind", ["data_random", "data_shuffle", "data_shifted"])
def test_data_attack_corrupts_only_that_clients_training_labels(
    tmp_path: Path, files: dict[str, Path], kind: str
) -> None:
    clean = get_workload(config(tmp_path, files, "contamination.fraction=0.0"))
    bad = get_workload(config(tmp_path, files, *only(kind)))
    prob = bad.contamination(0)
    assert len(prob.contaminated) == 2 and set(prob.attack.values()) == {kind}
    V = bad.vocab_size()
    for k in range(bad.K):
        c, b = clean.train_data(0, k), bad.train_data(0, k)
        assert torch.equal(c["input_ids"], b["input_ids"]) and torch.equal(
            c["attention_mask"], b["attention_mask"]
        )
        for name in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(clean.test_data(0, k)[name], bad.test_data(0, k)[name])  # tests stay clean
        if k not in prob.attack:
            assert torch.equal(c["labels"], b["labels"])
            continue
        assert not torch.equal(c["labels"], b["labels"])
        real = c["attention_mask"] == 1
        assert (b["labels"][~real] == -100).all()
        if kind == "data_shifted":
            assert torch.equal(b["labels"][real], (c["labels"][real] + 1) % V)
        elif kind == "data_random":
            assert (b["labels"][real] >= 0).all() and (b["labels"][real] < V).all()
            assert (b["labels"][real] != c["labels"][real]).float().mean() > 0.5
        else:  # rows of the clean labels, permuted, cut to the client's own real tokens
            for i in range(len(b["labels"])):
                cut = c["labels"].masked_fill(~real[i], -100)  # every clean row, cut to row i's tokens
                assert (cut == b["labels"][i]).all(dim=1).any(), i
    # Deterministic: a fresh instance corrupts the same way.
    again = get_workload(config(tmp_path, files, *only(kind)))
    k0 = prob.contaminated[0]
    assert torch.equal(again.train_data(0, k0)["labels"], bad.train_data(0, k0)["labels"])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_grouped_batch_equals_plain_peft_with_unequal_sizes(
    tmp_path: Path, files: dict[str, Path], arch: str
) -> None:
    """Grouped training of clients of different sizes (smaller ones padded) = peft one client at a time."""
    cfg = config(
        tmp_path,
        files,
        "workload.partition=quantity",
        "workload.partition_alpha=0.5",
        "workload.min_size=4",
        "workload.lora.targets=[]",  # peft's default for the architecture
        "workload.lora.steps=4",
        "workload.lora.early_steps=2",
        "workload.lora.batch=6",
        model=arch,
    )
    wl = get_workload(cfg)
    assert wl.spec.targets == (["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"])
    sizes = wl.client_sizes(0)
    small, big = int(np.argmin(sizes)), int(np.argmax(sizes))
    mid = next(k for k in range(wl.K) if k not in (small, big) and sizes[k] != sizes[small])
    assert sizes[small] < cfg.workload.lora.batch <= sizes[big]  # the small client's batches get padded
    ks = sorted({small, mid, big})
    jobs = [ClientJob(k, seeds.derive_seed(cfg.seed, seeds.TRAIN, 0, 0, k)) for k in ks]
    out = wl.train_batch(0, 0, jobs, None)
    meta, grouped = out.info, out.payload
    assert not out.failed, out.failed
    assert [m["n_samples"] for m in meta] == [int(sizes[k]) for k in ks]
    assert grouped["early"] is not None
    for i, k in enumerate(ks):
        ref, loss = wl.train_one(0, 0, k)
        assert np.isfinite(loss) and np.isclose(loss, meta[i]["train_loss"], rtol=1e-4)
        for n, (b, a) in ref.items():
            np.testing.assert_allclose(
                grouped["final"][n][0][i] @ grouped["final"][n][1][i], b @ a, rtol=1e-4, atol=1e-6
            )


def test_aggregate_round_without_ray(tmp_path: Path, files: dict[str, Path]) -> None:
    """Every method gives a finite held-out loss for each honest client (NaN for the contaminated)."""
    cfg = config(
        tmp_path,
        files,
        f"aggregation.methods=[{','.join(ALL_METHODS)}]",
        *only("data_shifted"),
        "contamination.mix.sign_flip=1",
        "workload.lora.steps=6",
        "workload.lora.early_steps=3",
    )
    wl = get_workload(cfg)
    wl.prepare()
    K = cfg.workload.num_clients
    jobs = [ClientJob(k, seeds.derive_seed(cfg.seed, seeds.TRAIN, 0, 0, k)) for k in range(K)]
    payload = wl.train_batch(0, 0, jobs, None).payload
    group = Group(ALL_METHODS, [(list(range(K)), payload)], [], {})
    res = wl.aggregate_round(0, 0, [group], None, evaluate=True)
    metas, nxt = flat(res), res.nexts
    assert nxt == {} and set(metas) == set(ALL_METHODS)
    prob = wl.contamination(0)
    honest = [k for k in range(K) if k not in prob.attack]
    for method, m in metas.items():
        assert np.isfinite(m["test_loss"][honest]).all(), method
        assert np.isnan(np.delete(m["test_loss"], honest)).all(), method
        assert ((m["exact_match"][honest] >= 0) & (m["exact_match"][honest] <= 1)).all(), method
    assert metas["oracle"]["flagged"][prob.contaminated].all()
    assert not metas["local"]["flagged"].any()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_small_yaml_runs_on_ray(tmp_path: Path, maker: ModuleType) -> None:
    """configs/hf_causal_lm_small.yaml end to end, on a model and data written by jobs/make_tiny_hf.py."""
    from clair_ray.engine import run_experiment
    from clair_ray.results import read_tables

    out = maker.make(tmp_path / "tiny", lines=160, pretrain_steps=50)
    cfg = load_config(
        SMALL,
        [
            f"output_dir={tmp_path / 'run'}",
            f"workload.name_or_path={out / 'model'}",
            f"workload.data_path={out / 'data.jsonl'}",
            "workload.lora.steps=10",
        ],
    )
    res = run_experiment(cfg)
    tables = read_tables(tmp_path / "run")
    assert set(tables) == {"clients", "summary", "detection"}
    s = tables["summary"].set_index("method")
    assert list(s.index) == list(cfg.aggregation.methods)
    assert np.isfinite(s["honest_mean_test_loss"]).all() and s["honest_mean_exact_match"].between(0, 1).all()
    c = res.clients
    honest = c[~c["contaminated"]]
    assert np.isfinite(honest["test_loss"]).all() and len(honest) == 6 * len(cfg.aggregation.methods)
    assert set(c.loc[c["contaminated"], "attack"]) == {"data_random", "data_shuffle"}
    assert sorted(c["actor_id"].unique()) == [0, 1]


def test_grouped_evaluation_equals_peft_on_padded_text(tmp_path: Path, files: dict[str, Path]) -> None:
    """The engine's grouped held-out evaluation = peft's evaluate_lm per client, on padded text.

    Rows carry attention-mask zeros and clients hold unequal numbers of test sequences.
    """
    from clair_ray.workloads.lora import adapters as lora

    cfg = config(
        tmp_path,
        files,
        "workload.partition=quantity",
        "workload.min_size=4",
        "workload.lora.steps=3",
        "workload.lora.early_steps=1",
    )
    wl = get_workload(cfg)
    ks = [0, 1, 2, 3]
    assert len({len(wl.test_data(0, k)["input_ids"]) for k in ks}) > 1
    assert any((wl.test_data(0, k)["attention_mask"] == 0).any() for k in ks)
    jobs = [ClientJob(k, seeds.derive_seed(cfg.seed, seeds.TRAIN, 0, 0, k)) for k in ks]
    pl = wl.train_batch(0, 0, jobs, None).payload
    adapters = {k: {n: (b[i], a[i]) for n, (b, a) in pl["final"].items()} for i, k in enumerate(ks)}
    got = wl.evaluate_clients(0, ks, {}, adapters)
    loss, em, tacc = got["test_loss"], got["exact_match"], got["token_accuracy"]
    model = lora.wrap_lora(wl.load_base_model(), wl.spec)
    for k in ks:
        lora.load_factors(model, adapters[k])
        ref = lora.evaluate_lm(model, wl.test_data(0, k))
        assert np.isclose(loss[k], ref["loss"], rtol=1e-5) and em[k] == ref["exact_match"], k
        assert np.isclose(tacc[k], ref["token_accuracy"], rtol=1e-12), k
