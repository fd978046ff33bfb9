"""Frozen-prefix reuse and the chunked output layer give the same losses, gradients and evaluation as the
model's own forward (float64 model, float32 softmax as in transformers' loss), and peft's
``layers_to_transform`` adapts the same modules as the grouped model's ``layers``."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama

from clair_ray.workloads.lora import adapters as lora
from clair_ray.workloads.lora.grouped import GroupedLoRAModel
from clair_ray.workloads.lora.loop import grouped_evaluate
from clair_ray.workloads.lora.prefix import FrozenPrefix, LabelledTail, chunked_token_ce, layer_index
from clair_ray.workloads.lora.spec import LoraSpec

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_llama(300, 4, tie_word_embeddings=True).double()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (2, 3, 10), generator=g)  # (G, b, T)
    mask = torch.ones_like(ids)
    mask[:, 1:, 6:] = 0  # right padding on some rows
    return ids, ids.masked_fill(mask == 0, -100), mask


def grouped(model: torch.nn.Module, **kw: object) -> GroupedLoRAModel:
    gm = GroupedLoRAModel(copy.deepcopy(model), TARGETS, 4, 8.0, n_clients=2, layers=[2, 3], **kw)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(5)
    states = [
        {
            k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
            for k, v in gm.init_client_state(1).items()
        }
        for _ in range(2)
    ]
    gm.load_clients(states)
    return gm


def run_both(
    gm: GroupedLoRAModel, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, sizes: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor], list[dict[str, float]]]:
    """Loss (with its gradients) and grouped evaluation of ``gm`` on the batch, the frozen prefix's states
    passed where it has one; client g is evaluated on its first ``sizes[g]`` sequences."""
    hidden = None
    if gm.prefix is not None:
        hidden = gm.prefix_hidden(ids.flatten(0, 1), mask.flatten(0, 1)).view(*ids.shape, -1)
    loss = gm.client_losses(ids, labels, mask, hidden)
    loss.sum().backward()
    data = [
        {"input_ids": ids[g][:n], "labels": labels[g][:n], "attention_mask": mask[g][:n]}
        for g, n in enumerate(sizes)
    ]
    rows = None if hidden is None else [hidden[g][:n] for g, n in enumerate(sizes)]
    ev = grouped_evaluate(gm, data, rows=2, hidden=rows)
    return loss.detach(), [p.grad.clone() for p in gm.parameters()], ev


def assert_same(results: list, rtol: float, grad_rtol: float, grad_atol: float) -> None:
    """Two :func:`run_both` results agree: losses within ``rtol``, gradients within ``grad_rtol`` (and
    ``grad_atol`` of the largest), evaluation losses within ``rtol`` and the counts exactly."""
    (loss0, grads0, ev0), (loss1, grads1, ev1) = results
    torch.testing.assert_close(loss1, loss0, rtol=rtol, atol=0)
    for a, b in zip(grads1, grads0, strict=True):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=grad_atol * float(b.abs().max()))
    for a, b in zip(ev1, ev0, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=rtol)
        assert (a["exact_match"], a["token_accuracy"]) == (b["exact_match"], b["token_accuracy"])


@pytest.mark.parametrize(
    "kw", [{"loss_chunk": 7}, {"reuse_prefix": True}, {"reuse_prefix": True, "loss_chunk": 5}]
)
def test_prefix_reuse_and_chunks_equal_the_full_forward(llama: torch.nn.Module, kw: dict) -> None:
    ids, labels, mask = batch()
    results = [run_both(gm, ids, labels, mask, [3, 2]) for gm in (grouped(llama), grouped(llama, **kw))]
    assert_same(results, rtol=1e-6, grad_rtol=1e-5, grad_atol=1e-7)


def test_prefix_is_the_input_of_the_first_adapted_layer(llama: torch.nn.Module) -> None:
    ids, _, mask = batch()
    gm = grouped(llama, reuse_prefix=True)
    assert gm.prefix is not None and gm.prefix.first == 2
    captured = {}
    layer = gm.model.model.layers[2]
    hook = layer.register_forward_pre_hook(lambda _m, args: captured.setdefault("h", args[0].detach()))
    with torch.no_grad():
        gm.model(input_ids=ids.flatten(0, 1), attention_mask=mask.flatten(0, 1))
    hook.remove()
    torch.testing.assert_close(gm.prefix_hidden(ids.flatten(0, 1), mask.flatten(0, 1)), captured["h"])
    assert len(gm.model.model.layers) == 4  # the swap is undone


def test_prefix_needs_a_llama_style_body_and_layers(tmp_path: object) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2))
    assert not FrozenPrefix.supported(gpt2)
    gm = GroupedLoRAModel(gpt2, ["c_attn"], 2, 4.0, layers=[1], reuse_prefix=True)
    assert gm.prefix is None and list(gm.layers) == ["transformer.h.1.attn.c_attn"]  # runs whole
    with pytest.raises(ValueError, match="in layers \\[7\\]"):
        GroupedLoRAModel(copy.deepcopy(gpt2), ["c_attn"], 2, 4.0, layers=[7])
    assert layer_index("model.layers.29.self_attn.q_proj") == 29 and layer_index("lm_head") is None


def test_peft_layers_to_transform_adapts_the_same_modules(llama: torch.nn.Module) -> None:
    spec = LoraSpec(r=4, alpha=8.0, targets=TARGETS, layers=[2, 3])
    peft_model = lora.wrap_lora(copy.deepcopy(llama).float(), spec)
    gm = GroupedLoRAModel(copy.deepcopy(llama).float(), TARGETS, 4, 8.0, layers=[2, 3])
    assert sorted(lora.extract_factors(peft_model)) == sorted(gm.layers)
    assert len(gm.layers) == 6  # 3 targets x 2 layers


def test_chunked_ce_matches_cross_entropy_and_its_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 40, (3, 6), generator=g)
    labels[1, 3:] = -100
    ce, seq = chunked_token_ce(hidden, labels, weight, None, chunk=4)
    full = torch.nn.functional.cross_entropy(
        (hidden[:, :-1] @ weight.t()).float().reshape(-1, 40), labels[:, 1:].reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(ce.sum(), full)
    assert seq.tolist() == [0] * 5 + [1] * 2 + [2] * 5
    (grad,) = torch.autograd.grad(ce.sum(), hidden)
    (ref,) = torch.autograd.grad(full, hidden)
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7)


def test_cached_prefix_by_length_chunks_gives_the_same_losses(llama: torch.nn.Module) -> None:
    """PrefixCache computes rows sorted by length, each chunk cut to its own longest row (zeros beyond):
    the losses through it equal the model's own forward on the padded rows."""
    from clair_ray.workloads.lora.prefix import PrefixCache

    ids, labels, mask = batch()
    mask[0, 0, 3:], mask[1, 2, 8:] = 0, 0  # every row a different real length
    labels = ids.masked_fill(mask == 0, -100)
    gm = grouped(llama, reuse_prefix=True, loss_chunk=4)
    assert gm.prefix is not None
    cache = PrefixCache(rows=2)
    flat = {"input_ids": ids.flatten(0, 1), "attention_mask": mask.flatten(0, 1)}
    hidden = cache.get(("k",), gm.prefix, flat, torch.device("cpu")).view(*ids.shape, -1)
    assert cache.get(("k",), gm.prefix, flat, torch.device("cpu")).data_ptr() == hidden.data_ptr()  # cached
    with torch.no_grad():
        reused = gm.client_losses(ids, labels, mask, hidden)
        plain = grouped(llama).client_losses(ids, labels, mask)
    torch.testing.assert_close(reused, plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kw", [{}, {"loss_chunk": 5}, {"reuse_prefix": True, "loss_chunk": 5}])
def test_labelled_tail_equals_the_full_last_layer(llama: torch.nn.Module, kw: dict) -> None:
    """With every row's first 4 tokens unlabelled, the last feed-forward block runs on positions 3.. only:
    the same losses, gradients and evaluation as with it on every position."""
    ids, labels, mask = batch()
    labels[..., :4] = -100
    assert LabelledTail.first_scored(labels.flatten(0, 1)) == 3
    results = []
    seen: dict[bool, list[int]] = {False: [], True: []}  # positions the last feed-forward block gets
    for cut in (False, True):
        gm = grouped(llama, **kw)
        gm.tail.supported = cut
        mlp = gm.model.base_model.layers[-1].mlp
        mlp.register_forward_pre_hook(lambda m, a, out=seen[cut]: out.append(a[0].shape[1]))
        results.append(run_both(gm, ids, labels, mask, [3, 3]))
    assert seen[False] and seen[True] == [w - 3 for w in seen[False]], seen  # every call cut at position 3
    assert_same(results, rtol=1e-9, grad_rtol=1e-7, grad_atol=1e-9)


def test_labelled_tail_first_scored_position() -> None:
    labels = torch.full((2, 6), -100)
    assert LabelledTail.first_scored(labels) == 0  # nothing scored: nothing cut
    labels[1, 4] = 7
    assert LabelledTail.first_scored(labels) == 3  # position 3 predicts token 4
    labels[0, 0] = 7  # column 0 is never predicted
    assert LabelledTail.first_scored(labels) == 3
    labels[0, 1] = 7
    assert LabelledTail.first_scored(labels) == 0
    assert not LabelledTail(torch.nn.Linear(2, 2)).supported
