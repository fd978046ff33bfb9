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

**How much of the deviation to keep** (``refine``). U and V are the top singular vectors of the centred
detected-honest deviations D_k = M_k - m, on each projected side. ``refine=j`` keeps j of them; 0 gives
the detected-honest mean, the full rank of the deviations gives every client its own update back.
``refine="auto"`` chooses j per module and side by parallel analysis (Horn 1965) with a null that keeps
each client's own spectrum: structure that honest clients *share* (their common subspace, a cluster
offset) adds up across clients in the stacked deviations [D_1 ... D_H], while each client's estimation
noise points in its own directions. The null rotates every client's block by an independent Haar-random
rotation, which keeps each block's singular values (its noise level, its rank, however anisotropic) and
destroys only the alignment across clients; direction j is kept while the j-th singular value of the
stack exceeds the largest j-th singular value over ``NULL_DRAWS`` rotated stacks. No label, test datum or
true honest set enters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.functional import pad as nn_pad

#: Rotated stacks drawn for the parallel-analysis null. Its threshold is their maximum (a ~95th
#: percentile); on pure Gaussian noise (H = 20, 40 x 10 blocks) 11 of 100 problems kept a direction.
NULL_DRAWS = 20
#: Stacks with more entries than this get their top singular values from a randomized SVD.
EXACT_SVD_MAX_ENTRIES = 4_000_000
#: The randomized path looks at most this many directions.
MAX_AUTO_RANK = 64
#: Factor inputs: the honest mean enters the deviations exactly up to this many stacked factor columns.
MAX_EXACT_MEAN_COLUMNS = 512
#: The robust honest mean leaves out clients farther than this many median distances from the clients'
#: geometric median (``mean_clip``).
MEAN_CLIP = 3.0
#: Above this many detected-honest clients the weights fall back to the plain mean (the Gram of factor
#: pairs costs O(H^2 r^2 (p + q))).
MAX_ROBUST_MEAN_CLIENTS = 512
#: Singular values below this fraction of the largest are rounding, never kept.
RELATIVE_FLOOR = 1e-9


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


def check_refine(refine: Any) -> None:
    """Raises a ValueError naming ``refine`` unless it is ``"auto"`` or a non-negative integer."""
    if refine == "auto":
        return
    if refine == "heldout":
        raise ValueError(
            "refine: 'heldout' chooses by the clients' held-back loss, which needs their data: a LoRA "
            "workload's aggregation.refine (workload.lora.holdout > 0); clair() takes 'auto' or an integer"
        )
    if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
        raise ValueError(f"refine: must be 'auto' or a non-negative integer, got {refine!r}")


@dataclass
class RefineChoice:
    """The refinement basis of one side of one module and how it was chosen.

    Attributes:
        basis: (n, j) orthonormal basis (j = 0: nothing of the deviations is kept).
        rank: j.
        spectrum: Leading singular values of the stacked centred deviations.
        null: The parallel-analysis thresholds for the same directions (``"auto"`` only, else empty).
    """

    basis: torch.Tensor
    rank: int
    spectrum: list[float] = field(default_factory=list)
    null: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly record (rank, leading singular values and thresholds)."""
        return {"rank": self.rank, "spectrum": self.spectrum[:8], "null": self.null[:8]}


def _left_compact(blocks: torch.Tensor) -> torch.Tensor:
    """(H, n, w) -> (H, n, min(n, w)) blocks with the same left Gram C_k C_k^T = D_k D_k^T."""
    if blocks.shape[2] <= blocks.shape[1]:
        return blocks
    _, r_mat = torch.linalg.qr(blocks.transpose(1, 2))  # D_k^T = Q R, so D_k D_k^T = R^T R
    return r_mat.transpose(1, 2)  # (H, n, n)


def _top_svd(x: torch.Tensor, k: int, gen: torch.Generator, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k leading left singular vectors (n, k') and values (k',) of x (n, m): an exact SVD, or a
    seeded randomized range finder with power steps (the values to a few 1e-3)."""
    if exact:
        u, s, _ = torch.linalg.svd(x, full_matrices=False)  # (n, r), (r,)
        return u[:, :k], s[:k]
    m = min(k + 10, min(x.shape))
    y = x @ torch.randn(x.shape[1], m, generator=gen, dtype=x.dtype)  # (n, m)
    for _ in range(3):
        y = x @ (x.T @ torch.linalg.qr(y)[0])
    q_mat = torch.linalg.qr(y)[0]  # (n, m)
    u, s, _ = torch.linalg.svd(q_mat.T @ x, full_matrices=False)  # (m, m), (m,)
    return (q_mat @ u)[:, :k], s[:k]


