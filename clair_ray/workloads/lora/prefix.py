"""CPU speed for a real LLM: the frozen prefix computed once, and the output layer in chunks.

**Frozen prefix.** When LoRA adapts only the top decoder layers (``workload.lora.layers``), everything
below the lowest adapted layer is frozen and sees only the input, so its output (the hidden states that
enter that layer) is a pure function of the token ids and the attention mask. :class:`FrozenPrefix`
computes it once per sequence; training steps, rounds and every method's evaluation then run only the
layers from the lowest adapted one up. The shared dense corrections of the methods touch adapted modules
only, so they never change a prefix. Exact: the suffix runs the same modules on the same inputs (tests
compare losses with and without reuse). Supported for decoders whose body has ``embed_tokens``, a
``layers`` list, ``norm`` and ``rotary_emb`` (Llama, Mistral, Qwen2, SmolLM2, ...) and takes
``inputs_embeds`` as the input of its first layer; GPT-2 adds position embeddings to ``inputs_embeds``,
so it runs whole (:meth:`FrozenPrefix.supported` says which).

**Chunked output layer.** With a 49,152-token vocabulary the logits of a grouped batch (G·b·T·V floats)
are the largest tensors of a step, forward and backward. :func:`chunked_token_ce` sends only the labelled
positions through the output layer, at most ``chunk`` rows at a time, and recomputes each chunk's logits in
the backward pass instead of storing them: memory O(chunk · V), the same numbers as the full cross-entropy
up to float round-off (tested).

**Labelled tail.** Where a batch's first labelled token sits at column c (a masked prompt: the copy task's
first half, an instruction), the last decoder layer's feed-forward block at positions < c - 1 feeds only
logits that no loss reads: every op after that layer's attention is per position. :class:`LabelledTail`
runs that block on positions c - 1 onwards only (zeros in its place before them, so those positions'
logits are finite and unscored); the scored outputs and every gradient are the same up to float
round-off (tested against the whole forward).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from clair_ray.workloads.lora.loop import real_width

__all__ = [
    "FrozenPrefix",
    "LabelledTail",
    "adapted_modules",
    "PrefixCache",
    "chunked_token_ce",
    "chunked_token_stats",
    "fuse_tanh_gelu",
    "layer_index",
    "output_layer",
]

_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(module_name: str) -> int | None:
    """The decoder-layer index in a module name (``model.layers.29.self_attn.q_proj`` -> 29), or None.

    peft's ``layers_to_transform`` rule without ``layers_pattern``: the number between dots.
    """
    m = _INDEX.search(module_name)
    return int(m.group(1)) if m else None


def adapted_modules(
    model: nn.Module, targets: Sequence[str], layers: Sequence[int] = ()
) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module LoRA adapts, in module order: peft's rule for a list of target names
    (the full module name or a dotted suffix of it), within ``layers`` (peft's ``layers_to_transform``;
    empty: every layer). Used by :class:`~clair_ray.workloads.lora.grouped.GroupedLoRAModel` and the
    driver's config check."""
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if name
        and any(name == t or name.endswith("." + t) for t in targets)
        and (not layers or layer_index(name) in layers)
    ]


