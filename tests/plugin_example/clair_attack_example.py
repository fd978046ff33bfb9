"""An example clair_ray plugin: one update attack, defined outside the package (``plugins:`` loads it).

plugins: [clair_attack_example]
contamination:
  fraction: 0.2
  mix: {shrunk_sign_flip: 1.0}
  params: {shrunk_sign_flip: {scale: 0.5}}
"""

from __future__ import annotations

import torch

from clair_ray.attacks import AttackContext, register_attack


@register_attack("shrunk_sign_flip", defaults={"scale": 0.5}, in_subspace=True)
def shrunk_sign_flip(
    own: torch.Tensor,
    honest: torch.Tensor | None,
    generator: torch.Generator,
    ctx: AttackContext,
    scale: float,
) -> torch.Tensor:
    """Sends ``-scale`` times its own (p, q) update: it stays in the honest subspace."""
    del honest, generator, ctx
    return -scale * own
