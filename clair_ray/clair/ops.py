"""Linear-algebra building blocks shared by the CLAIR solvers.

Blocks are kept as one (K, p, w) tensor: client k's block is ``X[k]`` (p rows on the shared side, w
columns). The stacked matrix of the formulation, [X_1, ..., X_K] (p x Kw), is ``stack(X)``; every nuclear-norm
or singular-value operation works on that view, every group operation on the blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def stack(blocks: torch.Tensor) -> torch.Tensor:
    """Returns the p x (K w) matrix [X_1, ..., X_K] of a (K, p, w) block tensor."""
    k, p, w = blocks.shape
    return blocks.permute(1, 0, 2).reshape(p, k * w)  # (p, K w)


def block_norms(blocks: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each block: (K, p, w) -> (K,)."""
    return torch.linalg.vector_norm(blocks, dim=(1, 2))


def svt(matrix: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Singular-value thresholding, the proximal operator of ``threshold * nuclear norm``.

    Args:
        matrix: (p, n) matrix.
        threshold: Amount subtracted from every singular value (values below it become zero).

    Returns:
        The thresholded matrix (p, n), its rank, and the singular values before thresholding.
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # (p, m), (m,), (m, n)
    shrunk = (s - threshold).clamp_min(0.0)
    rank = int((shrunk > 0).sum())
    out = (u[:, :rank] * shrunk[:rank]) @ vh[:rank]
    return out, rank, s


def gst(blocks: torch.Tensor, thresholds: torch.Tensor | float, block_dim: int = 0) -> torch.Tensor:
    """Group soft-thresholding of every block: GST(X, t) = max(0, 1 - t / ||X||_F) X.

    Args:
        blocks: Blocks indexed by ``block_dim``: (K, p, w) by default, or (p, K, w) with ``block_dim=1``.
        thresholds: One threshold, or (K,) thresholds (one per block).
        block_dim: The dimension that indexes the blocks.

    Returns:
        The thresholded blocks, same shape.
    """
    other = tuple(d for d in range(blocks.ndim) if d != block_dim)
    norms = torch.linalg.vector_norm(blocks, dim=other)  # (K,)
    t = torch.as_tensor(thresholds, dtype=blocks.dtype, device=blocks.device)
    # Blocks with zero norm get factor 0; the clamp avoids 0/0.
    factor = (1.0 - t / norms.clamp_min(torch.finfo(blocks.dtype).tiny)).clamp_min(0.0)  # (K,)
    shape = [1] * blocks.ndim
    shape[block_dim] = -1
    return blocks * factor.reshape(shape)


def top_left_singular_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Exact top-``rank`` left singular vectors of a (p, n) matrix: (p, rank) orthonormal."""
    # For wide matrices the p x p Gram's eigenvectors are cheaper than an SVD of the whole matrix, but
    # they square the condition number; the exact path works in float64 where that is harmless only for
    # well-separated spectra, so keep the SVD.
    u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank]


def orthonormalize(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of a (p, m) matrix (thin QR)."""
    q, _ = torch.linalg.qr(matrix)
    return q


def project_out(basis: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(I - U U^T) X for every block: basis (p, r), blocks (K, p, w) -> (K, p, w)."""
    coeff = torch.einsum("pr,kpw->krw", basis, blocks)  # (K, r, w)
    return blocks - torch.einsum("pr,krw->kpw", basis, coeff)


def project_onto(basis: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """U U^T X for every block: basis (p, r), blocks (K, p, w) -> (K, p, w)."""
    coeff = torch.einsum("pr,kpw->krw", basis, blocks)  # (K, r, w)
    return torch.einsum("pr,krw->kpw", basis, coeff)


def compact_dense(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates each wide block onto its row space: M_k = C_k Q_k^T with C_k (p, p).

    Nuclear norm, block norms and the CLAIR problems are invariant under a right rotation of each
    block, so the solvers may work on the narrower C_k.

    Args:
        blocks: (K, p, q) blocks with q > p.

    Returns:
        C (K, p, p) and Q (K, q, p) with orthonormal columns, such that blocks[k] = C[k] @ Q[k].T.
    """
    q_mat, r_mat = torch.linalg.qr(blocks.transpose(1, 2))  # (K, q, p), (K, p, p): M_k^T = Q R
    return r_mat.transpose(1, 2), q_mat


def compact_factors(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Compact p x r' form of factor pairs: C_k C_k^T = B_k A_k A_k^T B_k^T.

    C_k = B_k E_k sqrt(D_k) with A_k A_k^T = E_k D_k E_k^T, a right rotation of B_k A_k restricted to its
    row space, so every CLAIR quantity computed from C_k equals the one from the dense product. The Gram
    route squares A_k's condition number; for a nearly rank-deficient A_k (condition number above 1e3,
    e.g. a pair widened by a centre's factors) the square root of its rounding-level eigenvalues would add
    junk columns of relative size sqrt(eps), which an exact P0 must then fit (measured: ADMM no longer
    converged in 5000 iterations). Those clients go through a QR of A_k^T instead: A_k^T = Q_k R_k,
    C_k = B_k R_k^T, exact to rounding.

    Args:
        b: (K, p, r') left factors.
        a: (K, r', q) right factors.

    Returns:
        (K, p, r') compact blocks, in b's dtype (zero-padded on the right when r' > q).
    """
    gram = torch.bmm(a, a.transpose(1, 2)).double()  # (K, r', r')
    evals, evecs = torch.linalg.eigh(gram)  # (K, r'), (K, r', r'), ascending
    root = evecs * evals.clamp_min(0.0).sqrt()[:, None, :]  # (K, r', r')
    out = torch.bmm(b, root.to(b.dtype))  # (K, p, r')
    ill = (evals[:, 0] <= 1e-6 * evals[:, -1]).nonzero().flatten()
    if len(ill):
        _, r_mat = torch.linalg.qr(a[ill].transpose(1, 2).double())  # (n, min(q, r'), r')
        exact = torch.bmm(b[ill].double(), r_mat.transpose(1, 2))  # (n, p, min(q, r'))
        out[ill] = 0.0
        out[ill, :, : exact.shape[2]] = exact.to(b.dtype)
    return out


def compact_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compact_factors` of K factor pairs of possibly different ranks, and which are finite.

    Built pair by pair, never stacking the (K, p, r') and (K, r', q) factors, straight into (K, r', p)
    memory: the blocks come back as its (K, p, r') transpose, so :func:`stack` of them is a free view
    (column-major p x K r'), the per-block norms read contiguous memory, and a non-finite pair shows as a
    non-finite Gram or block (NaN and inf propagate through both products; a finite pair whose float
    Gram overflows is checked exactly and compacted in float64). Zero columns pad ranks below r' = the
    largest rank (they change no product). Non-finite clients get a zero block.

    Args:
        pairs: K pairs (B_k (p, r_k), A_k (r_k, q)) of one dtype.

    Returns:
        Blocks (K, p, r') (a transposed view of contiguous (K, r', p) memory) and finite (K,) bool.
    """
    k, p = len(pairs), pairs[0][0].shape[0]
    width, dtype = max(b.shape[1] for b, _ in pairs), pairs[0][0].dtype
    gram = torch.zeros(k, width, width, dtype=torch.float64)
    for i, (_, a) in enumerate(pairs):
        gram[i, : a.shape[0], : a.shape[0]] = a @ a.T  # (r_k, r_k) in the input's dtype, as before
    ok = torch.isfinite(gram).flatten(1).all(dim=1)  # (K,)
    safe = torch.where(ok[:, None, None], gram, torch.eye(width, dtype=torch.float64))
    evals, evecs = torch.linalg.eigh(safe)  # (K, r'), (K, r', r'), ascending
    root_t = (evecs * evals.clamp_min(0.0).sqrt()[:, None, :]).transpose(1, 2).to(dtype)  # (K, r', r')
    ill = ok & (evals[:, 0] <= 1e-6 * evals[:, -1])  # see compact_factors: these go through a QR
    out = torch.empty(k, width, p, dtype=dtype)  # (K, r', p): every row is written below
    for i, ((b, _), fine) in enumerate(zip(pairs, (ok & ~ill).tolist(), strict=True)):
        if fine:
            torch.matmul(root_t[i, :, : b.shape[1]], b.T, out=out[i])  # (r', p) = (B_k root_k)^T
    ok &= torch.isfinite(torch.linalg.vector_norm(out.flatten(1), dim=1))  # a non-finite B_k
    for i in (ill | ~ok).nonzero().flatten().tolist():
        b, a = pairs[i]
        if bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all()):
            _, r_mat = torch.linalg.qr(a.T.double())  # (min(q, r_k), r_k): A_k^T = Q R, C_k = B_k R^T
            out[i] = 0.0
            out[i, : r_mat.shape[0]] = (r_mat @ b.T.double()).to(dtype)
            ok[i] = bool(torch.isfinite(out[i]).all())  # a finite pair whose block overflows the dtype: not
            if not ok[i]:
                out[i] = 0.0
        else:
            out[i], ok[i] = 0.0, False
    return out.transpose(1, 2), ok


@contextlib.contextmanager
def limit_threads(active: bool, num_threads: int = 1) -> Iterator[None]:
    """Runs the body with ``num_threads`` intra-op threads when ``active``, restoring the setting after.

    The exact solver makes thousands of calls on matrices of a few thousand entries; there thread hand-off
    costs more than it saves, and on a busy 2-core machine it made a 0.8 s call take 30-50 s.
    """
    if not active:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
