"""Refinement of honest clients' updates.

With P the projector onto the estimated column subspace U (p side) and Q the one onto the row subspace V
(q side; the identity when only one side is projected), and m the mean over the detected-honest clients C:

    W_tilde_k = m + P (M_k - m) Q

Column side only (Q = I) this is P_U M_k + P_U⊥ m: the in-subspace part keeps the client's own variation,
the off-subspace part is averaged over C (dividing its noise variance by |C|). Projecting both sides at a
small rank helped on the copy task, where a rank-4 adapter's noise lies in the same directions as its
signal.

Factor inputs stay factored: honest client k gets the adapter (P B_k, A_k Q) on top of ONE shared
correction R = m - P m Q, folded into a single shared base copy by the engine, never a merged weight
copy per client.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _project_left(basis: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if basis is None:
        return x
    u = basis.to(x.dtype)
    return u @ (u.T @ x)


def _project_right(x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    if basis is None:
        return x
    v = basis.to(x.dtype)
    return (x @ v) @ v.T


def refine_dense(
    blocks: list[torch.Tensor],
    col_basis: torch.Tensor | None,
    row_basis: torch.Tensor | None,
    honest: list[int],
) -> list[torch.Tensor]:
    """Refines dense blocks: m + P (M_k - m) Q for honest clients, the input for the others.

    Args:
        blocks: K (p, q) blocks, any dtype; flagged ones may be non-finite.
        col_basis: (p, r) orthonormal basis of the column subspace, or None (no column projection).
        row_basis: (q, r) orthonormal basis of the row subspace, or None (no row projection).
        honest: Detected-honest client indices (all finite).

    Returns:
        K (p, q) blocks in the input dtype.
    """
    mean = torch.stack([blocks[k].double() for k in honest]).mean(dim=0)  # (p, q)
    honest_set = set(honest)
    out = []
    for k, blk in enumerate(blocks):
        if k in honest_set:
            dev = _project_right(_project_left(col_basis, blk.double() - mean), row_basis)
            out.append((mean + dev).to(blk.dtype))
        else:
            out.append(blk)
    return out


@dataclass
class FactoredRefinement:
    """Refined updates of factor inputs, kept factored.

    Honest client k's refined update is (P B_k)(A_k Q) + R with the shared correction R = m - P m Q,
    m = mean_{l in C} B_l A_l; flagged clients keep B_k A_k and get no correction. P projects onto
    ``col_basis`` and Q onto ``row_basis``; a missing basis means no projection on that side.

    Attributes:
        col_basis: (p, r) orthonormal basis of the column subspace, or None.
        row_basis: (q, r) orthonormal basis of the row subspace, or None.
        factors: The K input pairs (B_k, A_k).
        honest: Detected-honest client indices.
    """

    col_basis: torch.Tensor | None
    row_basis: torch.Tensor | None
    factors: list[tuple[torch.Tensor, torch.Tensor]]
    honest: list[int]

    def __len__(self) -> int:
        return len(self.factors)

    def _honest_set(self) -> frozenset[int]:
        # Cached: adapter(k) is called once per client, and a set per call is quadratic in K.
        cached = self.__dict__.get("_honest_cache")
        if cached is None or cached[0] is not self.honest:
            cached = (self.honest, frozenset(self.honest))
            self.__dict__["_honest_cache"] = cached
        return cached[1]

    def adapter(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client k's adapter pair (B, A): projected for honest clients, the input for flagged ones."""
        b, a = self.factors[k]
        if k not in self._honest_set():
            return b, a
        return _project_left(self.col_basis, b), _project_right(a, self.row_basis)  # (p, r'), (r', q)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter(k)

    def correction_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared correction as factors (R_B, R_A) with R = R_B @ R_A."""
        bs = torch.cat([self.factors[k][0] for k in self.honest], dim=1)  # (p, N), N = sum of honest r'
        as_ = torch.cat([self.factors[k][1] for k in self.honest], dim=0) / len(self.honest)  # (N, q)
        if self.row_basis is None:  # R = P⊥ m: rank <= N
            return bs - _project_left(self.col_basis, bs), as_
        if self.col_basis is None:  # R = m Q⊥
            return bs, as_ - _project_right(as_, self.row_basis)
        # R = m - P m Q = [B, -P B] [A; A Q]: rank <= 2N.
        return torch.cat([bs, -_project_left(self.col_basis, bs)], dim=1), torch.cat(
            [as_, _project_right(as_, self.row_basis)], dim=0
        )

    def correction(self) -> torch.Tensor:
        """The shared correction R as one dense (p, q) matrix (fold it into the shared base copy)."""
        r_b, r_a = self.correction_factors()
        return r_b @ r_a

    def dense(self, k: int, correction: torch.Tensor | None = None) -> torch.Tensor:
        """Client k's whole refined update as a dense matrix (small problems and tests only)."""
        b, a = self.adapter(k)
        out = b @ a
        if k in self._honest_set():
            out = out + (self.correction() if correction is None else correction)
        return out
