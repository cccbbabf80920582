"""The errors of the instruments, and the ``on_nonfinite`` policy they share.

A model whose loss (or gradient, or Hessian-vector product) is NaN or Inf on some batch has no
curvature to measure: every estimate built from it would be NaN, or make a linear-algebra
routine fail with a message that names neither the cause nor the fix. The instruments check
every batch's loss and products (one device-side reduction per batch, one host read per
product) and raise :class:`NonFiniteMeasurementError` (importable as ``NonFiniteError``, the
name it had before; a subclass of :class:`dnq_landscape_common.errors.NonFiniteError`, the base of
every non-finite error of the project) naming the instrument and the batch, unless called
with ``on_nonfinite="nan"``, which returns NaN results instead (what loss surfaces do by
default: a surface is expected to leave the region where the loss is finite).

Example:
    >>> import torch, torch.nn as nn
    >>> from landscape import HessianOperator, NonFiniteError, hessian_trace
    >>> model = nn.Linear(3, 2)
    >>> with torch.no_grad():
    ...     model.weight[0, 0] = float("nan")
    >>> op = HessianOperator(model, nn.functional.cross_entropy, (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])))
    >>> try:
    ...     hessian_trace(op, 6)
    ... except NonFiniteError as e:
    ...     print(e.instrument, e.batch)
    hessian_trace 0
    >>> hessian_trace(op, 6, on_nonfinite="nan").value
    nan
"""

from __future__ import annotations

import warnings

from dnq_landscape_common.errors import NonFiniteError as _NonFiniteBase

ON_NONFINITE = ("raise", "nan")


class NonFiniteMeasurementError(_NonFiniteBase):
    """A NaN or Inf loss, gradient or Hessian-vector product met by an instrument.

    Attributes:
        instrument: what was being measured (``"hessian_trace"``, ``"surface_2d"``, ...).
        batch: the index of the first batch (in the order the data yields them) where it
            happened, or ``None`` when unknown (a duck-typed operator).
        what: ``"loss"``, ``"gradient"``, ``"Hessian-vector product"`` or ``"quadratic form"``.
    """

    def __init__(self, instrument: str, what: str, batch: int | None = None, detail: str = ""):
        self.instrument, self.what, self.batch = instrument, what, batch
        where = f"on batch {batch}" if batch is not None else "on some batch"
        super().__init__(
            f"{instrument}: the {what} is NaN or Inf {where} of the data{detail}; the model's parameters or "
            f"buffers (or those inputs) hold NaN/Inf values, or its loss overflows there. Check the model (a "
            f"diverged training?) and the data, or pass on_nonfinite='nan' to get NaN results instead")


NonFiniteError = NonFiniteMeasurementError  # its name before the project-wide base existed


def check_policy(on_nonfinite: str, name: str = "on_nonfinite") -> str:
    """``on_nonfinite`` itself, after checking it is ``"raise"`` or ``"nan"``.

    Raises:
        ValueError: any other value.
    """
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"{name} must be 'raise' or 'nan', got {on_nonfinite!r}")
    return on_nonfinite


class ConvergenceWarning(UserWarning):
    """An iterative instrument stopped before reaching its tolerance (its result says how far it got)."""


class ConvergenceError(RuntimeError):
    """An iterative instrument called with ``strict=True`` stopped before reaching its tolerance."""


def not_converged(message: str, strict: bool) -> None:
    """Raise :class:`ConvergenceError` (``strict``) or warn with :class:`ConvergenceWarning`."""
    if strict:
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=3)
