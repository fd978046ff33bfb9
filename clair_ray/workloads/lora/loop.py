"""The one local training loop and the one set of held-out metrics of every LoRA path.

The grouped path (G clients per forward/backward, :mod:`clair_ray.workloads.lora.grouped`) and the
plain-peft reference path (one client, :mod:`clair_ray.workloads.lora.adapters`) both train with
:func:`adamw_steps` on batches from :func:`batch_order`, and both evaluate with :func:`token_stats`: the
reference path differs only in how the forward is computed, which is what the tests compare.
:func:`step_batches` lays out G clients' step batches for the grouped path and :func:`grouped_evaluate`
evaluates G loaded adapters at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # grouped.py imports this module
    from clair_ray.workloads.lora.grouped import GroupedLoRAModel

__all__ = [
    "real_width",
    "trim_batch",
    "adamw_steps",
    "batch_order",
    "grouped_evaluate",
    "metrics_from_stats",
    "step_batches",
    "token_stats",
]


def real_width(mask: torch.Tensor | None) -> int | None:
    """Tokens up to the last real one of any row of a right-padded batch (None: no mask, keep all).

    Columns after it are padding in every row: no real position attends to them (causal attention,
    right padding) and none is labelled, so cutting them changes no real output (dynamic padding).
    """
    if mask is None:
        return None
    cols = mask.reshape(-1, mask.shape[-1]).any(dim=0).nonzero()
    return int(cols[-1]) + 1 if len(cols) else 1


def trim_batch(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A right-padded batch (``input_ids``, ``labels``, ``attention_mask`` (..., T)) cut to its
    :func:`real_width`."""
    w = real_width(batch.get("attention_mask"))
    return {k: v[..., :w] if w is not None else v for k, v in batch.items()}


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


def grouped_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's mean next-token cross-entropy over its labelled positions (labels -100 ignored).

    The same loss as transformers' ``ForCausalLMLoss`` (float32 logits, shift by one, mean over labelled
    tokens) and :func:`clair_ray.workloads.lora.lm_loss`, but per group.

    Args:
        logits: (G*b, T, V).
        labels: (G*b, T), -100 where not trained on.
        n_groups: G.

    Returns:
        (per-group mean losses (G,), per-group labelled-token counts (G,)).
    """
    logits, tgt = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    mask = tgt != -100  # (G*b, T-1)
    tok = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), tgt.clamp_min(0).reshape(-1), reduction="none"
    )  # (G*b*(T-1),)
    tok = (tok.view(tgt.shape) * mask).reshape(n_groups, -1)  # (G, b*(T-1))
    count = mask.reshape(n_groups, -1).sum(dim=1)  # (G,)
    return tok.sum(dim=1) / count.clamp_min(1), count


def step_batches(
    data: Sequence[Mapping[str, torch.Tensor]], idx: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """(S, G, b, T) input ids, labels and attention mask of every step of G clients, and per client the
    (S, b) rows of its data that they are.

    Clients with fewer than ``batch`` sequences draw smaller batches; their rows are padded to the
    group's b with copies whose labels are all -100, which adds no labelled token and so leaves the
    client's mean loss (and gradient) unchanged.

    Args:
        data: G clients' ``input_ids``, ``labels`` (n_g, T) and optional ``attention_mask``.
        idx: G (S, b_g) row indices (:func:`batch_order`).
    """
    b = max(i.shape[1] for i in idx)
    has_mask = "attention_mask" in data[0]
    ids, labels, masks, rows = [], [], [], []
    for d, i in zip(data, idx, strict=True):  # i: (S, b_g)
        pad = b - i.shape[1]
        real = torch.ones_like(i, dtype=torch.bool)
        if pad:  # copies of each step's first row, unlabelled
            i = torch.cat([i, i[:, :1].expand(-1, pad)], dim=1)
            real = torch.cat([real, torch.zeros_like(real[:, :1]).expand(-1, pad)], dim=1)
        ids.append(d["input_ids"][i])  # (S, b, T)
        labels.append(d["labels"][i].masked_fill(~real[..., None], -100))
        rows.append(i)
        if has_mask:
            masks.append(d["attention_mask"][i])
    mask = torch.stack(masks, dim=1) if has_mask else None
    return torch.stack(ids, dim=1), torch.stack(labels, dim=1), mask, rows  # (S, G, b, T) each


@torch.no_grad()
def grouped_evaluate(
    gm: GroupedLoRAModel,
    data: Sequence[Mapping[str, torch.Tensor]],
    rows: int = 64,
    hidden: Sequence[torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """:func:`clair_ray.workloads.lora.evaluate_lm`'s loss and exact match for every loaded client at once.

    Client g (its adapter loaded as group g) is evaluated on ``data[g]``. Clients with fewer sequences
    are padded with rows whose labels are all -100, which add no token to the loss and no sequence to
    exact match (still divided by the client's own sequence count).

    Args:
        gm: The model with G clients loaded (:meth:`GroupedLoRAModel.load_clients`).
        data: G dicts of ``input_ids``, ``labels`` (n_g, T) and optional ``attention_mask``; one T.
        rows: Sequences per client per forward (memory: G · rows · T · V logits without ``loss_chunk``).
        hidden: Optional G tensors (n_g, T, H): each client's frozen-prefix states of ``data[g]``
            (:meth:`GroupedLoRAModel.prefix_hidden`), so only the adapted layers run.

    Returns:
        Per client ``{"loss": mean over labelled tokens, "exact_match": fraction of sequences,
        "token_accuracy": fraction of labelled tokens predicted right}``.
    """
    g = gm.n_clients
    if len(data) != g or (hidden is not None and len(hidden) != g):
        raise ValueError(f"data: {len(data)} clients for {g} loaded adapters")
    was_training = gm.model.training
    gm.model.eval()
    device = next(gm.model.parameters()).device
    n_max = max(len(d["input_ids"]) for d in data)
    tot = torch.zeros(4, g, dtype=torch.float64)  # loss, tokens, right, exact
    keys = ["input_ids", "labels", *(["attention_mask"] if "attention_mask" in data[0] else [])]
    for s0 in range(0, n_max, rows):
        width = min(rows, n_max - s0)
        cols: dict[str, list[torch.Tensor]] = {k: [] for k in [*keys, "hidden"]}
        for j, d in enumerate(data):
            parts = {k: d[k][s0 : s0 + rows] for k in keys}
            if hidden is not None:
                parts["hidden"] = hidden[j][s0 : s0 + rows]
            pad = width - parts["input_ids"].shape[0]
            for k, v in parts.items():
                if pad:  # copies of the client's first sequence, with no label
                    first = (d[k] if k != "hidden" else hidden[j])[:1]  # type: ignore[index]
                    extra = torch.full_like(first, -100) if k == "labels" else first
                    v = torch.cat([v, extra.expand(pad, *v.shape[1:])])
                cols[k].append(v)
        t = {k: torch.stack(v).to(device) for k, v in cols.items() if v}  # (G, width, T[, H])
        h = t.get("hidden")
        stats = gm.sequence_stats(
            t["input_ids"], t["labels"], t.get("attention_mask"), None if h is None else h.flatten(0, 1)
        )
        tot += torch.stack([x.double().sum(dim=1).cpu() for x in stats])
    gm.model.train(was_training)
    loss, tok, correct, exact = tot
    return [
        metrics_from_stats(
            float(loss[j]), float(tok[j]), float(correct[j]), float(exact[j]), len(data[j]["input_ids"])
        )
        for j in range(g)
    ]
