"""Refinement of honest clients' updates (DESIGN.md section 1, "Outputs").

W_tilde_k = P_U M_k + P_U⊥ mean_{l in C} M_l: the in-subspace part keeps the client's own variation, the
off-subspace part is averaged over the detected-honest clients C (dividing its noise variance by |C|).
With a common offset this equals mean + P_U (M_k - mean), the form found to help on the copy task.

Factor inputs stay factored: honest client k gets the adapter (U (U^T B_k), A_k) on top of ONE shared
correction R = P_U⊥ mean_{l in C} B_l A_l, folded into a single shared base copy by the engine, never
a merged weight copy per client.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def refine_dense(blocks: list[torch.Tensor], basis: torch.Tensor, honest: list[int]) -> list[torch.Tensor]:
    """Refines dense blocks.

    Args:
        blocks: K (p, q) blocks in the oriented (column) frame, any dtype; flagged ones may be non-finite.
        basis: (p, r) orthonormal basis.
        honest: Detected-honest client indices (all finite).

    Returns:
        K (p, q) blocks: refined for honest clients, the input for the others; input dtype.
    """
    u = basis.double()
    mean = torch.stack([blocks[k].double() for k in honest]).mean(dim=0)  # (p, q)
    shared_off = mean - u @ (u.T @ mean)  # (p, q): P_U⊥ mean
    honest_set = set(honest)
    out = []
    for k, blk in enumerate(blocks):
        if k in honest_set:
            x = blk.double()
            out.append((u @ (u.T @ x) + shared_off).to(blk.dtype))
        else:
            out.append(blk)
    return out


@dataclass
class FactoredRefinement:
    """Refined updates of factor inputs, kept factored.

    In the "column" frame the refined update of honest client k is U (U^T B_k) A_k + R with the shared
    correction R = P_U⊥ mean_{l in C} B_l A_l; flagged clients keep B_k A_k and get no correction. With
    ``side="row"`` the roles of B and A^T swap: B_k (A_k U) U^T + R, R = mean_l B_l A_l P_U⊥.

    Attributes:
        basis: (p, r) orthonormal basis of the shared side.
        factors: The K input pairs (B_k, A_k), original orientation.
        honest: Detected-honest client indices.
        side: "column" or "row".
    """

    basis: torch.Tensor
    factors: list[tuple[torch.Tensor, torch.Tensor]]
    honest: list[int]
    side: str = "column"

    def __len__(self) -> int:
        return len(self.factors)

    def adapter(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client k's adapter pair (B, A): projected for honest clients, the input for flagged ones."""
        b, a = self.factors[k]
        if k not in set(self.honest):
            return b, a
        u = self.basis.to(b.dtype)
        if self.side == "column":
            return u @ (u.T @ b), a  # (p, r'), (r', q)
        return b, (a @ u) @ u.T  # (p, r'), (r', q)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter(k)

    def correction_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared correction as factors (R_B, R_A) with R = R_B @ R_A; rank <= sum of honest r'."""
        u = self.basis
        bs = torch.cat([self.factors[k][0] for k in self.honest], dim=1)  # (p, sum r')
        as_ = torch.cat([self.factors[k][1] for k in self.honest], dim=0) / len(self.honest)  # (sum r', q)
        if self.side == "column":
            u = u.to(bs.dtype)
            return bs - u @ (u.T @ bs), as_
        u = u.to(as_.dtype)
        return bs, as_ - (as_ @ u) @ u.T

    def correction(self) -> torch.Tensor:
        """The shared correction R as one dense (p, q) matrix (fold it into the shared base copy)."""
        r_b, r_a = self.correction_factors()
        return r_b @ r_a

    def dense(self, k: int, correction: torch.Tensor | None = None) -> torch.Tensor:
        """Client k's whole refined update as a dense matrix (small problems and tests only)."""
        b, a = self.adapter(k)
        out = b @ a
        if k in set(self.honest):
            out = out + (self.correction() if correction is None else correction)
        return out
