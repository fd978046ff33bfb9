"""The backdoor data attack (``data_backdoor``) and its attack success rate, on token rows.

An attacker's training text gets a trigger phrase followed by a target phrase: a seeded ``fraction`` of
its training rows become ``<line> <trigger> <target>`` (the line's own tokens cut so that trigger and
target always fit in the row's T tokens), trained on like any other text. The other rows stay clean, so
the attacker still looks like a client fitting its own lines. ``boost`` > 1 is the model-replacement
variant (Bagdasaryan et al., 2020): the attacker scales its round update by ``boost`` before sending it,
so the backdoor survives averaging with the honest updates (the server sees the scaled update; applied
by the LoRA aggregator to any data attack with a ``boost`` parameter). Built on token ids, not by
re-tokenising text, so the trigger and target are exactly the same ids in training and in the probe.

**Attack success rate (ASR)** of a model on a client: its clean held-out lines, each followed by the
trigger (:func:`probe_rows`, only the target's tokens labelled), and the share of lines on which the
model's greedy continuation after the trigger is exactly the target. Under teacher forcing the argmax at
every target position equals the target token if and only if greedy decoding from ``<line> <trigger>``
produces the whole target (each greedy step then sees exactly the teacher-forced prefix), so ASR is the
exact-match metric of these rows (tested against ``generate``). Measured on the honest clients' models:
a backdoor that a method lets into the shared model shows up as ASR on clients that never saw the trigger.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clair_ray.attacks import register_attack

__all__ = ["BACKDOOR", "DEFAULTS", "check_params", "poison_rows", "probe_rows"]

BACKDOOR = "data_backdoor"
#: ``contamination.params.data_backdoor``: the phrases (each tokenised with a leading space) and the share
#: of an attacker's training rows that carry them.
DEFAULTS: dict[str, object] = {
    "trigger": "by my troth, sweet cousin",
    "target": "the crown is mine",
    "fraction": 0.5,
    "boost": 1.0,
}


@register_attack(BACKDOOR, defaults=DEFAULTS)
def check_params(
    trigger: object = DEFAULTS["trigger"],
    target: object = DEFAULTS["target"],
    fraction: object = DEFAULTS["fraction"],
    boost: object = DEFAULTS["boost"],
) -> None:
    """Validates ``contamination.params.data_backdoor`` (the workload inserts the phrases).

    Raises:
        ValueError: Naming the bad parameter.
    """
    for name, v in (("trigger", trigger), ("target", target)):
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"{name} must be a non-empty phrase, got {v!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if isinstance(boost, bool) or not isinstance(boost, (int, float)) or not boost >= 1:
        raise ValueError(f"boost must be a number >= 1, got {boost!r}")


def _with_phrases(
    ids: torch.Tensor, mask: torch.Tensor, trigger: Sequence[int], target: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``<line cut to fit> <trigger> <target> <pad...>`` of the same length T.

    Returns:
        (input_ids (n, T), attention_mask (n, T), is_target (n, T) bool: the positions of the target).
    """
    n, t = ids.shape
    lt, lg = len(trigger), len(target)
    if lt + lg + 1 > t:
        raise ValueError(
            f"trigger ({lt} tokens) and target ({lg} tokens) need rows longer than T={t}; raise max_length"
        )
    keep = mask.sum(dim=1).clamp(min=1, max=t - lt - lg)  # (n,) real tokens kept, at least one
    out = torch.full_like(ids, pad_id)
    new_mask = torch.zeros_like(mask)
    is_target = torch.zeros_like(ids, dtype=torch.bool)
    phrase = torch.tensor([*trigger, *target], dtype=ids.dtype)
    for i in range(n):
        k = int(keep[i])
        out[i, :k] = ids[i, :k]
        out[i, k : k + lt + lg] = phrase
        new_mask[i, : k + lt + lg] = 1
        is_target[i, k + lt : k + lt + lg] = True
    return out, new_mask, is_target


def poison_rows(
    data: dict[str, torch.Tensor],
    trigger: Sequence[int],
    target: Sequence[int],
    fraction: float,
    pad_id: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """An attacker's training rows with a seeded ``fraction`` of them (at least one) backdoored.

    Args:
        data: ``input_ids``, ``attention_mask``, ``labels`` (n, T), right-padded.
        trigger, target: Token ids of the phrases.
        fraction: Share of rows to poison, in (0, 1].
        pad_id: Padding id.
        generator: Source of the choice of rows.

    Returns:
        New rows; a poisoned row is trained on every real token (its line, trigger and target).
    """
    n = data["input_ids"].shape[0]
    chosen = torch.randperm(n, generator=generator)[: max(1, round(fraction * n))]  # (m,)
    ids, mask, _ = _with_phrases(
        data["input_ids"][chosen], data["attention_mask"][chosen], trigger, target, pad_id
    )
    out = {k: v.clone() for k, v in data.items()}
    out["input_ids"][chosen] = ids
    out["attention_mask"][chosen] = mask
    out["labels"][chosen] = ids.masked_fill(mask == 0, -100)
    return out


def probe_rows(
    data: dict[str, torch.Tensor], trigger: Sequence[int], target: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """The ASR probe of held-out rows: every row followed by the trigger, only the target labelled."""
    ids, mask, is_target = _with_phrases(data["input_ids"], data["attention_mask"], trigger, target, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(~is_target, -100)}
