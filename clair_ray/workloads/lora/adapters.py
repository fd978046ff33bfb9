"""LoRA with peft: wrap a causal LM, train a client's adapter, move adapters in and out as numpy factors.

Shared by the copy-task workload (:mod:`clair_ray.workloads.copy_task`) and the Hugging Face causal-LM
workload (:mod:`clair_ray.workloads.hf_causal_lm`). Plain functions, no Ray: the engine decides where
they run.

**Orientation.** Every factor pair handed out or taken in here is in the *Linear orientation*:
``B`` (out, r) and ``A`` (r, in) with ``B @ A`` the update of the module's (out × in) weight, i.e. of
``y = x W^T`` (CLAIR's shared side is the output side). peft keeps ``lora_B.weight``
(out, r) and ``lora_A.weight`` (r, in) in that orientation for ``nn.Linear`` *and* for GPT-2's
``Conv1D``; the difference is the base weight: ``nn.Linear.weight`` is (out, in) but ``Conv1D.weight``
is stored transposed, (in, out) (``y = x W + b``). :func:`linear_weight` and :func:`fold_corrections`
handle that, and peft's own merge transposes the delta for Conv1D (``fan_in_fan_out=True``).

**Scaling.** peft applies ``scaling = alpha / r`` to ``B @ A``. Extracted factors fold it into B, so
``B @ A`` is the module's *effective* weight delta; :func:`load_factors` divides it out again. Extracted
factors are float64: ``(s·B)/s`` of a float32 ``B`` rounds back to the same float32, so an extract →
load round trip is exact for any ``alpha``.

**Refined adapters**: an honest client's refined model is the base
``W_0 + R`` plus its projected adapter, with ``R`` ONE shared dense correction per module.
:func:`fold_corrections` folds the corrections into one shared base copy, and :func:`load_factors` then
swaps client adapters on top of it; there is never a merged weight copy per client.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D

from clair_ray.workloads.lora.loop import (
    adamw_steps,
    batch_order,
    metrics_from_stats,
    token_stats,
    trim_batch,
)
from clair_ray.workloads.lora.spec import LoraSpec

__all__ = [
    "Factors",
    "export_states",
    "LoraSpec",
    "apply_refinement",
    "client_model",
    "effective_delta",
    "evaluate_lm",
    "extract_factors",
    "fold_corrections",
    "linear_weight",
    "lm_loss",
    "load_factors",
    "lora_modules",
    "quiet_model",
    "reset_lora",
    "stack_pairs",
    "train_client",
    "train_lora",
    "wrap_lora",
]

#: Module name (as in the base model, e.g. ``transformer.h.0.attn.c_attn``) -> (B (out, r), A (r, in)).
Factors = dict[str, tuple[np.ndarray, np.ndarray]]

_PEFT_PREFIX = "base_model.model."
_ADAPTER = "default"


def quiet_model(model: torch.nn.Module) -> torch.nn.Module:
    """Removes the cause of transformers' "``loss_type=None`` ... unrecognized" warning.

    The warning fires when a model computes its own loss without a ``loss_type``; this module computes
    losses itself (:func:`lm_loss`), and naming the loss also keeps a caller that passes ``labels`` quiet.

    Args:
        model: A transformers model (modified in place).

    Returns:
        The same model.
    """
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def wrap_lora(model: torch.nn.Module, spec: LoraSpec) -> PeftModel:
    """Wraps a causal LM with a fresh LoRA adapter (dropout 0), initialised from ``spec.init_seed``.

    peft injects its layers into ``model`` in place; pass a copy to keep the original. The initial
    factors are kept on the result (``_clair_init_factors``) so :func:`reset_lora` can restart a client
    without re-wrapping.

    Args:
        model: A transformers causal LM.
        spec: The LoRA knobs.

    Returns:
        The peft model, base weights frozen, adapter trainable.

    Raises:
        ValueError: If no module matches ``spec.targets``.
    """
    quiet_model(model)
    matched = [
        m
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and n.split(".")[-1] in spec.targets
    ]
    if not matched:
        raise ValueError(f"workload.lora.targets={spec.targets!r}: matches no Linear/Conv1D module")
    # peft warns for every Conv1D target unless told the weight is stored (in, out): say so at the source.
    fan_in_fan_out = all(isinstance(m, Conv1D) for m in matched)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        layers_to_transform=list(spec.layers) or None,
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning that is
        # not ours to fix); filter exactly that message.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(spec.init_seed)
        peft_model = get_peft_model(model, config)
    peft_model._clair_init_factors = extract_factors(peft_model)  # type: ignore[attr-defined]
    return peft_model


def lora_modules(model: PeftModel) -> dict[str, LoraLayer]:
    """The model's LoRA layers, keyed by the base model's module name, in module order."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and _ADAPTER in mod.lora_A:
            out[name.removeprefix(_PEFT_PREFIX)] = mod
    return out


