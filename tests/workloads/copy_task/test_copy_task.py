"""Copy-task workload: task variants, data corruption, cached base, client training, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import clair_ray
from clair_ray.workloads.copy_task import task as ct
from clair_ray.workloads.lora import adapters as lora

SMALL = ct.CopyBaseConfig(
    vocab_size=16, prefix_len=4, n_layer=1, n_embd=32, n_head=2, steps=20, batch_size=16
)
SPEC = lora.LoraSpec(r=2, alpha=4.0, targets=ct.default_targets("gpt2"))


@pytest.fixture(scope="module")
def base_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ct.build_base(SMALL, tmp_path_factory.mktemp("cache"))


def task(**kw: object) -> ct.CopyTaskConfig:
    return ct.CopyTaskConfig(base=SMALL, **{"n_common": 4, "n_personal": 3, "n_clusters": 2, **kw})


# ---- configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"arch": "bert"}, r"workload\.base\.arch='bert'"),
        ({"vocab_size": 2}, r"workload\.base\.vocab_size=2"),
        ({"n_embd": 30, "n_head": 4}, r"workload\.base\.n_head=4: must divide n_embd=30"),
        ({"lr": 0.0}, r"workload\.base\.lr=0\.0"),
    ],
)
def test_base_config_validation(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ct.CopyBaseConfig(**kw)


def test_task_config_validation() -> None:
    with pytest.raises(ValueError, match=r"heterogeneity.*1\.5"):
        task(heterogeneity=1.5)
    with pytest.raises(ValueError, match=r"workload\.n_common=10: n_common \+ n_personal must be <= "):
        task(n_common=10, n_personal=10)
    with pytest.raises(ValueError, match=r"n_clusters.*0"):
        task(n_clusters=0)
    assert ct.CopyTaskConfig(base={"vocab_size": 16}).base.vocab_size == 16  # type: ignore[arg-type]


# ---- variants -----------------------------------------------------------------------------------------
def test_variants_share_common_and_clusters_conflict() -> None:
    cfg = task(heterogeneity=1.0)
    maps = np.stack([ct.substitution_map(cfg, k) for k in range(6)])  # (K, n_content)
    ident = np.arange(SMALL.n_content)
    changed = maps != ident  # (K, n)
    common = np.all(changed, axis=0) & np.all(maps == maps[0], axis=0)
    assert common.sum() == 4  # the shared substitutions, identical for every honest client
    # Same cluster -> same task; different clusters -> conflicting targets on the personal tokens.
    assert np.array_equal(maps[0], maps[2]) and np.array_equal(maps[1], maps[3])
    conflict = maps[0] != maps[1]
    assert conflict.sum() == 3 and np.all(changed[0, conflict]) and np.all(changed[1, conflict])
    assert np.array_equal(ct.substitution_map(cfg, None), ident)


@pytest.mark.parametrize(("h", "n_conflict"), [(0.0, 0), (0.34, 1), (1.0, 3)])
def test_heterogeneity_knob(h: float, n_conflict: int) -> None:
    cfg = task(heterogeneity=h)
    maps = [ct.substitution_map(cfg, k) for k in range(4)]
    assert int((maps[0] != maps[1]).sum()) == n_conflict
    if h == 0.0:  # all honest tasks identical: same map, and data is that map applied to the prefix
        assert all(np.array_equal(m, maps[0]) for m in maps)
        for k in range(4):
            d = ct.client_data(cfg, k, seed=0, n_sequences=5)
            assert torch.equal(d["target"], torch.from_numpy(maps[0])[d["prefix"]])


def test_client_data_format_and_determinism() -> None:
    cfg = task()
    d = ct.client_data(cfg, 3, seed=5, n_sequences=7)
    n, length = 7, 2 * SMALL.prefix_len + 1
    assert d["input_ids"].shape == d["labels"].shape == (n, length)
    assert torch.all(d["input_ids"][:, SMALL.prefix_len] == SMALL.sep)
    assert torch.all(d["labels"][:, : SMALL.prefix_len + 1] == -100)
    assert torch.equal(d["labels"][:, SMALL.prefix_len + 1 :], d["target"])
    again = ct.client_data(cfg, 3, seed=5, n_sequences=7)
    assert all(torch.equal(d[k], again[k]) for k in d)
    test = ct.client_data(cfg, 3, seed=5, n_sequences=7, split="test")
    assert not torch.equal(d["prefix"], test["prefix"])
    with pytest.raises(ValueError, match="n_sequences"):
        ct.client_data(cfg, 3, seed=5, n_sequences=0)


# ---- corruption ---------------------------------------------------------------------------------------
def test_corruption_kinds_do_what_they_say() -> None:
    cfg = task()
    clean = ct.client_data(cfg, 1, seed=2, n_sequences=64)
    c = SMALL.n_content

    def corrupt(kind: str, **kw: object) -> dict[str, torch.Tensor]:
        d = ct.client_data(cfg, 1, seed=2, n_sequences=64, corruption=kind, **kw)
        assert torch.equal(d["prefix"], clean["prefix"])  # inputs untouched
        assert torch.equal(d["labels"][:, SMALL.prefix_len + 1 :], d["target"])
        return d

    assert torch.equal(corrupt("reversed")["target"], clean["target"].flip(1))
    assert torch.equal(corrupt("data_shifted")["target"], (clean["target"] + 1) % c)
    rnd = corrupt("random")["target"]
    assert rnd.min() >= 0 and rnd.max() < c and (rnd != clean["target"]).float().mean() > 0.5
    shuf = corrupt("shuffle")["target"]
    assert sorted(map(tuple, shuf.tolist())) == sorted(map(tuple, clean["target"].tolist()))
    for n_flips in (1, 2):
        flipped = corrupt("flip", n_flips=n_flips)["target"]
        # A consistent swap of n_flips token pairs: flipped = perm[clean] with perm an involution that
        # moves exactly 2 * n_flips tokens.
        perm = torch.arange(c)
        diff = flipped != clean["target"]
        perm[clean["target"][diff]] = flipped[diff]
        assert torch.equal(perm[clean["target"]], flipped)
        moved = int((perm != torch.arange(c)).sum())
        assert moved <= 2 * n_flips and torch.equal(perm[perm], torch.arange(c))
        assert diff.any()
    with pytest.raises(ValueError, match="valid kinds"):
        ct.client_data(cfg, 1, seed=2, n_sequences=4, corruption="sign_flip")
    assert set(ct.DATA_ATTACK_KINDS) >= set(clair_ray.attacks.DATA_ATTACK_KINDS)


# ---- base cache ---------------------------------------------------------------------------------------
def test_base_cache_hit_reloads_via_from_pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ct.CopyBaseConfig(vocab_size=8, prefix_len=2, n_layer=1, n_embd=16, n_head=2, steps=3)
    path = ct.build_base(cfg, tmp_path)
    trained = ct.load_base(path).state_dict()

    def boom(_cfg: ct.CopyBaseConfig) -> None:
        raise AssertionError("cache miss: the base was trained again")

    monkeypatch.setattr(ct, "_train_base", boom)
    assert ct.build_base(cfg, tmp_path) == path
    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls: type, *a: object, **kw: object) -> torch.nn.Module:
        calls.append(a[0])
        return real(cls, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    again = ct.load_base(path)
    assert calls == [str(path)]
    assert all(torch.equal(v, trained[k]) for k, v in again.state_dict().items())
    assert ct.base_metrics(path)["config"]["steps"] == 3
    other = ct.CopyBaseConfig(vocab_size=8, prefix_len=2, n_layer=1, n_embd=16, n_head=2, steps=4)
    assert ct.base_key(other) != ct.base_key(cfg)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary leftovers


# ---- clients ------------------------------------------------------------------------------------------
def test_train_client_deterministic_and_reusable(base_path: Path) -> None:
    cfg = task()
    data = ct.client_data(cfg, 0, seed=1, n_sequences=8)
    f1, l1 = lora.train_client(
        base_path, SPEC, data, steps=5, lr=1e-2, batch_size=4, seed=3, loader=ct.load_base
    )
    f2, l2 = lora.train_client(
        base_path, SPEC, data, steps=5, lr=1e-2, batch_size=4, seed=3, loader=ct.load_base
    )
    assert l1 == l2 and f1.keys() == f2.keys()
    assert all(np.array_equal(f1[n][0], f2[n][0]) and np.array_equal(f1[n][1], f2[n][1]) for n in f1)
    # A resident peft model reused for another virtual client gives the same numbers as a fresh one.
    resident = lora.wrap_lora(ct.load_base(base_path), SPEC)
    lora.train_client(
        resident, SPEC, ct.client_data(cfg, 1, seed=1, n_sequences=8), 5, 1e-2, 4, 9, loader=ct.load_base
    )
    f3, l3 = lora.train_client(
        resident, SPEC, data, steps=5, lr=1e-2, batch_size=4, seed=3, loader=ct.load_base
    )
    assert l3 == l1 and all(np.array_equal(f1[n][0], f3[n][0]) for n in f1)
    with pytest.raises(ValueError, match=r"spec\.r=3 differs"):
        lora.train_client(
            resident,
            lora.LoraSpec(r=3, targets=ct.default_targets("gpt2")),
            data,
            steps=1,
            lr=1e-2,
            batch_size=4,
            seed=3,
            loader=ct.load_base,
        )
    _, l4 = lora.train_client(
        base_path, SPEC, data, steps=5, lr=1e-2, batch_size=4, seed=4, loader=ct.load_base
    )
    assert l4 != l1
    # Factors shapes: B (out, r), A (r, in) for every adapted module (2 per attention + 2 MLP).
    assert len(f1) == 4 * SMALL.n_layer
    b, a = f1["transformer.h.0.attn.c_attn"]
    assert b.shape == (3 * SMALL.n_embd, SPEC.r) and a.shape == (SPEC.r, SMALL.n_embd)


def test_evaluate_metrics(base_path: Path) -> None:
    model = ct.load_base(base_path)
    data = ct.client_data(task(), None, seed=0, n_sequences=16, split="test")
    m = lora.evaluate_lm(model, data)
    assert set(m) >= {"loss", "exact_match"} and m["loss"] > 0 and 0 <= m["exact_match"] <= 1
    # A model that always predicts the right token: loss ~ 0, exact match 1.
    perfect = data["input_ids"]

    class Oracle(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: object = None) -> object:
            nxt = torch.cat([perfect[:, 1:], perfect[:, :1]], dim=1)
            return type("Out", (), {"logits": 50.0 * torch.nn.functional.one_hot(nxt, SMALL.vocab_size)})

    m = lora.evaluate_lm(Oracle(), data)
    assert m["exact_match"] == 1.0 and m["loss"] < 1e-6


def test_end_to_end_six_clients_into_clair(base_path: Path) -> None:
    cfg = task()
    factors = []
    for k in range(6):
        data = ct.client_data(cfg, k, seed=10, n_sequences=8, corruption="reversed" if k == 5 else None)
        f, loss = lora.train_client(
            base_path, SPEC, data, steps=4, lr=1e-2, batch_size=8, seed=k, loader=ct.load_base
        )
        assert np.isfinite(loss)
        factors.append(f)
    name = "transformer.h.0.mlp.c_fc"
    res = clair_ray.clair(lora.stack_pairs(factors, name), rank=2)
    assert res.subspace.shape == (4 * SMALL.n_embd, 2)
    shared, adapters = lora.apply_refinement(
        lora.wrap_lora(ct.load_base(base_path), SPEC), {name: res.refined}
    )
    lora.load_factors(shared, adapters[res.honest[0]])
    assert np.isfinite(lora.evaluate_lm(shared, ct.client_data(cfg, 0, 1, 4, split="test"))["loss"])


def test_llama_base_and_client(tmp_path: Path) -> None:
    cfg = ct.CopyBaseConfig(
        arch="llama", vocab_size=12, prefix_len=3, n_layer=1, n_embd=16, n_head=2, steps=3
    )
    path = ct.build_base(cfg, tmp_path)
    spec = lora.LoraSpec(r=2, alpha=2.0, targets=ct.default_targets("llama"))
    data = ct.client_data(ct.CopyTaskConfig(base=cfg, n_common=2, n_personal=1), 0, 0, 4)
    f, loss = lora.train_client(path, spec, data, steps=2, lr=1e-2, batch_size=4, seed=0, loader=ct.load_base)
    assert len(f) == 7 and np.isfinite(loss)
    b, a = f["model.layers.0.mlp.down_proj"]
    assert b.shape == (16, 2) and a.shape == (2, 32)
