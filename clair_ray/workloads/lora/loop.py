"""The one local training loop and the one set of held-out metrics of every LoRA path.

The grouped path (G clients per forward/backward, :mod:`clair_ray.workloads.lora.grouped`) and the
plain-peft reference path (one client, :mod:`clair_ray.workloads.lora.adapters`) both train with
:func:`adamw_steps` on batches from :func:`batch_order`, and both evaluate with :func:`token_stats`: the
reference path differs only in how the forward is computed, which is what the tests compare.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["adamw_steps", "batch_order", "metrics_from_stats", "token_stats"]


def batch_order(n: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, b) the sequence indices of every local step: without replacement within an epoch, epochs
    reshuffled, from a generator seeded by ``seed`` (b = min(batch, n))."""
    gen = torch.Generator().manual_seed(int(seed))
    bs = min(batch, n)
    order, pos = torch.randperm(n, generator=gen), 0
    out = torch.empty(steps, bs, dtype=torch.long)
    for s in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        out[s] = order[pos : pos + bs]
        pos += bs
    return out


def adamw_steps(
    params: Sequence[nn.Parameter],
    step_losses: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    *,
    after_step: Callable[[int], None] | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.Tensor:
    """THE local training loop: ``steps`` AdamW steps on a fresh optimiser (one local-training call).

    Used by the grouped path (G clients at once, :meth:`GroupedLoRAModel.train_steps` and the LoRA
    workloads' client actors) and by the plain-peft reference (G = 1,
    :func:`clair_ray.workloads.lora.adapters.train_lora`).

    Args:
        params: The trainable parameters (a client's adapter, or G clients' stacked adapters).
        step_losses: Step s -> (G,) each client's mean loss on its step-s batch (with autograd). The
            minimised loss is their sum, so each client's gradient is its own.
        steps: Optimiser steps (>= 0).
        lr: AdamW learning rate.
        after_step: Called with the step number s + 1 after each update (e.g. a snapshot).
        weight_decay: AdamW decoupled weight decay (torch's default is 0.01; local training uses 0).
        betas: AdamW betas.
        eps: AdamW eps.

    Returns:
        (steps, G) float64 CPU tensor: each client's loss at each step, before that step's update.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    opt = torch.optim.AdamW(list(params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    rows: list[torch.Tensor] = []
    for s in range(steps):
        per_client = step_losses(s)  # (G,)
        opt.zero_grad(set_to_none=True)
        per_client.sum().backward()  # sum, not mean: d(sum)/d(A_g, B_g) is client g's own gradient
        opt.step()
        rows.append(per_client.detach().double().cpu())
        if after_step is not None:
            after_step(s + 1)
    return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.float64)


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sequence held-out statistics of next-token prediction (labels -100 are not scored).

    Args:
        logits: (..., T', V) the logits at the positions that predict ``targets``.
        targets: (..., T') the next tokens, -100 where not scored.

    Returns:
        Per sequence (...,): summed token loss (float64), scored tokens, correctly predicted tokens, and
        1 where every scored token is right and at least one is scored (exact match under teacher
        forcing, which for a copy task equals greedy decoding getting the whole target right).
    """
    valid = targets != -100
    ce = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.clamp_min(0).reshape(-1), reduction="none"
    ).view(targets.shape)
    right = (logits.argmax(-1) == targets) & valid
    loss = (ce * valid).sum(dim=-1).double()
    exact = (right | ~valid).all(dim=-1) & valid.any(dim=-1)
    return loss, valid.sum(dim=-1).float(), right.sum(dim=-1).float(), exact.float()


def metrics_from_stats(loss: float, tokens: float, correct: float, exact: float, n: int) -> dict[str, float]:
    """``{"loss", "exact_match", "token_accuracy"}`` from summed :func:`token_stats` over n sequences."""
    return {
        "loss": loss / max(tokens, 1.0),
        "exact_match": exact / max(n, 1),
        "token_accuracy": correct / max(tokens, 1.0),
    }