def linear_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The (out, in) weight of a Linear or Conv1D (or of a LoRA layer's base layer), as a view.

    Conv1D stores its weight as (in, out) (``y = x W + b``); this returns its transpose.
    """
    base = layer.get_base_layer() if isinstance(layer, LoraLayer) else layer
    if isinstance(base, Conv1D):
        return base.weight.T  # (out, in)
    if isinstance(base, torch.nn.Linear):
        return base.weight  # (out, in)
    raise TypeError(f"expected a Linear or Conv1D layer, got {type(base).__name__}")


def extract_factors(model: PeftModel) -> Factors:
    """A client's adapter as per-module numpy factor pairs in the Linear orientation.

    Args:
        model: A peft model from :func:`wrap_lora`.

    Returns:
        Module name -> (B (out, r) float64 with the ``alpha / r`` scaling folded in, A (r, in) float64);
        ``B @ A`` is the module's effective (out × in) weight delta.
    """
    out: Factors = {}
    for name, layer in lora_modules(model).items():
        scale = float(layer.scaling[_ADAPTER])
        b = layer.lora_B[_ADAPTER].weight.detach().cpu().double().numpy() * scale  # (out, r)
        a = layer.lora_A[_ADAPTER].weight.detach().cpu().double().numpy()  # (r, in)
        out[name] = (b, a)
    return out


def load_factors(model: PeftModel, factors: Mapping[str, tuple[Any, Any]]) -> None:
    """Loads factor pairs (Linear orientation, scaling folded into B) into the model's adapter, in place.

    A pair of lower rank than the adapter is zero-padded (a projected or refined adapter may have fewer
    columns); modules missing from ``factors`` keep their current adapter.

    Args:
        model: A peft model from :func:`wrap_lora`.
        factors: Module name -> (B (out, r'), A (r', in)), numpy or torch, r' <= the adapter rank.

    Raises:
        ValueError: On an unknown module name, a shape mismatch or a rank above the adapter's.
    """
    layers = lora_modules(model)
    for name, (b, a) in factors.items():
        if name not in layers:
            raise ValueError(f"factors: unknown LoRA module {name!r}; known: {sorted(layers)}")
        layer = layers[name]
        wb, wa = layer.lora_B[_ADAPTER].weight, layer.lora_A[_ADAPTER].weight  # (out, r), (r, in)
        # Copies: arrays from the object store are read-only views, which torch warns about.
        bt = torch.as_tensor(np.array(b), dtype=torch.float64)
        at = torch.as_tensor(np.array(a), dtype=torch.float64)
        r_in = bt.shape[1] if bt.ndim == 2 else -1
        if bt.ndim != 2 or at.ndim != 2 or bt.shape[0] != wb.shape[0] or at.shape != (r_in, wa.shape[1]):
            raise ValueError(
                f"factors[{name!r}]: expected B ({wb.shape[0]}, r') and A (r', {wa.shape[1]}), "
                f"got {tuple(bt.shape)} and {tuple(at.shape)}"
            )
        if r_in > wb.shape[1]:
            raise ValueError(f"factors[{name!r}]: rank {r_in} exceeds the adapter rank {wb.shape[1]}")
        scale = float(layer.scaling[_ADAPTER])
        new_b = torch.zeros(wb.shape, dtype=torch.float64)
        new_a = torch.zeros(wa.shape, dtype=torch.float64)
        new_b[:, :r_in] = bt / scale
        new_a[:r_in] = at
        with torch.no_grad():
            wb.copy_(new_b.to(wb.dtype))
            wa.copy_(new_a.to(wa.dtype))


def reset_lora(model: PeftModel) -> None:
    """Puts the adapter back to its initial state (the same for every client), in place."""
    load_factors(model, model._clair_init_factors)  # type: ignore[attr-defined]


def effective_delta(model: PeftModel, name: str) -> np.ndarray:
    """The (out, in) weight delta that peft itself would merge into module ``name`` (float64).

    Uses peft's ``get_delta_weight`` (which returns Conv1D deltas in Conv1D's (in, out) layout) and puts
    it in the Linear orientation, independently of :func:`extract_factors`.
    """
    layer = lora_modules(model)[name]
    delta = layer.get_delta_weight(_ADAPTER).detach().double()
    if isinstance(layer.get_base_layer(), Conv1D):
        delta = delta.T  # Conv1D layout (in, out) -> (out, in)
    return delta.cpu().numpy()


def fold_corrections(
    model: PeftModel, corrections: Mapping[str, Any], *, copy_model: bool = True
) -> PeftModel:
    """Folds ONE shared dense correction per module into a (shared) base copy.

    Args:
        model: A peft model from :func:`wrap_lora`.
        corrections: Module name -> (out, in) correction R (Linear orientation), numpy or torch.
        copy_model: Deep-copy the model once first (the shared refined base), leaving ``model`` intact.

    Returns:
        The model whose base weights are W_0 + R; its adapters are untouched (load clients' adapters
        into it with :func:`load_factors`).

    Raises:
        ValueError: On an unknown module or a shape mismatch.
    """
    target = copy.deepcopy(model) if copy_model else model
    layers = lora_modules(target)
    for name, corr in corrections.items():
        if name not in layers:
            raise ValueError(f"corrections: unknown LoRA module {name!r}; known: {sorted(layers)}")
        w = linear_weight(layers[name])  # (out, in) view, also for Conv1D
        c = torch.as_tensor(np.array(corr))
        if tuple(c.shape) != tuple(w.shape):
            raise ValueError(f"corrections[{name!r}]: shape {tuple(c.shape)} != weight {tuple(w.shape)}")
        with torch.no_grad():
            w.add_(c.to(dtype=w.dtype, device=w.device))
    return target


#: What :meth:`~clair_ray.workloads.lora.workload.LoRAWorkload.export` writes beside a method's adapters.
CORRECTION_FILE = "correction.safetensors"


def fold_correction_file(base: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Adds an exported shared correction (``correction.safetensors``) to a plain base model, in place.

    The file holds, per adapted module (named as in the base model, e.g. ``transformer.h.0.attn.c_attn``),
    the dense (out, in) update ΔW in the Linear orientation; a GPT-2 Conv1D weight, stored (in, out),
    gets its transpose. Call this before ``PeftModel.from_pretrained(base, adapter_dir)``.

    Args:
        base: The base causal LM the run adapted (the same weights).
        path: The correction file.

    Returns:
        ``base``, its weights W_0 + ΔW.

    Raises:
        ValueError: A module is missing from ``base`` or its shape differs.
    """
    from safetensors.numpy import load_file

    for name, delta in load_file(str(path)).items():
        try:
            module = base.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{path}: module {name!r} is not in the base model") from exc
        w = linear_weight(module)  # (out, in) view
        if tuple(w.shape) != tuple(delta.shape):
            raise ValueError(f"{path}: {name} has shape {tuple(delta.shape)}, the weight {tuple(w.shape)}")
        with torch.no_grad():
            w.add_(torch.as_tensor(delta).to(dtype=w.dtype, device=w.device))
    return base


