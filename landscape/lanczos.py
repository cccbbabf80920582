"""Symmetric Lanczos within a memory budget: full reorthogonalization where the basis fits,
thick restarts (top eigenpairs) or the plain three-term recurrence (quadrature) where it does
not.

Every inner product, norm and Gram-Schmidt coefficient is accumulated in float64
(:mod:`landscape.fp64`) whatever the vectors' dtype, so the answers do not degrade with the
number of parameters (float32 ``norm`` on the CPU does: pytorch/pytorch#169237).

**Memory.** A Lanczos vector has the operator's ``dim`` entries (44.7 MB in float32 for
torchvision's resnet18, 11.18M parameters). The basis grows one vector per step (nothing is
allocated up front), and ``memory_budget`` bytes bound it:

* :func:`lanczos` (spectral density, several runs at once) keeps every vector and
  reorthogonalizes fully when ``runs x steps`` vectors fit the budget (``reorth="full"``);
  otherwise it keeps only the last two vectors of each run (``reorth="local"``: the three-term
  recurrence, reorthogonalized locally). Gauss quadrature from the finite-precision recurrence
  stays accurate without global orthogonality (Paige 1976; Greenbaum 1989; Ubaru, Chen & Saad,
  SIAM J. Matrix Anal. Appl. 2017, who analyse SLQ in exactly this form): lost orthogonality
  shows up as copies of converged Ritz values whose weights split the true weight.
* :func:`thick_restart_lanczos` (top eigenpairs) keeps at most ``window`` vectors; when the
  basis is full it restarts from the best Ritz vectors (thick restart: Wu & Simon, SIAM J.
  Matrix Anal. Appl. 2000; Stewart's Krylov-Schur, 2001), with full reorthogonalization inside
  the window. When every step fits (the usual case) it is plain full-reorthogonalization
  Lanczos.

:func:`default_budget` is 2 GiB for host memory and a quarter of the free memory of an
accelerator; the instruments take ``memory_budget=`` to change it.

Example:
    >>> import torch
    >>> from landscape.lanczos import lanczos, thick_restart_lanczos, tridiagonal
    >>> H = torch.diag(torch.arange(1.0, 101.0))  # eigenvalues 1, 2, ..., 100
    >>> top = thick_restart_lanczos(lambda v: H @ v, torch.ones(100), k=2, tol=1e-8, window=12)
    >>> [round(t, 4) for t in top["theta"].tolist()], top["converged"], top["restarts"] > 0
    ([100.0, 99.0], True, True)
    >>> alphas, betas, lengths = lanczos(lambda X: H @ X, torch.ones(100, 1), steps=100)
    >>> torch.linalg.eigvalsh(tridiagonal(alphas[0], betas[0]))[[0, -1]].round(decimals=4).tolist()
    [1.0, 100.0]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._progress import bar as _bar
from .fp64 import chunk_rows, combine, normalize

#: host memory the Lanczos basis may take by default (bytes)
HOST_BUDGET = 2 << 30
REORTH = ("auto", "full", "local")


def default_budget(device) -> int:
    """Bytes a Lanczos basis may take on ``device`` by default: 2 GiB of host memory, or a
    quarter of the free memory of a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 4)
    return HOST_BUDGET


def resolve_budget(memory_budget, device) -> int:
    """``memory_budget`` in bytes, :func:`default_budget` for ``None``.

    Raises:
        ValueError: anything but ``None`` or a positive number of bytes.
    """
    if memory_budget is None:
        return default_budget(device)
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not memory_budget > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes (or None for the default), "
                         f"got {memory_budget!r}")
    return int(memory_budget)


