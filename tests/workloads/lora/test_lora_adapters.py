"""LoRA helpers: orientation (GPT-2 Conv1D and Llama Linear), round trips, refined-adapter application."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import clair_ray
from clair_ray.workloads.lora import adapters as lora


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    conf = GPT2Config(
        vocab_size=16,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=15,
        eos_token_id=15,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(conf)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    conf = LlamaConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        bos_token_id=15,
        eos_token_id=15,
        pad_token_id=15,
    )
    return LlamaForCausalLM(conf)


GPT2_SPEC = lora.LoraSpec(r=3, alpha=5.0, targets=["c_attn", "c_proj", "c_fc"])
LLAMA_SPEC = lora.LoraSpec(r=3, alpha=5.0, targets=["q_proj", "v_proj", "down_proj"])


def random_factors(model: torch.nn.Module, rank: int, seed: int) -> lora.Factors:
    """Random (B, A) per module with the model's shapes, in the Linear orientation."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, layer in lora.lora_modules(model).items():
        o, i = lora.linear_weight(layer).shape
        out[name] = (rng.standard_normal((o, rank)) * 0.1, rng.standard_normal((rank, i)) * 0.1)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_orientation_matches_merged_weight(arch: str) -> None:
    base, spec = (tiny_gpt2(), GPT2_SPEC) if arch == "gpt2" else (tiny_llama(), LLAMA_SPEC)
    model = lora.wrap_lora(base, spec)
    layers = lora.lora_modules(model)
    if arch == "gpt2":  # GPT-2 stores (in, out): the case that needs the transpose
        from transformers.pytorch_utils import Conv1D

        assert all(isinstance(m.get_base_layer(), Conv1D) for m in layers.values())
    before = {n: lora.linear_weight(m).detach().double().clone() for n, m in layers.items()}
    factors = random_factors(model, spec.r, seed=1)
    lora.load_factors(model, factors)
    merged = copy.deepcopy(model).merge_and_unload()
    mods = dict(merged.named_modules())
    for name, (b, a) in factors.items():
        delta = lora.linear_weight(mods[name]).detach().double() - before[name]  # (out, in)
        np.testing.assert_allclose(delta.numpy(), b @ a, atol=1e-6)
        np.testing.assert_allclose(lora.effective_delta(model, name), b @ a, atol=1e-6)
    # And B @ A is the update of y = x W^T: folding it densely into the base gives the same outputs.
    x = torch.randint(0, 15, (2, 7))
    dense = lora.fold_corrections(model, {n: b @ a for n, (b, a) in factors.items()})
    lora.load_factors(
        dense, {n: (np.zeros((b.shape[0], 1)), np.zeros((1, a.shape[1]))) for n, (b, a) in factors.items()}
    )
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_extract_load_round_trip_is_exact() -> None:
    model = lora.wrap_lora(tiny_gpt2(), GPT2_SPEC)  # scaling 5/3: not a power of two
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    raw = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    factors = lora.extract_factors(model)
    other = lora.wrap_lora(tiny_gpt2(), GPT2_SPEC)
    lora.load_factors(other, factors)
    for n, p in other.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, raw[n]), n
    again = lora.extract_factors(other)
    for n in factors:
        assert np.array_equal(again[n][0], factors[n][0]) and np.array_equal(again[n][1], factors[n][1])


def test_same_init_for_every_client_and_reset() -> None:
    a = lora.extract_factors(lora.wrap_lora(tiny_gpt2(), GPT2_SPEC))
    m = lora.wrap_lora(tiny_gpt2(), GPT2_SPEC)
    b = lora.extract_factors(m)
    for n in a:
        assert np.array_equal(a[n][1], b[n][1]) and not np.any(a[n][0])  # same A, B = 0
    lora.load_factors(m, random_factors(m, 3, seed=2))
    lora.reset_lora(m)
    c = lora.extract_factors(m)
    assert all(np.array_equal(c[n][1], a[n][1]) and not np.any(c[n][0]) for n in a)


def test_wrap_is_quiet() -> None:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model = lora.wrap_lora(tiny_gpt2(), GPT2_SPEC)
    assert not rec, [str(w.message) for w in rec]
    assert model.get_base_model().loss_type == "ForCausalLM"