def save_adapter(model: PeftModel, factors: Mapping[str, tuple[Any, Any]], path: str | Path) -> Path:
    """Writes factor pairs as a peft adapter directory (``adapter_config.json`` and
    ``adapter_model.safetensors``) that ``PeftModel.from_pretrained(base, path)`` loads.

    Args:
        model: A peft model from :func:`wrap_lora` (its adapter is overwritten).
        factors: Module name -> (B (out, r'), A (r', in)), scaling folded into B, r' <= the adapter rank.
        path: The directory.

    Returns:
        ``path``.
    """
    reset_lora(model)
    load_factors(model, factors)
    with warnings.catch_warnings():  # transformers' deprecation notice inside peft's save: not the user's
        warnings.simplefilter("ignore", FutureWarning)
        model.save_pretrained(str(path))
    return Path(path)


def apply_refinement(model: PeftModel, refinements: Mapping[str, Any]) -> tuple[PeftModel, list[Factors]]:
    """Applies per-module ``FactoredRefinement`` results of ``clair_ray.clair`` on factor inputs.

    Builds one shared base copy W_0 + R (R = each module's ``correction()``) and every client's adapter
    ``adapter(k)``. Evaluate honest client k by ``load_factors(shared, adapters[k])`` on the shared copy;
    flagged clients keep their own adapter and get no correction, so they belong on the original model.

    Args:
        model: The peft model the factors came from.
        refinements: Module name -> ``FactoredRefinement`` over the same K clients.

    Returns:
        (the shared corrected model, K per-client factor dicts in the Linear orientation).
    """
    if not refinements:
        raise ValueError("refinements: empty; pass one FactoredRefinement per LoRA module")
    counts = {len(ref) for ref in refinements.values()}
    if len(counts) != 1:
        raise ValueError(f"refinements: modules disagree on the number of clients: {sorted(counts)}")
    corrections = {name: ref.correction().double().cpu().numpy() for name, ref in refinements.items()}
    shared = fold_corrections(model, corrections)
    adapters: list[Factors] = []
    for k in range(counts.pop()):
        adapters.append(
            {
                name: tuple(t.double().cpu().numpy() for t in ref.adapter(k))  # type: ignore[misc]
                for name, ref in refinements.items()
            }
        )
    return shared, adapters


