"""Inner products, norms and projections of long vectors, accumulated in float64.

The instruments keep vectors in the operator's dtype (float32 for most models) but every
reduction over the parameter dimension (a norm, a dot product, the coefficients of a
Gram-Schmidt step, a combination of basis vectors) is accumulated in float64 here, chunk by
chunk, whatever the device and dtype. Two reasons:

* PyTorch's float32 ``norm`` on the CPU accumulates naively (pytorch/pytorch#169237, #151761):
  its relative error grows with the length, 4.4e-4 at 11.18M elements (torchvision resnet18's
  parameter count) and 1.7e-3 at 30M, enough to stop Lanczos from converging and to move its
  eigenvalues in the third digit.
* A float32 matrix-vector product over millions of entries (``Q.T @ w`` in a
  reorthogonalization) carries an error that grows with the length too, and it is not
  documented how a given BLAS blocks it.

Chunks are sized so that their float64 temporaries stay near ``chunk_bytes`` (16 MiB on the
CPU, 256 MiB on accelerators), so the cost is a few extra passes over memory, not a float64
copy of the vectors.

Example:
    >>> import torch
    >>> from landscape.fp64 import dots, norms
    >>> x = torch.full((3_000_000, 2), 0.1)
    >>> abs(float(norms(x)[0]) - (3_000_000 * 0.1 ** 2) ** 0.5) < 1e-3   # float32 inputs, float64 sums
    True
"""

from __future__ import annotations

import torch


def chunk_rows(n_cols: int, device: torch.device, chunk_bytes: int | None = None) -> int:
    """Rows per chunk so that a (rows, n_cols) float64 temporary takes about ``chunk_bytes``."""
    if chunk_bytes is None:
        chunk_bytes = (16 << 20) if torch.device(device).type == "cpu" else (256 << 20)
    return max(1024, chunk_bytes // (8 * max(1, n_cols)))


def _as2d(x: torch.Tensor) -> torch.Tensor:
    return x[:, None] if x.dim() == 1 else x


def dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise inner products ``sum_i a[i, j] * b[i, j]`` of two (n, k) blocks (or (n,)
    vectors), accumulated in float64; a float64 tensor of shape (k,) (or a 0-d one) on the
    inputs' device."""
    one = a.dim() == 1
    a2, b2 = _as2d(a), _as2d(b)
    if a2.shape != b2.shape:
        raise ValueError(f"dots: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    n, k = a2.shape
    out = torch.zeros(k, dtype=torch.float64, device=a.device)
    step = chunk_rows(2 * k, a.device)
    for s in range(0, n, step):
        out += (a2[s:s + step].double() * b2[s:s + step].double()).sum(0)
    return out[0] if one else out


def norms(a: torch.Tensor) -> torch.Tensor:
    """Column-wise Euclidean norms of an (n, k) block (or the norm of an (n,) vector), in float64."""
    return dots(a, a).clamp_min(0).sqrt()


def normalize(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a / norms(a), norms(a))``: columns scaled to unit norm (in ``a``'s dtype; a zero column
    stays zero) and the float64 norms."""
    nrm = norms(a)
    scale = torch.where(nrm > 0, 1.0 / nrm.clamp_min(1e-300), torch.zeros_like(nrm)).to(a.dtype)
    return a * scale, nrm


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` for (n, p) and (n, q) blocks: a (p, q) float64 matrix on the inputs' device."""
    a2, b2 = _as2d(a), _as2d(b)
    if a2.shape[0] != b2.shape[0]:
        raise ValueError(f"inner: lengths differ, {a2.shape[0]} and {b2.shape[0]}")
    out = torch.zeros(a2.shape[1], b2.shape[1], dtype=torch.float64, device=a.device)
    step = chunk_rows(a2.shape[1] + b2.shape[1], a.device)
    for s in range(0, a2.shape[0], step):
        out += a2[s:s + step].double().T @ b2[s:s + step].double()
    return out


def combine(vectors, coefs: torch.Tensor) -> torch.Tensor:
    """``V @ coefs`` for a basis ``V`` given as an (n, m) block or a list of m (n,) vectors, and
    ``coefs`` (m, l): an (n, l) block in the vectors' dtype (1-D ``coefs``: an (n,) vector),
    formed in float64 chunk by chunk."""
    one = coefs.dim() == 1
    C = coefs[:, None] if one else coefs
    block = isinstance(vectors, torch.Tensor)
    m, cols = C.shape
    ref = vectors if block else vectors[0]
    if (vectors.shape[1] if block else len(vectors)) != m:
        raise ValueError(f"combine: {vectors.shape[1] if block else len(vectors)} vectors but {m} coefficient rows")
    n = ref.shape[0]
    out = torch.empty(n, cols, dtype=ref.dtype, device=ref.device)
    C = C.to(device=ref.device, dtype=torch.float64)
    step = chunk_rows(m + cols, ref.device)
    for s in range(0, n, step):
        X = (vectors[s:s + step] if block else torch.stack([v[s:s + step] for v in vectors], 1)).double()
        out[s:s + step] = (X @ C).to(ref.dtype)
    return out[:, 0] if one else out


def project_out(Q: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``G - Q (Q^T G)`` for an orthonormal (n, s) ``Q`` and an (n, k) ``G``, in place on ``G``
    (coefficients and combinations in float64)."""
    if Q.shape[1] == 0:
        return G
    C = inner(Q, G)
    step = chunk_rows(Q.shape[1] + G.shape[1], G.device)
    for s in range(0, G.shape[0], step):
        G[s:s + step] = (G[s:s + step].double() - Q[s:s + step].double() @ C).to(G.dtype)
    return G


def orthonormalize(Y: torch.Tensor, rtol: float = 1e-12, *, inplace: bool = False) -> torch.Tensor:
    """An orthonormal basis of the column space of an (n, k) block: Cholesky-QR done twice
    (CholeskyQR2), with the float64 Gram matrix's eigendecomposition in place of Cholesky so that
    rank-deficient blocks work: directions whose squared singular value is below ``rtol`` times
    the largest are dropped (the result may have fewer than ``k`` columns). ``inplace``: the
    result is written over ``Y`` (a view of its first columns is returned), so no second block of
    the same size is allocated."""
    Q = Y
    for _ in range(2):
        lam, V = torch.linalg.eigh(inner(Q, Q))
        top = float(lam.max()) if lam.numel() else 0.0
        keep = lam > rtol * top if top > 0 else torch.zeros_like(lam, dtype=torch.bool)
        C = V[:, keep] / lam[keep].sqrt()
        Q = _combine_inplace(Q, C) if inplace else combine(Q, C)
    return Q


def _combine_inplace(Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``Q @ C`` written over the first ``C.shape[1]`` columns of ``Q`` (rows are independent: each
    chunk is read whole, as a float64 copy, before it is written)."""
    cols = C.shape[1]
    C = C.to(device=Q.device, dtype=torch.float64)
    step = chunk_rows(Q.shape[1] + cols, Q.device)
    for s in range(0, Q.shape[0], step):
        Q[s:s + step, :cols] = (Q[s:s + step].double() @ C).to(Q.dtype)
    return Q[:, :cols]
