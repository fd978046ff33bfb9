"""Grouped LoRA: train G virtual clients' adapters in ONE forward/backward over a shared frozen base.

A client actor keeps one base model resident and serves many virtual clients.
Training them one at a time pays the per-step costs (Python, module calls, kernel launches, optimiser
step) once per client; here G clients share every step. The batch is laid out as G contiguous groups of
``b`` sequences, ``(G*b, T)``, and every adapted module computes, per group ``g``::

    y_g = base(x_g) + scaling * (x_g @ A_g^T) @ B_g^T        x_g: (b, T, in), A_g: (r, in), B_g: (out, r)

with batched matmuls over a ``(G, b*T, in)`` view, the LoRA factors stored stacked as ``(G, r, in)`` and
``(G, out, r)``. This is peft's LoRA forward (dropout 0, ``scaling = alpha / r``) per group; the base map
and the adapters run in one fused autograd function (``_GroupedLoRAFn``: why, in its docstring).

**Why the numbers equal one-at-a-time training.** Every op of a causal LM is per sequence (LayerNorm and
RMSNorm are per token, attention never mixes sequences), so group g's outputs depend only on (A_g, B_g).
The loss is the SUM over groups of each group's mean token loss, so ``d loss / d (A_g, B_g)`` is exactly
client g's own gradient (a mean over the whole batch would scale each by 1/G). AdamW is elementwise on a
parameter (moments, bias correction with the shared step count, decoupled weight decay), so one AdamW on
the stacked ``(G, ...)`` tensors IS G independent AdamW optimisers. What remains is float round-off from a
different summation order (bigger matmuls); tests/workloads/lora/test_grouped.py compares against peft +
``torch.optim.AdamW`` client by client: losses within rtol 1e-5 (float32 and float64), adapters within
rtol 1e-5 in float64 (float32 needs a small absolute floor: Adam turns round-off in a near-zero gradient
into a step of up to ~lr). Models whose sequences interact in a batch (MoE routing with capacity limits,
batch norm) break the per-sequence premise; causal LMs such as GPT-2 and Llama do not.

Model dropout (GPT-2's ``*_pdrop``) draws its masks from one RNG stream for the whole batch, so with
dropout > 0 the masks differ from a per-client loop; the equivalence holds for dropout 0 (which the LoRA
workloads use). LoRA dropout is not supported (always 0, as in :mod:`clair_ray.workloads.lora`).

**Initialisation.** :meth:`GroupedLoRAModel.init_client_state` reproduces peft's ``init_lora_weights=True``
bit for bit: ``torch.manual_seed(seed)`` followed by ``get_peft_model`` draws, per target module in module
order, ``nn.Linear(in, r)``'s default init of A, ``nn.Linear(r, out)``'s default init of B, then
``reset_lora_parameters`` redraws A with ``kaiming_uniform_(a=sqrt(5))`` and zeroes B. The method replays
those draws on a private generator (tested against peft 0.21). If a future peft changes that order, load
the initial adapters from a peft model instead: ``load_clients([get_peft_model_state_dict(m)] * G)``.

**State dicts.** :meth:`GroupedLoRAModel.client_state_dict` returns exactly what
``peft.get_peft_model_state_dict`` returns for ``LoraConfig(r, lora_alpha, target_modules)`` on the same
base (keys ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), in module
order), so ``set_peft_model_state_dict`` loads it into a peft model. :meth:`~GroupedLoRAModel.client_factors`
gives the float64 factor pairs of :func:`clair_ray.workloads.lora.extract_factors` (scaling folded into B).

**Throughput** (RESULTS.md): grouping shares the per-step overhead; on CPU the per-token compute bounds
the gain (best near 4k tokens per step). Prompt positions skip the last feed-forward block (``tail``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from clair_ray.workloads.lora.loop import adamw_steps, grouped_token_loss, real_width, token_stats
from clair_ray.workloads.lora.prefix import (
    FrozenPrefix,
    LabelledTail,
    adapted_modules,
    chunked_token_ce,
    chunked_token_stats,
    layer_index,
    output_layer,
)

__all__ = ["GroupedLoRALinear", "GroupedLoRAModel", "PEFT_PREFIX"]

#: Prefix of every key in a peft adapter state dict (``PeftModel.base_model.model``).
PEFT_PREFIX = "base_model.model."


class _GroupedLoRAFn(torch.autograd.Function):
    """Frozen base linear map plus G grouped LoRA adapters, fused, with a hand-written backward.

    ``y_g = x_g W + bias + scaling * (x_g A_g^T) B_g^T`` (W as (in, out), i.e. GPT-2 Conv1D's layout).
    Why not plain autograd over ``base(x) + scaling * bmm(bmm(x, A^T), B^T)`` (the same numbers up to
    round-off)? Measured on CPU, one thread, it spends a large share of the step outside the matmuls:

    * full-size elementwise passes over (G*b*T, out): ``* scaling`` and ``+ base`` forward, ``* scaling``
      backward, and the sum of the base's and the adapter's input gradients (G*b*T, in). Here the adapter
      term is accumulated into the base output and into the base's input gradient in place by
      ``baddbmm_`` (scaling as its alpha), and the scaling lands on the small B instead.
    * slow BLAS layouts for the skinny (r = 4..16) products: autograd forms dA^T = x^T dh as (G, in, r)
      and dh = dy B with B's r-minor layout, each 3-5x slower than dA = dh^T x as (G, r, in) and
      dh = dy (B^T contiguous)^T.

    The base weight and bias must be frozen (no gradient is computed for them).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scaling: float,
        weight_is_in_out: bool,
    ) -> torch.Tensor:
        g, r, n_in = a.shape
        n_out = b.shape[1]
        x2 = x.reshape(-1, n_in)  # (G*N, in), N = b*T tokens per group
        w = weight if weight_is_in_out else weight.t()  # (in, out)
        y = torch.mm(x2, w) if bias is None else torch.addmm(bias, x2, w)  # (G*N, out), as Conv1D/Linear
        h = torch.bmm(x2.view(g, -1, n_in), a.transpose(1, 2))  # (G, N, r)
        y.view(g, -1, n_out).baddbmm_(h, b.transpose(1, 2), alpha=scaling)  # += scaling * h B^T per group
        ctx.save_for_backward(x2, a, b, h, weight)
        ctx.scaling, ctx.weight_is_in_out, ctx.x_shape = scaling, weight_is_in_out, x.shape
        return y.view(*x.shape[:-1], n_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, a, b, h, weight = ctx.saved_tensors
        g, r, n_in = a.shape
        n_out = b.shape[1]
        s = ctx.scaling
        grad2 = grad.reshape(-1, n_out).contiguous()  # (G*N, out)
        grad3 = grad2.view(g, -1, n_out)  # (G, N, out)
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_a = grad_b = None
        if need_x or need_a:
            b_t = (b * s).transpose(1, 2).contiguous()  # (G, r, out): the fast layout for dy @ B
            grad_h = torch.bmm(grad3, b_t.transpose(1, 2))  # (G, N, r), scaling folded in
            if need_a:
                grad_a = torch.bmm(grad_h.transpose(1, 2), x2.view(g, -1, n_in))  # (G, r, in)
            if need_x:
                w_t = weight.t() if ctx.weight_is_in_out else weight  # (out, in)
                grad_x = torch.mm(grad2, w_t)  # (G*N, in): the base's input gradient
                grad_x.view(g, -1, n_in).baddbmm_(grad_h, a)  # + the adapter's, in place
                grad_x = grad_x.view(ctx.x_shape)
        if need_b:
            grad_b = (torch.bmm(h.transpose(1, 2), grad3) * s).transpose(1, 2).contiguous()  # (G, out, r)
        return grad_x, grad_a, grad_b, None, None, None, None


class GroupedLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` or GPT-2 ``Conv1D`` plus G stacked LoRA adapters, one per batch group.

    Attributes:
        base: The wrapped base module (frozen).
        lora_A: (G, r, in) parameter, peft's ``lora_A.weight`` per client.
        lora_B: (G, out, r) parameter, peft's ``lora_B.weight`` per client.
        scaling: ``alpha / r``.
    """

    def __init__(self, base: nn.Module, n_groups: int, r: int, alpha: float) -> None:
        """Wraps ``base``; the adapters start at A = B = 0 (load or initialise clients before use).

        Args:
            base: An ``nn.Linear`` (weight (out, in)) or ``Conv1D`` (weight (in, out)).
            n_groups: G, the number of clients sharing a batch.
            r: LoRA rank.
            alpha: LoRA alpha.

        Raises:
            TypeError: If ``base`` is neither Linear nor Conv1D.
        """
        super().__init__()
        # Exact types: the fused forward computes the base map itself, so a subclass with its own forward
        # (a quantised Linear, say) would be silently wrong.
        if type(base) is nn.Linear:
            self.out_features, self.in_features = base.weight.shape
        elif type(base) is Conv1D:
            self.in_features, self.out_features = base.weight.shape  # Conv1D stores W as (in, out)
        else:
            raise TypeError(f"grouped LoRA wraps nn.Linear or Conv1D exactly, got {type(base).__name__}")
        self.base = base
        self.r = int(r)
        self.scaling = float(alpha) / self.r
        w = base.weight
        self.lora_A = nn.Parameter(
            torch.zeros(n_groups, self.r, self.in_features, dtype=w.dtype, device=w.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(n_groups, self.out_features, self.r, dtype=w.dtype, device=w.device)
        )

    @property
    def n_groups(self) -> int:
        """G, the number of stacked adapters."""
        return int(self.lora_A.shape[0])

    def resize(self, n_groups: int) -> None:
        """Replaces the adapters by G' zeroed ones (new Parameters: any optimiser must be rebuilt)."""
        self.lora_A = nn.Parameter(self.lora_A.new_zeros(n_groups, self.r, self.in_features))
        self.lora_B = nn.Parameter(self.lora_B.new_zeros(n_groups, self.out_features, self.r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + scaling * (x_g A_g^T) B_g^T`` for each of the G contiguous groups of ``x``.

        Args:
            x: (G*b, ..., in), batch first, group g owning rows ``g*b:(g+1)*b``.

        Returns:
            (G*b, ..., out).
        """
        g = self.n_groups
        if x.shape[0] % g:
            raise ValueError(f"grouped LoRA: batch {x.shape[0]} is not a multiple of the {g} client groups")
        base = self.base
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            raise RuntimeError("grouped LoRA: the base weights must be frozen (requires_grad=False)")
        # Conv1D computes addmm(bias, x, W) with W (in, out); nn.Linear the same with W^T.
        return _GroupedLoRAFn.apply(
            x, self.lora_A, self.lora_B, base.weight, base.bias, self.scaling, isinstance(base, Conv1D)
        )

    def extra_repr(self) -> str:
        return (
            f"G={self.n_groups}, in={self.in_features}, out={self.out_features}, r={self.r}, "
            f"scaling={self.scaling}"
        )


class GroupedLoRAModel:
    """A HF causal LM whose target modules carry G clients' LoRA adapters, trained in one batch.

    Build it once per actor (the base stays resident), then per call: :meth:`load_clients` (any G),
    :meth:`train_steps`, and :meth:`client_state_dict` / :meth:`client_factors` for each client.

    Attributes:
        model: The HF model, its target modules replaced in place by :class:`GroupedLoRALinear`.
        layers: Base-model module name -> its grouped layer, in module order.
        tail: Runs the last layer's feed-forward block on scored positions only (:class:`LabelledTail`).
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: Sequence[str],
        r: int,
        lora_alpha: float,
        n_clients: int = 1,
        layers: Sequence[int] = (),
        reuse_prefix: bool = False,
        loss_chunk: int = 0,
    ) -> None:
        """Freezes ``model`` and replaces its target modules (in place; pass a copy to keep the original).

        Args:
            model: A transformers causal LM (GPT-2 ``Conv1D`` or ``nn.Linear`` projections).
            target_modules: peft-style target names, e.g. ``["c_attn", "c_proj", "c_fc"]``.
            r: LoRA rank.
            lora_alpha: LoRA alpha (``scaling = lora_alpha / r``, peft's default without rsLoRA).
            n_clients: Initial G (:meth:`load_clients` changes it).
            layers: Adapt only targets in these decoder layers (peft's ``layers_to_transform``; empty: all).
            reuse_prefix: Split off the frozen layers below the lowest adapted one
                (:class:`~clair_ray.workloads.lora.prefix.FrozenPrefix`) where the architecture allows;
                callers then pass its hidden states (``hidden=``) instead of recomputing them.
            loss_chunk: Output-layer rows per chunk (0: whole logits, the model's own forward).

        Raises:
            ValueError: If no Linear/Conv1D module matches, or a match is of another type.
        """
        if isinstance(target_modules, str) or not target_modules:
            raise ValueError(f"target_modules must be a non-empty list of names, got {target_modules!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        self.model = model
        self.r, self.lora_alpha = r, float(lora_alpha)
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers: dict[str, GroupedLoRALinear] = {}
        for name, mod in adapted_modules(model, target_modules, layers):
            if type(mod) not in (nn.Linear, Conv1D):
                raise ValueError(f"target module {name!r} is a {type(mod).__name__}, not Linear/Conv1D")
            parent_name, _, child = name.rpartition(".")
            layer = GroupedLoRALinear(mod, n_clients, r, lora_alpha)
            setattr(model.get_submodule(parent_name), child, layer)
            self.layers[name] = layer
        if not self.layers:
            where = f" in layers {list(layers)}" if layers else ""
            raise ValueError(f"target_modules={list(target_modules)!r} match no module of the model{where}")
        self.loss_chunk = int(loss_chunk)
        self.prefix: FrozenPrefix | None = None
        first = min(layer_index(n) or 0 for n in self.layers)
        if reuse_prefix and layers and first > 0 and FrozenPrefix.supported(model):
            self.prefix = FrozenPrefix(model, first)
        self.tail = LabelledTail(model)

    @property
    def n_clients(self) -> int:
        """G, the number of clients currently loaded."""
        return next(iter(self.layers.values())).n_groups

    def parameters(self) -> list[nn.Parameter]:
        """The trainable (stacked LoRA) parameters, A then B per module in module order."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    def _keys(self, name: str) -> tuple[str, str]:
        return f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight"

    # -----------------------------------------------------------------------------------------------------
    # Client state in and out
    # -----------------------------------------------------------------------------------------------------

    def init_client_state(self, seed: int) -> dict[str, torch.Tensor]:
        """peft's initial adapter for ``torch.manual_seed(seed); get_peft_model(model, LoraConfig(...))``.

        Replays peft 0.21's draws (see the module docstring) on a private generator, so the global RNG
        is untouched. Every client of a workload starts from the same init seed.

        Args:
            seed: The init seed.

        Returns:
            A peft adapter state dict (A kaiming-uniform, B zeros), loadable by :meth:`load_clients`.
        """
        gen = torch.Generator().manual_seed(int(seed))
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            a = torch.empty(layer.r, layer.in_features)  # (r, in)
            b = torch.empty(layer.out_features, layer.r)  # (out, r)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)  # nn.Linear(in, r) default init
            nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=gen)  # nn.Linear(r, out) default init
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)  # reset_lora_parameters: A again
            b.zero_()  # ... and B = 0
            dtype = layer.lora_A.dtype
            key_a, key_b = self._keys(name)
            out[key_a], out[key_b] = a.to(dtype), b.to(dtype)
        return out

    def state_from_factors(self, factors: Mapping[str, tuple[Any, Any]]) -> dict[str, torch.Tensor]:
        """A peft adapter state dict from factor pairs with ``alpha / r`` folded into B (inverse of
        :meth:`client_factors`), loadable by :meth:`load_clients`; pairs of a lower rank r' < r are
        zero-padded (the same product).

        Args:
            factors: Module name -> (B (out, r), A (r, in)) for every grouped module.

        Raises:
            ValueError: On missing modules or wrong shapes.
        """
        missing = sorted(set(self.layers) - set(factors))
        if missing:
            raise ValueError(f"factors: missing modules {missing[:3]}")
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            b, a = (torch.tensor(np.array(x), dtype=torch.float64) for x in factors[name])  # copies
            if b.ndim == a.ndim == 2 and b.shape[1] == a.shape[0] < layer.r:  # lower rank: zero-padded
                b = nn.functional.pad(b, (0, layer.r - b.shape[1]))
                a = nn.functional.pad(a, (0, 0, 0, layer.r - a.shape[0]))
            if tuple(b.shape) != (layer.out_features, layer.r) or tuple(a.shape) != (
                layer.r,
                layer.in_features,
            ):
                raise ValueError(
                    f"factors[{name!r}]: expected B ({layer.out_features}, {layer.r}) and A ({layer.r}, "
                    f"{layer.in_features}), got {tuple(b.shape)} and {tuple(a.shape)}"
                )
            key_a, key_b = self._keys(name)
            out[key_a], out[key_b] = a.float(), (b / layer.scaling).float()
        return out

    def load_clients(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Loads G client adapters (peft state dicts, torch or numpy values); G = ``len(states)``.

        Changing G replaces the parameters (the optimiser is rebuilt per :meth:`train_steps` call anyway).

        Args:
            states: One peft adapter state dict per client, in group order (group g = ``states[g]``).

        Raises:
            ValueError: On an empty list, missing or unknown keys, or a shape mismatch.
        """
        if not states:
            raise ValueError("load_clients: need at least one client state")
        g = len(states)
        expected = {k for name in self.layers for k in self._keys(name)}
        for i, st in enumerate(states):
            if set(st) != expected:
                missing, extra = sorted(expected - set(st)), sorted(set(st) - expected)
                raise ValueError(f"states[{i}]: missing keys {missing[:3]}, unknown keys {extra[:3]}")
        # Stack and check everything first, so a bad state leaves the loaded clients untouched.
        stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, layer in self.layers.items():
            pair = []
            for key, shape in zip(
                self._keys(name), ((layer.r, layer.in_features), (layer.out_features, layer.r)), strict=True
            ):
                vals = [torch.as_tensor(st[key]) for st in states]
                for i, v in enumerate(vals):
                    if tuple(v.shape) != shape:
                        raise ValueError(f"states[{i}][{key!r}]: shape {tuple(v.shape)} != {shape}")
                pair.append(torch.stack(vals))  # (G, r, in) for A, (G, out, r) for B
            stacked[name] = (pair[0], pair[1])
        with torch.no_grad():
            for name, layer in self.layers.items():
                if layer.n_groups != g:
                    layer.resize(g)
                for param, val in zip((layer.lora_A, layer.lora_B), stacked[name], strict=True):
                    param.copy_(val.to(dtype=param.dtype, device=param.device))

    def client_state_dict(self, g: int) -> dict[str, torch.Tensor]:
        """Client g's adapter as ``peft.get_peft_model_state_dict`` returns it (detached CPU copies).

        Args:
            g: Group index in ``[0, G)``.

        Returns:
            ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), module order.
        """
        if not 0 <= g < self.n_clients:
            raise IndexError(f"client group {g} out of range [0, {self.n_clients})")
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            key_a, key_b = self._keys(name)
            out[key_a] = layer.lora_A[g].detach().cpu().clone()
            out[key_b] = layer.lora_B[g].detach().cpu().clone()
        return out

    def client_factors(self, g: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Client g's factors as :func:`clair_ray.workloads.lora.extract_factors` gives them.

        Returns:
            Module name -> (B (out, r) float64 with ``alpha / r`` folded in, A (r, in) float64).
        """
        if not 0 <= g < self.n_clients:
            raise IndexError(f"client group {g} out of range [0, {self.n_clients})")
        return {
            name: (
                layer.lora_B[g].detach().cpu().double().numpy() * layer.scaling,
                layer.lora_A[g].detach().cpu().double().numpy(),
            )
            for name, layer in self.layers.items()
        }

    # -----------------------------------------------------------------------------------------------------
    # Forward and training
    # -----------------------------------------------------------------------------------------------------

    def _flat(self, t: torch.Tensor | None, what: str) -> torch.Tensor | None:
        if t is None:
            return None
        g = self.n_clients
        if t.ndim != 3 or t.shape[0] != g:
            raise ValueError(f"{what}: expected ({g}, b, T) for G={g} clients, got {tuple(t.shape)}")
        return t.reshape(-1, t.shape[-1])  # (G*b, T): group g is rows g*b:(g+1)*b

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every client on its own sub-batch, in one forward.

        Args:
            input_ids: (G, b, T) token ids, ``input_ids[g]`` for client g.
            attention_mask: Optional (G, b, T).

        Returns:
            (G, b, T, V) logits.
        """
        ids = self._flat(input_ids, "input_ids")
        mask = self._flat(attention_mask, "attention_mask")
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (G*b, T, V)
        return logits.view(*input_ids.shape, -1)

    def _batch(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        hidden: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(G, b, T) inputs flattened to (G*b, T) (labels default to the ids), cut with the (..., T, H)
        prefix states to the batch's real width (dynamic padding)."""
        ids = self._flat(input_ids, "input_ids")
        lab = ids if labels is None else self._flat(labels, "labels")
        mask = self._flat(attention_mask, "attention_mask")
        w = real_width(mask)
        if mask is None or w == ids.shape[1]:
            return ids, lab, mask, hidden
        return ids[:, :w], lab[:, :w], mask[:, :w], None if hidden is None else hidden[..., :w, :]

    def _head(
        self, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, hidden: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """The chunked output layer's arguments: final hidden states (G*b, T, H), labels, its weight and
        bias, and rows per chunk (``loss_chunk``; 0: every row at once)."""
        h = self._final_hidden(ids, mask, hidden)
        weight, bias = output_layer(self.model)
        return h, labels, weight, bias, self.loss_chunk or h.shape[0] * h.shape[1]

    def _final_hidden(
        self, ids: torch.Tensor, mask: torch.Tensor | None, hidden: torch.Tensor | None
    ) -> torch.Tensor:
        """(G*b, T, H) final hidden states: from the frozen prefix's ``hidden`` (G*b, T, H), or whole."""
        if hidden is not None:
            if self.prefix is None:
                raise ValueError("hidden states given but this model has no frozen prefix (reuse_prefix)")
            return self.prefix.suffix(hidden.reshape(*ids.shape, -1), mask)
        body = self.model.base_model
        return body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    def client_losses(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each client's mean next-token loss on its sub-batch (with autograd; wrap in no_grad to evaluate).

        Args:
            input_ids: (G, b, T).
            labels: (G, b, T), -100 where not trained on; default ``input_ids`` (every token).
            attention_mask: Optional (G, b, T).
            hidden: Optional (G, b, T, H): the frozen prefix's output for these sequences
                (:meth:`prefix_hidden`); the layers below the first adapted one are then skipped.

        Returns:
            (G,) losses.
        """
        g = self.n_clients
        ids, lab, mask, hidden = self._batch(input_ids, labels, attention_mask, hidden)
        with self.tail.only_scored(lab):
            if hidden is None and not self.loss_chunk:
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (G*b,T,V)
                return grouped_token_loss(logits, lab, g)[0]
            ce, seq = chunked_token_ce(*self._head(ids, lab, mask, hidden))  # (M,)
        group = torch.div(seq, ids.shape[0] // g, rounding_mode="floor")  # sequence -> its client
        total = torch.zeros(g, dtype=ce.dtype, device=ce.device).index_add(0, group, ce)
        count = torch.zeros(g, dtype=ce.dtype, device=ce.device).index_add(0, group, torch.ones_like(ce))
        return total / count.clamp_min(1)

    @torch.no_grad()
    def prefix_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(n, T, H) the frozen prefix's output of n sequences (adapter-independent; cache and reuse it)."""
        if self.prefix is None:
            raise ValueError("this model has no frozen prefix (reuse_prefix with layers above layer 0)")
        return self.prefix.hidden(input_ids, attention_mask)

    @torch.no_grad()
    def sequence_stats(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Per client and sequence (G, b): summed token loss, scored tokens, right tokens, exact match
        (:func:`~clair_ray.workloads.lora.loop.token_stats`), with or without the prefix and chunks."""
        g, b = input_ids.shape[:2]
        ids, lab, mask, hidden = self._batch(input_ids, labels, attention_mask, hidden)
        with self.tail.only_scored(lab):
            if hidden is None and not self.loss_chunk:
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (G*b,T,V)
                stats = token_stats(logits[:, :-1], lab[:, 1:])
            else:
                stats = chunked_token_stats(*self._head(ids, lab, mask, hidden))
        return tuple(t.view(g, b) for t in stats)

    def train_steps(
        self,
        input_ids: torch.Tensor,
        steps: int,
        lr: float,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> torch.Tensor:
        """``steps`` AdamW steps for all G clients at once, equal to G independent AdamW runs.

        A fresh AdamW per call (as :func:`clair_ray.workloads.lora.train_lora`: one local-training call
        per client and round). The minimised loss is the sum of the clients' mean losses, so each client's
        gradient is its own (see the module docstring).

        Args:
            input_ids: (G, b, T) used at every step, or (steps, G, b, T), one batch per step.
            steps: Optimiser steps (>= 0).
            lr: AdamW learning rate.
            labels: Same shape as ``input_ids``, -100 where not trained on; default: every token.
            attention_mask: Optional, same shape as ``input_ids``.
            weight_decay: AdamW decoupled weight decay (0 as in ``train_lora``; torch's default is 0.01).
            betas: AdamW betas.
            eps: AdamW eps.

        Returns:
            (steps, G) float64 CPU tensor: each client's loss at each step, before that step's update.
        """
        per_step = input_ids.ndim == 4
        if per_step and input_ids.shape[0] != steps:
            raise ValueError(f"input_ids: {input_ids.shape[0]} batches for {steps} steps")
        self.model.train()

        def step_losses(s: int) -> torch.Tensor:
            ids, lab, mask = (
                (t[s] if per_step and t is not None else t) for t in (input_ids, labels, attention_mask)
            )
            return self.client_losses(ids, lab, mask)  # (G,)

        return adamw_steps(
            self.parameters(), step_losses, steps, lr, weight_decay=weight_decay, betas=betas, eps=eps
        ).reshape(steps, self.n_clients)