def output_layer(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, H), bias (V,) or None) of a causal LM's output layer.

    Raises:
        ValueError: If the model scales or caps its logits after the output layer (the chunked loss
            would then differ from the model's own).
    """
    conf = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(conf, attr, None) not in (None, 1, 1.0):
            raise ValueError(
                f"workload.lora.loss_chunk: {type(model).__name__} applies {attr}; set loss_chunk: 0"
            )
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"workload.lora.loss_chunk: the output layer is a {type(head).__name__}, not Linear")
    return head.weight, head.bias


#: Softmax rows the chunked loss keeps from forward to backward (bytes) instead of recomputing the logits:
#: below it the backward pass costs one product with the output layer instead of two.
KEEP_SOFTMAX_BYTES = 256 << 20


class _ChunkedCE(torch.autograd.Function):
    """Per-row cross-entropy of ``h W^T + bias`` against ``tgt``, logits never held whole.

    The softmax rows are kept for the backward pass when they fit in :data:`KEEP_SOFTMAX_BYTES`, else
    recomputed chunk by chunk there (memory O(chunk · V)).
    """

    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        tgt: torch.Tensor,
        chunk: int,
    ) -> torch.Tensor:
        m, v = h.shape[0], weight.shape[0]
        ce = torch.empty(m, dtype=torch.float32, device=h.device)
        lse = torch.empty(m, dtype=torch.float32, device=h.device)
        keep = (
            torch.empty(m, v, dtype=torch.float32, device=h.device)
            if m * v * 4 <= KEEP_SOFTMAX_BYTES
            else None
        )
        for s in range(0, m, chunk):
            logits = _logits(h[s : s + chunk], weight, bias)  # (c, V) float32
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            ce[s : s + chunk] = lse[s : s + chunk] - logits.gather(1, tgt[s : s + chunk, None]).squeeze(1)
            if keep is not None:
                torch.exp(logits.sub_(lse[s : s + chunk, None]), out=keep[s : s + chunk])  # softmax
        ctx.save_for_backward(h, weight, bias, tgt, lse, keep)
        ctx.chunk = chunk
        return ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, bias, tgt, lse, keep = ctx.saved_tensors
        chunk = ctx.chunk
        grad_h = torch.empty_like(h)
        for s in range(0, h.shape[0], chunk):
            if keep is not None:
                p = keep[s : s + chunk]  # used once (once_differentiable): modified in place
            else:
                p = (
                    _logits(h[s : s + chunk], weight, bias) - lse[s : s + chunk, None]
                ).exp_()  # softmax (c, V)
            p.scatter_add_(1, tgt[s : s + chunk, None], torch.full_like(p[:, :1], -1.0))  # - one-hot
            p.mul_(grad[s : s + chunk, None])
            grad_h[s : s + chunk] = (p.to(weight.dtype) @ weight).to(h.dtype)  # (c, H)
        return grad_h, None, None, None, None


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The model's own dtype for the product, float32 for the softmax (as transformers' loss does).
    out = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    return out.float()


def _labelled(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows (M, H) that predict a labelled token, their targets (M,), their sequence index (M,))."""
    h, tgt = hidden[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    pos = (tgt != -100).nonzero(as_tuple=False)  # (M, 2): (sequence, position)
    return h[pos[:, 0], pos[:, 1]], tgt[pos[:, 0], pos[:, 1]], pos[:, 0]


def chunked_token_ce(
    hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of every labelled position, the output layer applied in chunks.

    Args:
        hidden: (n, T, H) the final (normed) hidden states.
        labels: (n, T), -100 where not trained on.
        weight: (V, H) output layer; bias (V,) or None. Frozen: no gradient is computed for them.
        chunk: Rows per chunk.

    Returns:
        (per-position losses (M,) float32 with autograd to ``hidden``, their sequence index (M,)).
    """
    h, tgt, seq = _labelled(hidden, labels)
    return _ChunkedCE.apply(h, weight, bias, tgt, max(1, int(chunk))), seq


@torch.no_grad()
def chunked_token_stats(
    hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk: int
) -> tuple[torch.Tensor, ...]:
    """:func:`clair_ray.workloads.lora.loop.token_stats` per sequence, the output layer in chunks.

    Args:
        hidden: (n, T, H) final hidden states; labels (n, T).

    Returns:
        Per sequence (n,): summed token loss (float64), scored tokens, right tokens, exact match.
    """
    h, tgt, seq = _labelled(hidden, labels)
    n = hidden.shape[0]
    loss = torch.zeros(n, dtype=torch.float64, device=hidden.device)
    right = torch.zeros(n, device=hidden.device)
    for s in range(0, h.shape[0], max(1, int(chunk))):
        logits = _logits(h[s : s + chunk], weight, bias)  # (c, V)
        t = tgt[s : s + chunk]
        target = logits.gather(1, t[:, None]).squeeze(1)  # (c,)
        top = logits.amax(dim=-1)  # (c,)
        ce = top + (logits - top[:, None]).exp_().sum(dim=-1).log_() - target  # logsumexp - target logit
        loss.index_add_(0, seq[s : s + chunk], ce.double())
        # argmax == t without a second pass: the target's logit is the maximum (a tie, which float32
        # logits of a real model practically never have, would count as right here)
        right.index_add_(0, seq[s : s + chunk], (target >= top).float())
    tokens = (labels[:, 1:] != -100).sum(dim=1).float()
    exact = ((right == tokens) & (tokens > 0)).float()
    return loss, tokens, right, exact


class FrozenPrefix:
    """A Llama-style decoder split at layer ``first``: the frozen prefix below it and the rest.

    Attributes:
        first: Index of the lowest adapted layer.
    """

    def __init__(self, model: nn.Module, first: int) -> None:
        """Splits ``model`` (not copied; its modules are swapped only for the length of a call).

        Raises:
            ValueError: If the architecture is not supported or ``first`` is out of range.
        """
        if not self.supported(model):
            raise ValueError(f"frozen-prefix reuse does not support {type(model).__name__}")
        self.body = model.base_model
        n = len(self.body.layers)
        if not 0 < first < n:
            raise ValueError(f"first adapted layer {first} must be in [1, {n})")
        self.first = int(first)

    @staticmethod
    def supported(model: nn.Module) -> bool:
        """Whether ``model``'s body is a Llama-style decoder (see the module docstring)."""
        body = getattr(model, "base_model", None)
        return all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) and isinstance(
            getattr(body, "layers", None), nn.ModuleList
        )

    @contextlib.contextmanager
    def _swapped(self, layers: list[nn.Module], norm: nn.Module) -> Iterator[None]:
        body = self.body
        old_layers, old_norm = body.layers, body.norm
        body.layers, body.norm = nn.ModuleList(layers), norm
        try:
            yield
        finally:
            body.layers, body.norm = old_layers, old_norm

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(n, T, H) the input of layer ``first`` (the output of the frozen layers below it)."""
        with self._swapped(list(self.body.layers[: self.first]), nn.Identity()):
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def suffix(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(n, T, H) the final normed hidden states from a prefix (with autograd through the adapters)."""
        with self._swapped(list(self.body.layers[self.first :]), self.body.norm):
            out = self.body(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state


class LabelledTail:
    """The last decoder layer's feed-forward block (``mlp``) run only where a label is predicted.

    Hooks on that module slice its input to the positions from :meth:`only_scored`'s start and pad its
    output back with zeros; outside :meth:`only_scored` they pass everything through. The module tree
    (and so every module name and state-dict key) is unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        """Hooks the last layer of a GPT-2 (``h``) or Llama-style (``layers``) body of ``model``; with
        neither (:attr:`supported` False), :meth:`only_scored` changes nothing."""
        self.start = 0
        body = getattr(model, "base_model", None)
        layers = getattr(body, "h", None) or getattr(body, "layers", None)
        mlp = getattr(layers[-1], "mlp", None) if isinstance(layers, nn.ModuleList) and len(layers) else None
        self.supported = isinstance(mlp, nn.Module)
        if self.supported:
            mlp.register_forward_pre_hook(self._cut)
            mlp.register_forward_hook(self._pad)

    @staticmethod
    def first_scored(labels: torch.Tensor) -> int:
        """The first position (n, T) ``labels`` score: one before the first column with a label (0 if
        none; column 0 is never predicted)."""
        cols = (labels[:, 1:] != -100).any(dim=0).nonzero()
        return int(cols[0]) if len(cols) else 0

    @contextlib.contextmanager
    def only_scored(self, labels: torch.Tensor) -> Iterator[None]:
        """Within: the block runs on positions from :meth:`first_scored` of ``labels`` (n, T) on."""
        self.start = self.first_scored(labels) if self.supported else 0
        try:
            yield
        finally:
            self.start = 0

    def _cut(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not self.start:
            return None
        return (args[0][:, self.start :], *args[1:])  # (n, T - start, H)

    def _pad(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        if not self.start:
            return None
        zeros = out.new_zeros(out.shape[0], self.start, out.shape[2])
        return torch.cat([zeros, out], dim=1)  # (n, T, H)


class PrefixCache:
    """Frozen-prefix hidden states by key (e.g. ``(trial, client, "train")``), computed once each.

    A bound, not an LRU: past ``max_bytes`` it starts over (recomputing a prefix is exact, only slower).
    """

    def __init__(self, max_bytes: int = 2 << 30, rows: int = 64) -> None:
        self.max_bytes, self.rows = int(max_bytes), int(rows)
        self._states: dict[tuple, torch.Tensor] = {}
        self._bytes = 0

    def clear(self) -> None:
        """Forgets every state."""
        self._states.clear()
        self._bytes = 0

    def get(
        self, key: tuple, prefix: FrozenPrefix, data: dict[str, torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        """(n, T, H) the prefix's hidden states of ``data``'s rows (``input_ids``, ``attention_mask``)."""
        if key not in self._states:
            if self._bytes > self.max_bytes:
                self.clear()
            ids, mask = data["input_ids"], data.get("attention_mask")  # (n, T)
            n, t = ids.shape
            # Rows by real length, so each chunk runs at its own longest row; padding positions are left
            # zero (no real position attends to them and none is labelled).
            order = torch.argsort(mask.sum(dim=1), stable=True) if mask is not None else torch.arange(n)
            h = None
            for i in range(0, n, self.rows):
                idx = order[i : i + self.rows]
                m = None if mask is None else mask[idx]
                w = real_width(m) or t
                part = prefix.hidden(ids[idx, :w].to(device), None if m is None else m[:, :w].to(device))
                if h is None:
                    h = part.new_zeros(n, t, part.shape[-1])  # (n, T, H)
                h[idx.to(part.device), :w] = part
            assert h is not None
            self._states[key] = h
            self._bytes += h.numel() * h.element_size()
        return self._states[key]


def fuse_tanh_gelu(model: nn.Module) -> int:
    """Swaps GPT-2's ``NewGELUActivation`` (the tanh GELU as five elementwise kernels, each a pass over
    the (G, b, T, 4H) activations) for transformers' ``GELUTanh`` (``F.gelu(approximate="tanh")``: the
    same function in one kernel, equal up to float rounding), in place.

    Returns:
        How many activations were swapped.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is NewGELUActivation:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, GELUTanh())
            swapped += 1
    return swapped
