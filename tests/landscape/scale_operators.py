"""Hessians of 10M parameters whose spectrum and trace are known in closed form, for the
instruments' scale tests (tests/landscape/test_scale.py). Run as a script, one case measures
itself in a fresh process (its peak RSS is then the instrument's, not the test session's):

    python tests/landscape/scale_operators.py least-squares   # prints one JSON line
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch
import torch.nn as nn

DIM = 10_000_000


class Diagonal(nn.Module):
    """``out = x * w`` with the loss ``sum(out^2) / 2``: the Hessian is ``diag(x^2)``."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x * self.w


def half_sum_of_squares(out, target):
    return 0.5 * (out ** 2).sum()


class LeastSquares(nn.Module):
    """A linear model ``X w``. With ``mse_loss`` (mean over N samples) the Hessian is
    ``2 X^T X / N``. The dot products are summed by ``Tensor.sum`` (cascade summation, accurate
    to ~1e-7 over 10M terms): float32 ``X @ w`` on the CPU (MKL gemv) is off by ~1e-4 relative at
    this length, an error of the model's own arithmetic that no instrument can remove."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))

    def forward(self, X):
        return (X * self.w).sum(1)


def diagonal_case(n: int = DIM, top=(10.0, 9.0, 8.0), seed: int = 1):
    """``(model, loss_fn, data, eigenvalues descending (float64), trace)``: a diagonal Hessian
    with eigenvalues ``top`` above ``n - len(top)`` values uniform in [0, 5)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g, dtype=torch.float64) * 5
    a[: len(top)] = torch.tensor(top, dtype=torch.float64)
    x = a.sqrt().float()[None]  # one sample
    exact = x[0].double() ** 2  # the float32 model's Hessian, exactly
    values = torch.sort(exact, descending=True).values
    return Diagonal(n), half_sum_of_squares, (x, torch.zeros(1)), values, float(exact.sum())


def least_squares_case(n: int = DIM, samples: int = 6, seed: int = 1):
    """``(model, loss_fn, data, eigenvalues descending (float64), trace)`` for ``2 X^T X / N``
    with ``X`` (samples, n) Gaussian rows scaled from 3 down to 1: rank ``samples``, the nonzero
    eigenvalues those of the float64 Gram matrix ``2 X X^T / N``."""
    from landscape.fp64 import inner

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, n, generator=g)
    X *= torch.linspace(3, 1, samples)[:, None]
    gram = 2 * inner(X.T, X.T) / samples  # float64 accumulation, chunked
    values = torch.linalg.eigvalsh(gram).flip(0)
    return LeastSquares(n), nn.functional.mse_loss, (X, torch.zeros(samples)), values, float(values.sum())


def main(case: str) -> None:
    import landscape

    torch.set_num_threads(int(os.environ.get("DNQ_TEST_THREADS") or 2))  # tests/conftest.py's TEST_THREADS
    model, loss_fn, data, values, trace = (least_squares_case if case == "least-squares" else diagonal_case)()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    op = landscape.HessianOperator(model, loss_fn, data, reduction="mean")
    t0 = time.perf_counter()
    eig = landscape.top_eigenvalues(op, k=3, seed=0, progress=False)
    t_eig = time.perf_counter() - t0
    peak_eig = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tr = landscape.hessian_trace(op, num_matvecs=24, seed=0, progress=False)  # a sketch of 8 >= the rank: exact
    print(json.dumps({"eigenvalues": eig.eigenvalues, "exact": values[:3].tolist(), "converged": eig.converged,
                      "iterations": eig.iterations, "relative_residuals": eig.relative_residuals,
                      "reorthogonalization": eig.reorthogonalization, "basis_bytes": eig.basis_bytes,
                      "trace": tr.value, "trace_exact": trace, "trace_std_error": tr.std_error,
                      "rss_before_bytes": base, "rss_peak_eig_bytes": peak_eig, "time_eig_s": t_eig,
                      "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main(sys.argv[1])