def test_load_factors_pads_lower_rank_and_checks() -> None:
    model = lora.wrap_lora(tiny_gpt2(), GPT2_SPEC)
    name = next(iter(lora.lora_modules(model)))
    o, i = lora.linear_weight(lora.lora_modules(model)[name]).shape
    b, a = np.ones((o, 1)), np.full((1, i), 0.5)
    lora.load_factors(model, {name: (b, a)})
    np.testing.assert_allclose(lora.effective_delta(model, name), b @ a, atol=1e-6)
    with pytest.raises(ValueError, match="unknown LoRA module"):
        lora.load_factors(model, {"nope": (b, a)})
    with pytest.raises(ValueError, match="exceeds the adapter rank"):
        lora.load_factors(model, {name: (np.ones((o, 4)), np.ones((4, i)))})
    with pytest.raises(ValueError, match="expected B"):
        lora.load_factors(model, {name: (np.ones((o + 1, 1)), a)})


def test_spec_validation_names_field() -> None:
    with pytest.raises(ValueError, match=r"workload\.lora\.r=0"):
        lora.LoraSpec(r=0)
    with pytest.raises(ValueError, match=r"workload\.lora\.alpha"):
        lora.LoraSpec(alpha=-1.0)
    with pytest.raises(ValueError, match=r"workload\.lora\.targets"):
        lora.LoraSpec(targets="c_attn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="matches no"):
        lora.wrap_lora(tiny_gpt2(), lora.LoraSpec(targets=["q_proj"]))


def test_refinement_application_equals_dense_refined_update() -> None:
    """Shared corrected base + projected adapter == FactoredRefinement.dense(k) of clair, per module."""
    model = lora.wrap_lora(tiny_gpt2(), GPT2_SPEC)
    layers = lora.lora_modules(model)
    rng = np.random.default_rng(0)
    k_clients = 6
    clients: list[lora.Factors] = [{} for _ in range(k_clients)]
    for name, layer in layers.items():
        o, i = lora.linear_weight(layer).shape
        u = np.linalg.qr(rng.standard_normal((o, 2)))[0]  # shared column space
        for k in range(k_clients):
            b = u @ rng.standard_normal((2, 3)) + 0.01 * rng.standard_normal((o, 3))
            if k == 5:  # one client in another subspace
                b = rng.standard_normal((o, 3))
            clients[k][name] = (b, rng.standard_normal((3, i)) * 0.1)
    refinements = {name: clair_ray.clair(lora.stack_pairs(clients, name), rank=2).refined for name in layers}
    before = {n: lora.linear_weight(m).detach().double().clone() for n, m in layers.items()}
    shared, adapters = lora.apply_refinement(model, refinements)
    shared_layers = lora.lora_modules(shared)
    for name in layers:  # the original model is untouched
        assert torch.equal(lora.linear_weight(layers[name]).detach().double(), before[name])
    honest = refinements[next(iter(layers))].honest
    assert honest
    for k in honest:
        lora.load_factors(shared, adapters[k])
        for name, ref in refinements.items():
            base_delta = lora.linear_weight(shared_layers[name]).detach().double() - before[name]
            total = base_delta.numpy() + lora.effective_delta(shared, name)
            np.testing.assert_allclose(total, ref.dense(k).double().numpy(), atol=1e-5)


def test_train_lora_is_deterministic_and_learns() -> None:
    torch.manual_seed(3)
    ids = torch.randint(0, 15, (8, 6))
    data = {"input_ids": ids, "labels": ids.clone()}
    base = tiny_gpt2()
    f1, l1 = lora.train_client(base, GPT2_SPEC, data, steps=15, lr=1e-2, batch_size=4, seed=7)
    f2, l2 = lora.train_client(base, GPT2_SPEC, data, steps=15, lr=1e-2, batch_size=4, seed=7)
    assert l1 == l2
    for n in f1:
        assert np.array_equal(f1[n][0], f2[n][0]) and np.array_equal(f1[n][1], f2[n][1])
    before = lora.evaluate_lm(base, data)["loss"]
    assert l1 < before
    # The caller's plain model was copied, not wrapped in place.
    assert not any(isinstance(m, lora.LoraLayer) for m in base.modules())