# ---------------------------------------------------------------------------------------------------------
# Training and evaluation on (input_ids, labels) tensors
# ---------------------------------------------------------------------------------------------------------


def _token_losses(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Per-token cross-entropy on labelled positions (labels -100 are ignored), next-token shifted.

    Returns:
        (losses (B, T-1), mask (B, T-1) bool, argmax predictions (B, T-1), shifted labels (B, T-1)).
    """
    batch = trim_batch(batch)  # dynamic padding: the batch's own longest row
    ids, labels = batch["input_ids"], batch["labels"]  # (B, T)
    logits = model(input_ids=ids, attention_mask=batch.get("attention_mask")).logits  # (B, T, V)
    logits, tgt = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    mask = tgt != -100  # (B, T-1)
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), tgt.clamp_min(0).reshape(-1), reduction="none"
    ).view(tgt.shape)  # (B, T-1)
    return losses * mask, mask, logits.argmax(-1), tgt


def lm_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled (target) positions of a batch."""
    losses, mask, _, _ = _token_losses(model, batch)
    return losses.sum() / mask.sum().clamp_min(1)


def _check_data(data: Mapping[str, torch.Tensor]) -> int:
    for key in ("input_ids", "labels"):
        if key not in data:
            raise ValueError(f"data: missing {key!r}; expected input_ids and labels (n, T) tensors")
    if data["input_ids"].shape != data["labels"].shape or data["input_ids"].ndim != 2:
        raise ValueError(
            f"data: input_ids {tuple(data['input_ids'].shape)} and labels {tuple(data['labels'].shape)} "
            "must both be (n, T)"
        )
    return int(data["input_ids"].shape[0])


def _subset(data: Mapping[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in data.items() if isinstance(v, torch.Tensor)}


def train_peft(
    model: PeftModel, data: Mapping[str, torch.Tensor], order: torch.Tensor, lr: float
) -> torch.Tensor:
    """The one training loop (:func:`~clair_ray.workloads.lora.grouped.adamw_steps`) on a peft model, one
    client: step s trains on the sequences ``order[s]``; returns the (steps,) losses before each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step_losses(s: int) -> torch.Tensor:
        return lm_loss(model, _subset(data, order[s])).reshape(1)

    return adamw_steps(params, step_losses, int(order.shape[0]), lr).reshape(-1)


def train_lora(
    model: PeftModel,
    data: Mapping[str, torch.Tensor],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """Trains the model's trainable parameters (the adapter) with AdamW on random mini-batches.

    Deterministic given ``seed`` (and the caller's thread count). Batches are drawn without replacement
    within an epoch, epochs reshuffled, from a generator seeded by ``seed``.

    Args:
        model: A peft model (only parameters with ``requires_grad`` are updated).
        data: ``input_ids`` and ``labels`` (n, T); labels -100 are not trained on.
        steps: Optimiser steps (>= 0).
        lr: AdamW learning rate.
        batch_size: Sequences per step (capped at n).
        seed: Seed of the batch order.

    Returns:
        The mean target loss over the whole local data after training.
    """
    n = _check_data(data)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    train_peft(model, data, batch_order(n, batch_size, steps, seed), lr)
    return evaluate_lm(model, data)["loss"]


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, data: Mapping[str, torch.Tensor], batch_size: int = 64) -> dict:
    """Target loss and exact match of a model on labelled sequences.

    Exact match is under teacher forcing: a sequence counts when the argmax at every labelled position is
    right, which for a copy task equals greedy decoding getting the whole target right.

    Args:
        model: Any causal LM (with or without an adapter).
        data: ``input_ids`` and ``labels`` (n, T).
        batch_size: Evaluation batch size (no effect on the result beyond round-off).

    Returns:
        ``{"loss": mean over labelled tokens, "exact_match": fraction of sequences, "token_accuracy": ...}``.
    """
    n = _check_data(data)
    was_training = model.training
    model.eval()
    tot = torch.zeros(4, dtype=torch.float64)
    for start in range(0, n, batch_size):
        batch = _subset(data, torch.arange(start, min(n, start + batch_size)))
        batch = trim_batch(batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        stats = token_stats(logits[:, :-1], batch["labels"][:, 1:])  # position t predicts token t + 1
        tot += torch.stack([t.double().sum() for t in stats])
    model.train(was_training)
    loss, tokens, correct, exact = (float(v) for v in tot)
    return metrics_from_stats(loss, tokens, correct, exact, n)


def client_model(base: str | os.PathLike | torch.nn.Module, spec: LoraSpec, loader: Any = None) -> PeftModel:
    """A LoRA-wrapped model for a client: reset in place if ``base`` is already one, else a fresh wrap.

    Args:
        base: A saved model directory (loaded with ``loader``, default
            ``AutoModelForCausalLM.from_pretrained``), a plain model (deep-copied, the caller's copy stays
            untouched), or a peft model from :func:`wrap_lora` (reset to the common initialisation, so
            one resident model serves many virtual clients).
        spec: The LoRA knobs (a resident peft model keeps its own; its rank must match ``spec.r``).
        loader: Optional callable path -> model.

    Returns:
        A peft model whose adapter is at the common initialisation.
    """
    if isinstance(base, PeftModel):
        ranks = {layer.r[_ADAPTER] for layer in lora_modules(base).values()}
        if ranks != {spec.r}:
            raise ValueError(
                f"spec.r={spec.r} differs from the resident model's LoRA rank(s) {sorted(ranks)}"
            )
        reset_lora(base)
        return base
    if isinstance(base, torch.nn.Module):
        return wrap_lora(copy.deepcopy(base), spec)
    if loader is None:
        from transformers import AutoModelForCausalLM

        loader = AutoModelForCausalLM.from_pretrained
    return wrap_lora(loader(str(base)), spec)


def stack_pairs(factors: Sequence[Factors], name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """One module's factor pairs over clients, the input ``clair_ray.clair`` takes."""
    return [f[name] for f in factors]


def train_client(
    base: str | os.PathLike | torch.nn.Module,
    spec: LoraSpec,
    data: Mapping[str, torch.Tensor],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    loader: Any = None,
) -> tuple[Factors, float]:
    """One client's one-shot LoRA fine-tuning from the base: what a client computes.

    Args:
        base: See :func:`client_model` (a directory, a plain model, or a resident peft model to reuse).
        spec: The LoRA knobs.
        data: The client's ``input_ids`` and ``labels`` (n, T).
        steps: Optimiser steps.
        lr: AdamW learning rate.
        batch_size: Sequences per step.
        seed: Seed of the batch order (the adapter's initialisation comes from ``spec.init_seed``).
        loader: Optional callable path -> model (default ``AutoModelForCausalLM.from_pretrained``).

    Returns:
        (module name -> (B (out, r), A (r, in)) float64 numpy in the Linear orientation, the final mean
        training loss).
    """
    model = client_model(base, spec, loader)
    loss = train_lora(model, data, steps, lr, batch_size, seed)
    return extract_factors(model), loss


def export_states(
    model: PeftModel, finals: Mapping[str, Any], honest: set[int], r: int, out_dir: Path
) -> list[Path]:
    """Each method's final state as ``out_dir/<method>/`` (``correction.safetensors``, ``global/``,
    ``clients/client<k>/`` for the ``honest`` clients; see ``LoRAWorkload.export``), through ``model``.

    Args:
        model: A peft model of the base (its adapter is reset afterwards).
        finals: Method -> final state (``corr``, ``shared``, ``personal``).
        honest: Clients whose personal adapters are written.
        r: LoRA rank (a one-shot global method's zero adapter).
        out_dir: Where the method directories go.

    Returns:
        The files and directories written.
    """
    from safetensors.numpy import save_file

    written: list[Path] = []
    for method, state in finals.items():
        d = out_dir / method
        d.mkdir(parents=True, exist_ok=True)
        corr = state.get("corr") or {}
        if corr:
            path = d / CORRECTION_FILE
            save_file({n: np.ascontiguousarray(c, dtype=np.float32) for n, c in corr.items()}, str(path))
            written.append(path)
        shared = state.get("shared")
        personal = {k: f for k, f in (state.get("personal") or {}).items() if k in honest}
        if shared is None and not personal:  # a one-shot global method: the correction is the model
            shared = {n: (np.zeros((c.shape[0], r)), np.zeros((r, c.shape[1]))) for n, c in corr.items()}
        if shared is not None:
            written.append(save_adapter(model, shared, d / "global"))
        for k in sorted(personal):
            written.append(save_adapter(model, personal[k], d / "clients" / f"client{k}"))
    reset_lora(model)
    return written