def choose_basis(deviations: torch.Tensor, refine: int | str, seed: int) -> RefineChoice:
    """The refinement basis of one side: top singular vectors of the stacked centred deviations.

    Args:
        deviations: (H, n, w) centred deviations D_k of the detected-honest clients on this side (any
            right rotation of each block gives the same result: only D_k D_k^T matters).
        refine: ``"auto"`` (parallel analysis, see the module docstring) or the number of directions.
        seed: Seed of the null's rotations.

    Returns:
        The :class:`RefineChoice`.
    """
    if refine == 0:  # the detected-honest mean: nothing to compute
        return RefineChoice(torch.zeros(deviations.shape[1], 0, dtype=torch.float64), 0)
    blocks = _left_compact(deviations.double())  # (H, n, w')
    h, n, w = blocks.shape
    gen = torch.Generator().manual_seed(seed)
    x = blocks.permute(1, 0, 2).reshape(n, h * w)  # (n, H w') = [D_1 ... D_H]
    full = min(n, h * w)
    exact = refine != "auto" or x.numel() <= EXACT_SVD_MAX_ENTRIES  # a given rank: always exact
    u, s = _top_svd(x, full if exact else min(full, MAX_AUTO_RANK), gen, exact)  # (n, k'), (k',)
    floor = RELATIVE_FLOOR * float(s[0]) if s.numel() and float(s[0]) > 0 else float("inf")
    numerical = int((s > floor).sum())
    if refine != "auto":
        j = min(int(refine), numerical)
        return RefineChoice(u[:, :j].contiguous(), j, s[:j].tolist())
    k = min(numerical, full if exact else MAX_AUTO_RANK)
    null = torch.zeros(k, dtype=torch.float64)
    if k:
        # C_k = Q_k R_k; a Haar-random frame times R_k is a uniformly rotated C_k (same spectrum).
        r_mat = torch.linalg.qr(blocks)[1]  # (H, w', w')
        for _ in range(NULL_DRAWS):
            frames = torch.linalg.qr(torch.randn(h, n, w, generator=gen, dtype=torch.float64))[0]
            rotated = torch.bmm(frames, r_mat).permute(1, 0, 2).reshape(n, h * w)  # (n, H w')
            small = rotated.numel() <= EXACT_SVD_MAX_ENTRIES
            null = torch.maximum(null, _top_svd(rotated, k, gen, small)[1])
    keep = s[:k] > null
    j = int(keep.long().cumprod(0).sum()) if k else 0  # leading directions above the null
    return RefineChoice(u[:, :j].contiguous(), j, s[:k].tolist(), null.tolist())


def update_gram(kind: str, items: list[Any], clients: list[int]) -> torch.Tensor:
    """(H, H) float64 inner products <M_k, M_l>_F of the clients' updates (factor pairs never densified).

    For pairs, <B_k A_k, B_l A_l> = sum((B_k^T B_l) * (A_k A_l^T)), one (r', r') product per pair.
    """
    if kind == "dense":
        x = torch.stack([items[k].double().flatten() for k in clients])  # (H, p q)
        return x @ x.T
    # Pairs of different widths (an attacked update's own rank) are zero-padded: products unchanged.
    width = max(items[k][0].shape[1] for k in clients)
    bs = torch.stack([nn_pad(items[k][0].double(), (0, width - items[k][0].shape[1])) for k in clients])
    as_ = torch.stack(
        [nn_pad(items[k][1].double(), (0, 0, 0, width - items[k][1].shape[0])) for k in clients]
    )
    h = len(clients)
    gram = torch.zeros(h, h, dtype=torch.float64)
    for i in range(h):  # row i against every later client in one batched product: (H - i, w, w) each side
        btb = torch.einsum("pr,jps->jrs", bs[i], bs[i:])  # B_i^T B_j
        aat = torch.einsum("rq,jsq->jrs", as_[i], as_[i:])  # A_i A_j^T
        gram[i, i:] = gram[i:, i] = (btb * aat).sum(dim=(1, 2))
    return gram