def vectors_in(budget: int, dim: int, dtype: torch.dtype) -> int:
    """How many vectors of ``dim`` entries of ``dtype`` fit in ``budget`` bytes."""
    return int(budget // (dim * torch.empty((), dtype=dtype).element_size()))


def gib(nbytes: float) -> str:
    """``nbytes`` as a short human string (``"1.2 GiB"``, ``"340 MiB"``)."""
    return f"{nbytes / 2 ** 30:.2f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.0f} MiB"


#: a basis whose float64 copy would take at most this many bytes is kept in float64 outright
#: (batched float64 products, no per-pass conversion); larger ones in the operator's dtype
SMALL_BASIS_BYTES = 64 << 20


class Basis:
    """Orthonormal vectors for ``r`` independent runs, added one step at a time (the basis grows
    as steps are taken); projections accumulated in float64 for all runs at once.

    Args:
        max_steps: the most steps the basis will hold (sizes the float64 fast path).
        like: a (dim, r) tensor of the vectors' dtype and device.

    A basis whose float64 copy fits :data:`SMALL_BASIS_BYTES` lives in one float64 buffer
    (batched matrix products in float64); a larger one keeps one tensor per step in the vectors'
    own dtype, converted to float64 chunk by chunk for every projection.
    """

    def __init__(self, max_steps: int, like: torch.Tensor):
        dim, r = like.shape
        self.dtype, self.device, self.n = like.dtype, like.device, 0
        self.small = max_steps * dim * r * 8 <= SMALL_BASIS_BYTES
        self.buf = torch.empty(r, max_steps, dim, dtype=torch.float64, device=like.device) if self.small else None
        self.vectors: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self.n

    def append(self, v: torch.Tensor) -> None:
        """Add a step's vectors: (dim, r), or (dim,) for one run."""
        v = v if v.dim() == 2 else v[:, None]
        if self.small:
            self.buf[:, self.n] = v.T
        else:
            self.vectors.append(v.clone())
        self.n += 1

    def drop_oldest(self, keep: int) -> None:
        """Keep only the last ``keep`` steps."""
        drop = max(0, self.n - keep)
        if not drop:
            return
        if self.small:
            self.buf[:, :keep] = self.buf[:, drop:self.n].clone()
        else:
            del self.vectors[:drop]
        self.n -= drop

    def _chunk(self, s: int, step: int) -> torch.Tensor:
        return torch.stack([v[s:s + step] for v in self.vectors]).double()  # (j, rows, r)

    def coefficients(self, w: torch.Tensor) -> torch.Tensor:
        """``V_r^T w_r`` for each run: (j, r) float64 (w: (dim, r))."""
        if self.small:
            return torch.bmm(self.buf[:, :self.n], w.T.double().unsqueeze(-1))[:, :, 0].T
        n, r = w.shape
        c = torch.zeros(self.n, r, dtype=torch.float64, device=w.device)
        step = chunk_rows((self.n + 1) * r, w.device)
        for s in range(0, n, step):
            c += (self._chunk(s, step) * w[s:s + step].double()).sum(1)
        return c

    def subtract(self, w: torch.Tensor, c: torch.Tensor) -> None:
        """``w_r -= V_r c_r`` in place for each run (the combination formed in float64)."""
        if self.small:
            w.copy_((w.double() - torch.bmm(self.buf[:, :self.n].transpose(1, 2), c.T.unsqueeze(-1))[:, :, 0].T)
                    .to(w.dtype))
            return
        step = chunk_rows((self.n + 1) * w.shape[1], w.device)
        for s in range(0, w.shape[0], step):
            w[s:s + step] = (w[s:s + step].double() - (self._chunk(s, step) * c[:, None, :]).sum(0)).to(w.dtype)

    def orthogonalize(self, w: torch.Tensor, passes: int = 2) -> torch.Tensor:
        """Classical Gram-Schmidt of each column of ``w`` (dim, r) against its run's basis,
        ``passes`` times, in place; returns the summed coefficients (j, r) in float64."""
        total = torch.zeros(self.n, w.shape[1], dtype=torch.float64, device=w.device)
        for _ in range(passes):
            c = self.coefficients(w)
            self.subtract(w, c)
            total += c
        return total

    def rotate(self, S: torch.Tensor) -> None:
        """Replace a one-run basis by ``V S`` (S: (j, l) float64, orthonormal columns), in place:
        no second copy of the basis is made (each chunk is combined from a float64 copy)."""
        j, cols = S.shape
        S = S.to(device=self.device)
        if self.small:
            self.buf[0, :cols] = S.T @ self.buf[0, :j]
            self.n = cols
            return
        step = chunk_rows(j + cols, self.device)
        for s in range(0, self.vectors[0].shape[0], step):
            Y = self._chunk(s, step)[:, :, 0].T @ S  # (rows, cols)
            for i in range(cols):
                self.vectors[i][s:s + step, 0] = Y[:, i].to(self.dtype)
        del self.vectors[cols:]
        self.n = cols

    def combination(self, S: torch.Tensor) -> torch.Tensor:
        """``V S`` of a one-run basis as a new (dim, l) block in the vectors' dtype (float64 sums)."""
        if self.small:
            return (self.buf[0, :self.n].T @ S.to(self.device)).to(self.dtype)
        return combine([v[:, 0] for v in self.vectors], S)


def lanczos(matmat: Callable[[torch.Tensor], torch.Tensor], V0: torch.Tensor, steps: int,
            stop: Callable[[int, torch.Tensor, torch.Tensor], bool] | None = None, *, reorth: str = "full",
            progress: bool = False, desc: str = "lanczos"):
    """Run ``steps`` Lanczos iterations from each column of ``V0`` (dim, r).

    Args:
        matmat: ``X (dim, r) -> H X``.
        V0: start vectors (normalized here).
        steps: maximum number of iterations (Krylov dimension).
        stop: optional ``stop(j, alphas, betas) -> bool`` called after iteration ``j`` (1-based
            count) with the coefficients so far; returning True ends the run early.
        reorth: ``"full"``: every vector is kept and each new one is orthogonalized against all
            of them (twice); ``"local"``: only the last two vectors are kept (the three-term
            recurrence; see the module doc). ``"auto"`` is not resolved here (the instruments
            choose by memory budget).
        progress: a progress bar over the steps (shown after 2 s).

    Returns:
        ``(alphas (r, m), betas (r, m), lengths (r,))`` in float64: ``betas[:, j]`` couples
        vectors ``j`` and ``j + 1`` (the last one is the residual norm). A run whose Krylov space
        is exhausted (``beta ~ 0``: an invariant subspace) stops there; its ``lengths`` entry is
        its number of valid steps and its later coefficients are zero.
    """
    if reorth not in ("full", "local"):
        raise ValueError(f"reorth must be 'full' or 'local', got {reorth!r}")
    dim, r = V0.shape
    steps = min(steps, dim)
    alphas = torch.zeros(r, steps, dtype=torch.float64)
    betas = torch.zeros(r, steps, dtype=torch.float64)
    lengths = torch.full((r,), steps, dtype=torch.long)
    active = torch.ones(r, dtype=torch.bool)
    basis = Basis(steps if reorth == "full" else 2, V0)
    q, _ = normalize(V0)
    scale = torch.zeros(r, dtype=torch.float64)
    m = 0
    with _bar(progress, steps, desc) as pbar:
        for j in range(steps):
            if reorth == "local":
                basis.drop_oldest(1)
            basis.append(q)
            w = matmat(q)  # (dim, r)
            w[:, ~active.to(w.device)] = 0
            alphas[:, j] = basis.orthogonalize(w)[-1].cpu() * active
            w, b = normalize(w)
            b = b.cpu()
            betas[:, j] = b * active
            m = j + 1
            pbar.update(1)
            scale = torch.maximum(scale, alphas[:, j].abs())
            done = active & (b <= 1e-10 * scale.clamp_min(1e-300))
            if done.any():
                lengths[done] = m
                active &= ~done
            if not active.any() or (stop is not None and stop(m, alphas[:, :m], betas[:, :m])):
                lengths[active] = m
                break
            q = w
            q[:, ~active.to(q.device)] = 0  # finished runs idle on zero vectors
    return alphas[:, :m], betas[:, :m], lengths


def tridiagonal(alphas: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """The (m, m) Lanczos matrix of one run (float64)."""
    m = alphas.shape[0]
    T = torch.diag(alphas)
    if m > 1:
        off = betas[: m - 1]
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def order(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of ``theta`` from the most wanted: ``"LA"`` largest algebraic, ``"SA"`` smallest,
    ``"LM"`` largest magnitude."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def thick_restart_lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, k: int, *,
                          which: str = "LA", tol: float = 1e-4, max_steps: int = 200, window: int | None = None,
                          check_every: int = 1, progress: bool = False, desc: str = "lanczos") -> dict:
    """The ``k`` wanted Ritz pairs of a symmetric operator by Lanczos with full
    reorthogonalization and, when the basis reaches ``window`` vectors, thick restarts.

    The projected matrix ``T = V^T H V`` is kept dense (float64): column ``j`` is the
    Gram-Schmidt coefficients of ``H v_j``. At a restart the basis becomes the ``l`` best Ritz
    vectors (``V <- V S_l``, computed in place) and ``T`` their Ritz values; the next vector is the
    current residual, and the coupling to it reappears in its own coefficients. A Ritz pair
    ``(theta, V s)`` has residual norm ``beta * |s_last|`` (``beta`` the norm of the last
    residual), the estimate used to stop.

    Args:
        matvec: ``v (dim,) -> H v``.
        v0: the start vector.
        k: pairs wanted.
        which: ``"LA"``, ``"SA"`` or ``"LM"`` (:func:`order`).
        tol: stop when every wanted pair has estimated residual ``<= tol * |theta|``.
        max_steps: products at most.
        window: basis vectors at most (``None``: no restart before ``max_steps``); at least
            ``k + 2``.
        check_every: test convergence every this many steps.
        progress: a progress bar over the steps (shown after 2 s).

    Returns:
        a dict with ``theta`` (k,) and ``vectors`` (dim, k) (the wanted Ritz pairs, in order),
        ``estimates`` (their residual estimates), ``steps``, ``restarts``, ``converged`` (by the
        estimates) and ``peak_vectors`` (the most basis vectors held).
    """
    dim = v0.shape[0]
    max_steps = min(max_steps, dim)
    window = min(window or max_steps + 1, dim + 1)
    if window < k + 2:
        raise ValueError(f"a basis of {window} vectors cannot hold {k} Ritz vectors and a new direction: "
                         f"it needs at least {k + 2}")
    basis = Basis(window, v0[:, None])
    T = torch.zeros(window, window, dtype=torch.float64)
    q, _ = normalize(v0)
    steps, restarts, peak = 0, 0, 0
    theta = S = res = None
    converged = False
    beta = torch.zeros((), dtype=torch.float64)
    with _bar(progress, max_steps, desc) as pbar:
        while steps < max_steps:
            basis.append(q)
            j = len(basis)
            peak = max(peak, j)
            w = matvec(q)
            steps += 1
            pbar.update(1)
            c = basis.orthogonalize(w[:, None])[:, 0].cpu()
            T[:j, j - 1] = c
            T[j - 1, :j] = c
            w, beta = normalize(w)
            beta = beta.cpu()
            theta, S = torch.linalg.eigh(T[:j, :j])
            idx = order(theta, which)[: min(k, j)]
            res = beta * S[j - 1, idx].abs()
            exhausted = bool(beta <= 1e-10 * theta.abs().max().clamp_min(1e-300))
            if j >= k and (steps % check_every == 0 or exhausted or steps == max_steps):
                converged = bool((res <= tol * theta[idx].abs().clamp_min(1e-30)).all())
                worst = float((res / theta[idx].abs().clamp_min(1e-30)).max())
                pbar.set_postfix(residual=f"{worst:.1e}", refresh=False)  # no refresh: the bar's delay holds
                if converged:
                    break
            if exhausted:  # an invariant subspace: its Ritz pairs are exact
                converged = j >= k
                break
            if steps == max_steps:
                break
            if j == window:  # thick restart: keep the best Ritz vectors
                keep_n = min(window - 2, k + max(1, (window - k) // 2))
                keep = order(theta, which)[:keep_n]
                basis.rotate(S[:, keep])
                T.zero_()
                T[:keep_n, :keep_n] = torch.diag(theta[keep])
                restarts += 1
            q = w
    idx = order(theta, which)[: min(k, len(theta))]
    vectors = basis.combination(S[:, idx])
    return {"theta": theta[idx], "vectors": vectors, "estimates": res, "steps": steps, "restarts": restarts,
            "converged": converged, "peak_vectors": peak, "residual_norm": float(beta)}


__all__ = ["Basis", "lanczos", "tridiagonal", "order", "thick_restart_lanczos", "default_budget", "resolve_budget",
           "vectors_in", "REORTH", "gib"]
