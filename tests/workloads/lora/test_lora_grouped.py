"""Grouped LoRA (G clients in one forward/backward) against peft, one client at a time.

Tiny GPT-2 (Conv1D projections) and tiny Llama (nn.Linear), saved with ``save_pretrained`` and loaded with
``from_pretrained`` as a workload would. Dropout is 0 in both (model dropout masks cannot match between a
batched and a per-client run; see clair_ray.workloads.lora.grouped.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from clair_ray.workloads.lora.grouped import GroupedLoRALinear, GroupedLoRAModel

G, B, T, VOCAB, R, ALPHA = 4, 3, 12, 64, 4, 8.0
TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both tiny models, saved once per module."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_lms")
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
    )  # fmt: skip
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
    )  # fmt: skip
    dirs = {}
    for name, model in (("gpt2", gpt2), ("llama", llama)):
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
    return dirs


def _load(dirs: dict[str, Path], arch: str, dtype: torch.dtype) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(dirs[arch], dtype=dtype)
    model.loss_type = "ForCausalLM"  # name the loss: keeps transformers' loss_type=None warning away
    return model


def _peft(dirs: dict[str, Path], arch: str, dtype: torch.dtype, seed: int = 0) -> PeftModel:
    config = LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=TARGETS[arch], lora_dropout=0.0, fan_in_fan_out=arch == "gpt2"
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        return get_peft_model(_load(dirs, arch, dtype), config)


def _grouped(dirs: dict[str, Path], arch: str, dtype: torch.dtype) -> GroupedLoRAModel:
    return GroupedLoRAModel(_load(dirs, arch, dtype), TARGETS[arch], R, ALPHA, n_clients=G)


def _data(seed: int, prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Different random tokens per client; clients 1 and 3 train only on the second half (labels -100),
    every client with ``prompt`` (then the last feed-forward block skips the first half: LabelledTail)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (G, B, T), generator=gen)  # (G, b, T)
    labels = ids.clone()
    labels[slice(None) if prompt else slice(1, None, 2), :, : T // 2] = -100
    return ids, labels


def _random_states(grouped: GroupedLoRAModel, seed: int) -> list[dict[str, torch.Tensor]]:
    """Non-trivial adapters (B != 0, so LoRA changes the output), one per client."""
    gen = torch.Generator().manual_seed(seed)
    template = grouped.init_client_state(0)
    return [{k: 0.3 * torch.randn(v.shape, generator=gen) for k, v in template.items()} for _ in range(G)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_keys_shapes_and_init_match_peft(base_dirs: dict[str, Path], arch: str) -> None:
    """client_state_dict has peft's keys, shapes and order; init_client_state is peft's init, bit for bit."""
    grouped = _grouped(base_dirs, arch, torch.float32)
    for seed in (0, 7):
        ref = get_peft_model_state_dict(_peft(base_dirs, arch, torch.float32, seed=seed))
        ours = grouped.init_client_state(seed)
        assert list(ours) == list(ref)
        for k in ref:
            assert torch.equal(ours[k], ref[k]), k
    grouped.load_clients([grouped.init_client_state(s) for s in range(G)])
    sd = grouped.client_state_dict(2)
    assert list(sd) == list(ref) and all(sd[k].shape == ref[k].shape for k in ref)
    assert torch.equal(sd[next(iter(sd))], grouped.init_client_state(2)[next(iter(sd))])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_grouped_forward_equals_separate_peft_forwards(base_dirs: dict[str, Path], arch: str) -> None:
    grouped = _grouped(base_dirs, arch, torch.float32)
    states = _random_states(grouped, seed=1)
    grouped.load_clients(states)
    ids, _ = _data(seed=2)
    peft_model = _peft(base_dirs, arch, torch.float32)
    with torch.no_grad():
        logits = grouped.forward(ids)  # (G, b, T, V)
        plain = _load(base_dirs, arch, torch.float32)(input_ids=ids[0]).logits
        for g in range(G):
            set_peft_model_state_dict(peft_model, states[g])
            ref = peft_model(input_ids=ids[g]).logits  # (b, T, V)
            torch.testing.assert_close(logits[g], ref, rtol=1e-5, atol=1e-6)
        assert (logits[0] - plain).abs().max() > 1e-2  # the adapters do change the output


def _train_one_at_a_time(
    peft_model: PeftModel,
    states: list[dict[str, torch.Tensor]],
    ids: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float,
    weight_decay: float,
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """The reference: one peft model, adapters swapped in per client, torch AdamW, HF's own loss."""
    losses = torch.zeros(steps, G, dtype=torch.float64)
    finals = []
    peft_model.train()
    for g in range(G):
        set_peft_model_state_dict(peft_model, states[g])
        opt = torch.optim.AdamW(
            [p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
        )
        for s in range(steps):
            loss = peft_model(input_ids=ids[s, g], labels=labels[s, g]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[s, g] = loss.item()
        finals.append({k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()})
    return losses, finals


@pytest.mark.parametrize(
    ("arch", "dtype", "weight_decay", "prompt"),
    [
        ("gpt2", torch.float32, 0.0, False),
        ("gpt2", torch.float64, 0.01, False),
        ("llama", torch.float32, 0.01, False),
        ("llama", torch.float64, 0.0, False),
        ("gpt2", torch.float32, 0.0, True),
        ("llama", torch.float64, 0.01, True),
    ],
)
def test_batched_training_equals_one_client_at_a_time(
    base_dirs: dict[str, Path], arch: str, dtype: torch.dtype, weight_decay: float, prompt: bool
) -> None:
    """Per-step losses and final A/B of every client agree with peft + AdamW client by client (rtol 1e-5)."""
    steps, lr = 5, 3e-3
    grouped = _grouped(base_dirs, arch, dtype)
    # Clients start from different peft inits (B = 0), as clients with different init seeds would.
    states = [grouped.init_client_state(100 + g) for g in range(G)]
    batches = [_data(seed=10 + s, prompt=prompt) for s in range(steps)]  # a fresh batch per step
    ids = torch.stack([b[0] for b in batches])  # (steps, G, b, T)
    labels = torch.stack([b[1] for b in batches])

    grouped.load_clients(states)
    cut: list[int] = []  # positions the last feed-forward block sees, per forward
    last_mlp = grouped.model.base_model.get_submodule("h.1.mlp" if arch == "gpt2" else "layers.1.mlp")
    last_mlp.register_forward_pre_hook(lambda m, a: cut.append(a[0].shape[1]))
    losses = grouped.train_steps(ids, steps, lr, labels=labels, weight_decay=weight_decay)  # (steps, G)
    assert cut == [T - T // 2 + 1 if prompt else T] * steps
    ref_losses, ref_states = _train_one_at_a_time(
        _peft(base_dirs, arch, dtype), states, ids, labels, steps, lr, weight_decay
    )

    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0.0)
    # float64: the A/B differences are ~1e-15 (round-off), so rtol 1e-5 holds element by element. float32:
    # Adam's step m / (sqrt(v) + eps) is ~lr in size whatever the gradient's size, so an element whose
    # gradient is nearly cancelled (relative round-off ~1) can move by a visible fraction of lr: measured up
    # to 5e-6 absolute (0.1% of elements beyond rtol 1e-5). An absolute floor of 2e-5 (lr / 150) covers it.
    atol = 1e-12 if dtype == torch.float64 else 2e-5
    for g in range(G):
        ours = grouped.client_state_dict(g)
        for k, ref in ref_states[g].items():
            torch.testing.assert_close(ours[k], ref, rtol=1e-5, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
            assert not torch.equal(ref, states[g][k]), "the adapter did not move"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_state_dict_round_trip_into_peft(base_dirs: dict[str, Path], arch: str) -> None:
    """A trained client's state dict, loaded into peft, reproduces the grouped model's outputs."""
    grouped = _grouped(base_dirs, arch, torch.float32)
    grouped.load_clients([grouped.init_client_state(g) for g in range(G)])
    ids, labels = _data(seed=3)
    grouped.train_steps(ids, 3, 1e-2, labels=labels)
    peft_model = _peft(base_dirs, arch, torch.float32)
    peft_model.eval()
    with torch.no_grad():
        logits = grouped.forward(ids)
        for g in (0, 3):
            set_peft_model_state_dict(peft_model, grouped.client_state_dict(g))
            torch.testing.assert_close(logits[g], peft_model(input_ids=ids[g]).logits, rtol=1e-5, atol=1e-6)
    # The float64 factor pairs: B @ A is the effective weight delta that peft itself would merge.
    factors = grouped.client_factors(3)
    for name, layer in list(peft_model.base_model.model.named_modules()):
        if name in factors:
            delta = layer.get_delta_weight("default").detach().double()
            if isinstance(layer.get_base_layer(), Conv1D):
                delta = delta.T  # Conv1D layout (in, out) -> (out, in)
            b, a = factors[name]
            np.testing.assert_allclose(b @ a, delta.numpy(), rtol=1e-5, atol=1e-9)
    assert set(factors) == set(grouped.layers)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_base_weights_frozen_and_unchanged(base_dirs: dict[str, Path], arch: str) -> None:
    grouped = _grouped(base_dirs, arch, torch.float32)
    trainable = {id(p) for p in grouped.parameters()}
    frozen = {n: p.detach().clone() for n, p in grouped.model.named_parameters() if id(p) not in trainable}
    assert all(not p.requires_grad for n, p in grouped.model.named_parameters() if n in frozen)
    assert all(p.requires_grad for p in grouped.parameters())
    n_modules = {"gpt2": 2 * 4, "llama": 2 * 7}[arch]  # GPT-2's c_proj is in both attn and mlp
    assert len(grouped.layers) == n_modules and len(trainable) == 2 * n_modules
    grouped.load_clients(_random_states(grouped, seed=4))
    ids, labels = _data(seed=5)
    grouped.train_steps(ids, 3, 1e-2, labels=labels)
    after = dict(grouped.model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(after[n], before), n


def test_changing_group_count_and_bad_input(base_dirs: dict[str, Path]) -> None:
    grouped = _grouped(base_dirs, "gpt2", torch.float32)
    states = _random_states(grouped, seed=6)
    grouped.load_clients(states[:2])
    assert grouped.n_clients == 2
    ids, _ = _data(seed=7)
    assert grouped.forward(ids[:2]).shape == (2, B, T, VOCAB)
    torch.testing.assert_close(grouped.client_state_dict(1), states[1])
    with pytest.raises(ValueError, match=r"expected \(2, b, T\)"):
        grouped.forward(ids)
    bad = dict(states[0])
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing keys"):
        grouped.load_clients([states[1], bad])
    assert grouped.n_clients == 2  # a failed load leaves the loaded clients alone
    torch.testing.assert_close(grouped.client_state_dict(1), states[1])
    with pytest.raises(ValueError, match="match no module"):
        GroupedLoRAModel(_load(base_dirs, "gpt2", torch.float32), ["q_proj"], R, ALPHA)


@pytest.mark.parametrize("kind", ["conv1d", "linear", "linear_no_bias"])
def test_fused_layer_gradients(kind: str) -> None:
    """The hand-written backward of the fused layer agrees with finite differences (float64 gradcheck)."""
    torch.manual_seed(0)
    n_in, n_out, groups = 5, 7, 3
    base = {
        "conv1d": lambda: Conv1D(n_out, n_in),
        "linear": lambda: torch.nn.Linear(n_in, n_out),
        "linear_no_bias": lambda: torch.nn.Linear(n_in, n_out, bias=False),
    }[kind]().double()
    base.requires_grad_(False)
    torch.nn.init.normal_(base.weight)
    layer = GroupedLoRALinear(base, groups, r=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(groups * 2, 4, n_in, dtype=torch.float64, requires_grad=True)  # (G*b, T, in)
    a, b = layer.lora_A, layer.lora_B
    assert torch.autograd.gradcheck(lambda x, a, b: layer(x), (x, a, b))
    # And the forward is the per-group formula.
    w = base.weight if kind == "conv1d" else base.weight.T  # (in, out)
    ref = x @ w + (0 if base.bias is None else base.bias)
    for g in range(groups):
        ref[2 * g : 2 * g + 2] += 1.5 * (x[2 * g : 2 * g + 2] @ a[g].T) @ b[g].T
    torch.testing.assert_close(layer(x), ref)


def test_layer_rejects_unfrozen_or_subclassed_base() -> None:
    class MyLinear(torch.nn.Linear):
        pass

    with pytest.raises(TypeError, match="exactly"):
        GroupedLoRALinear(MyLinear(4, 4), 2, 2, 4.0)
    layer = GroupedLoRALinear(torch.nn.Linear(4, 4), 2, 2, 4.0)  # weights still trainable
    with pytest.raises(RuntimeError, match="frozen"):
        layer(torch.randn(2, 3, 4))