def _robust_mean_applies(h: int, clip: float | None) -> bool:
    """Whether :func:`robust_weights` looks for far-out clients: 3 to ``MAX_ROBUST_MEAN_CLIENTS``
    clients (the Gram costs H^2 r^2 (p + q) for factor pairs) and a clip."""
    return clip is not None and 3 <= h <= MAX_ROBUST_MEAN_CLIENTS


def mean_weights(
    kind: str,
    items: list[Any],
    clients: list[int],
    clip: float | None = MEAN_CLIP,
    precision: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """:func:`robust_weights` of ``clients``' updates, the Gram (:func:`update_gram`) formed only where
    the robust mean applies (with more clients it is the plain, or precision-weighted, mean)."""
    h = len(clients)
    if not _robust_mean_applies(h, clip):
        return robust_weights(torch.zeros(h, h, dtype=torch.float64), None, precision=precision)
    return robust_weights(update_gram(kind, items, clients), clip, precision=precision)


def robust_weights(
    gram: torch.Tensor,
    clip: float | None = MEAN_CLIP,
    iters: int = 100,
    precision: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Weights a (H,), summing to 1, of the robust honest mean sum_k a_k M_k.

    The clients' geometric median c (Weiszfeld, worked through the Gram matrix alone, so factor pairs
    never densify) locates the bulk; a client farther from c than ``clip`` x the median distance is left
    out and m is the plain mean of the rest. When nobody sits that far out, m is exactly the plain mean.
    A sign-flipped, scaled or IPM update lies inside the subspace, where detection cannot see it, but far
    from the bulk when honest clients are alike (measured on the linear workload at heterogeneity 0:
    CLAIR's error 0.40 with the plain mean, 0.107 with deviations clipped at 3 median distances, 0.066
    with them left out; multi-Krum 0.063). Clipping instead of leaving out still let each of the four
    in-subspace attackers move m by up to 3 median distances / H.

    Args:
        gram: (H, H) inner products of the updates (:func:`update_gram`).
        clip: How many median distances from c a client may sit; None gives the plain mean.
        precision: Optional (H,) relative precision of each client's update (1 / noise_scale^2): the mean
            of the kept clients is then weighted by it, the minimum-variance mean of alike clients whose
            estimates are differently noisy.
        iters: Weiszfeld iterations at most.

    Returns:
        (H,) float64 weights, and the positions of the clipped clients.
    """
    h = gram.shape[0]
    prior = torch.ones(h, dtype=torch.float64) if precision is None else precision.double()
    if not _robust_mean_applies(h, clip):
        return prior / prior.sum(), []
    diag = torch.diagonal(gram)

    def distances(b: torch.Tensor) -> torch.Tensor:  # ||M_k - sum_l b_l M_l|| for every k
        return (diag - 2.0 * (gram @ b) + b @ gram @ b).clamp_min(0.0).sqrt()

    scale = float(diag.max().sqrt()) if h else 0.0
    b = torch.full((h,), 1.0 / h, dtype=torch.float64)
    for _ in range(iters):
        d = distances(b).clamp_min(1e-12 * max(scale, 1e-300))
        new = (1.0 / d) / (1.0 / d).sum()
        done = float((new - b).abs().max()) < 1e-10
        b = new
        if done:
            break
    d = distances(b)
    t = clip * float(d.median())
    far = d > t
    w = (~far).double() * prior  # (H,)
    return w / w.sum(), far.nonzero().flatten().tolist()


def refinement_bases(
    kind: str,
    items: list[Any],
    honest: list[int],
    side: str,
    refine: int | str,
    seed: int,
    weights: torch.Tensor | None = None,
) -> tuple[RefineChoice | None, RefineChoice | None]:
    """Column and row refinement bases from the detected-honest clients' centred deviations.

    Args:
        kind: ``"dense"`` (items are (p, q) tensors) or ``"factors"`` (items are pairs (B (p, r'),
            A (r', q))).
        items: The K client updates.
        honest: Detected-honest client indices (all finite).
        side: ``"column"`` (project the p side), ``"row"`` (the q side) or ``"both"``.
        refine: ``"auto"`` or a number of directions per side.
        seed: Seed of the null's rotations.
        weights: (H,) weights of the honest mean m (:func:`robust_weights`); None: the plain mean. A
            deviation M_k - m above ``MEAN_CLIP`` x the median deviation norm is then also left out of the
            rule, so a few far-out clients (sign-flipped updates, all along the mean) cannot make a
            direction look shared.

    Returns:
        (column choice or None, row choice or None): None where that side is not projected.
    """
    sides = {"column": (True, False), "row": (False, True), "both": (True, True)}[side]
    if refine == 0:  # the detected-honest mean: no deviations to build
        n_col, n_row = items[0].shape if kind == "dense" else (items[0][0].shape[0], items[0][1].shape[1])
        empty = [RefineChoice(torch.zeros(n, 0, dtype=torch.float64), 0) for n in (n_col, n_row)]
        return (empty[0] if sides[0] else None), (empty[1] if sides[1] else None)
    a = torch.full((len(honest),), 1.0 / len(honest), dtype=torch.float64) if weights is None else weights
    if kind == "dense":
        d = torch.stack([items[k].double() for k in honest])  # (H, p, q)
        d = d - torch.einsum("h,hpq->pq", a, d)
        col_dev, row_dev = d, d.transpose(1, 2)
    else:
        # D_k = B_k A_k - m = [B_k, -M_B][A_k; M_A] with m = M_B M_A (all honest factors, exact).
        bs = [items[k][0].double() for k in honest]
        as_ = [items[k][1].double() for k in honest]
        if sum(b.shape[1] for b in bs) <= MAX_EXACT_MEAN_COLUMNS:
            m_b = torch.cat(bs, dim=1)  # (p, N)
            m_a = torch.cat([x * float(w) for x, w in zip(as_, a, strict=True)], dim=0)  # (N, q)
        else:  # many clients: the mean's leading directions are enough to centre for the basis
            pairs = [(x, y * float(w) * len(honest)) for x, y, w in zip(bs, as_, a, strict=True)]
            m_b, m_a = low_rank_mean(pairs, MAX_AUTO_RANK, seed)
        # Clients may send pairs of different widths (an attacked update's own rank): zero columns of B
        # and rows of A pad them to one width without changing any product.
        width = max(b.shape[1] for b in bs)
        bs = [torch.nn.functional.pad(b, (0, width - b.shape[1])) for b in bs]
        as_ = [torch.nn.functional.pad(a, (0, 0, 0, width - a.shape[0])) for a in as_]
        wide_b = torch.stack([torch.cat([b, -m_b], dim=1) for b in bs])  # (H, p, r' + N)
        wide_a = torch.stack([torch.cat([a, m_a], dim=0) for a in as_])  # (H, r' + N, q)
        # Only D_k D_k^T (column) and D_k^T D_k (row) matter: C_k = B'_k R_k^T with A'_k^T = Q_k R_k.
        col_dev = torch.bmm(wide_b, torch.linalg.qr(wide_a.transpose(1, 2))[1].transpose(1, 2))
        row_dev = torch.bmm(wide_a.transpose(1, 2), torch.linalg.qr(wide_b)[1].transpose(1, 2))
    if weights is not None:  # far-out deviations are no evidence of shared structure (same norm both sides)
        norms = torch.linalg.vector_norm(col_dev, dim=(1, 2))  # (H,)
        near = norms <= MEAN_CLIP * float(norms.median())
        col_dev, row_dev = col_dev[near], row_dev[near]
    col = choose_basis(col_dev, refine, seed) if sides[0] else None
    row = choose_basis(row_dev, refine, seed + 1) if sides[1] else None
    return col, row


def refine_dense(
    blocks: list[torch.Tensor],
    col_basis: torch.Tensor | None,
    row_basis: torch.Tensor | None,
    honest: list[int],
    weights: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Refines dense blocks: m + P (M_k - m) Q for honest clients, the input for the others.

    Args:
        blocks: K (p, q) blocks, any dtype; flagged ones may be non-finite.
        col_basis: (p, r) orthonormal basis of the column subspace, or None (no column projection).
        row_basis: (q, r) orthonormal basis of the row subspace, or None (no row projection).
        honest: Detected-honest client indices (all finite).
        weights: (H,) weights of m over ``honest`` (:func:`robust_weights`); None: the plain mean.

    Returns:
        K (p, q) blocks in the input dtype.
    """
    stacked = torch.stack([blocks[k].double() for k in honest])  # (H, p, q)
    mean = stacked.mean(dim=0) if weights is None else torch.einsum("h,hpq->pq", weights, stacked)  # (p, q)
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
        weights: (H,) weights of m over ``honest`` (None: the plain mean).
    """

    col_basis: torch.Tensor | None
    row_basis: torch.Tensor | None
    factors: list[tuple[torch.Tensor, torch.Tensor]]
    honest: list[int]
    weights: torch.Tensor | None = None

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
        w = [1.0 / len(self.honest)] * len(self.honest) if self.weights is None else self.weights.tolist()
        as_ = torch.cat(
            [self.factors[k][1] * wk for k, wk in zip(self.honest, w, strict=True)], dim=0
        )  # (N, q)
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


def low_rank_mean(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], rank: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncation of mean_k B_k A_k as factors (C_B (p, rank), C_A (rank, q)).

    The mean [B_1 ... B_n][A_1; ...; A_n] / n is never formed: up to N = 1024 stacked factor columns
    it is truncated exactly through two QRs; beyond that a randomized range finder (two power steps) works
    through the factors, so the cost is O(N (p + q) (rank + 10)).
    """
    b = torch.cat([x for x, _ in pairs], dim=1).double()  # (p, N)
    a = torch.cat([y for _, y in pairs], dim=0).double() / len(pairs)  # (N, q)
    if b.shape[1] <= 1024:
        # Exact: B A = Q_b (R_b R_a^T) Q_a^T, so the SVD of the N x N core gives the truncation. Exactness
        # keeps noiseless inputs noiseless (a randomized centre left 1e-8 residuals that turned P0 into a
        # slowly converging P1).
        q_b, r_b = torch.linalg.qr(b)  # (p, N'), (N', N)
        q_a, r_a = torch.linalg.qr(a.T)  # (q, N''), (N'', N)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
        u, vh = q_b @ u, vh @ q_a.T
    else:
        gen = torch.Generator().manual_seed(seed)
        m = min(rank + 10, b.shape[1], a.shape[1])
        y = b @ (a @ torch.randn(a.shape[1], m, generator=gen, dtype=torch.float64))  # (p, m)
        for _ in range(2):
            q_mat = torch.linalg.qr(y)[0]
            y = b @ (a @ (a.T @ (b.T @ q_mat)))
        q_mat = torch.linalg.qr(y)[0]  # (p, m)
        u, s, vh = torch.linalg.svd((q_mat.T @ b) @ a, full_matrices=False)  # (m, m), (m,), (m, q)
        u = q_mat @ u
    k = min(rank, s.shape[0])
    dtype = pairs[0][0].dtype
    return (u[:, :k] * s[:k]).to(dtype), vh[:k].to(dtype)
