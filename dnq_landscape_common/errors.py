"""The base class of every non-finite error of the project.

Training that diverges (:class:`dnq.errors.NonFiniteLossError`) and an instrument that meets a
NaN or Inf loss, gradient or Hessian-vector product
(:class:`landscape.errors.NonFiniteMeasurementError`) both subclass :class:`NonFiniteError`, so
that one ``except NonFiniteError`` (the command lines' error handler, a user's sweep) catches
either, without comparing class names.

Example:
    >>> from dnq_landscape_common.errors import NonFiniteError
    >>> from dnq.errors import NonFiniteLossError
    >>> from landscape.errors import NonFiniteMeasurementError
    >>> issubclass(NonFiniteLossError, NonFiniteError), issubclass(NonFiniteMeasurementError, NonFiniteError)
    (True, True)
    >>> issubclass(NonFiniteError, FloatingPointError)
    True
"""

from __future__ import annotations

__all__ = ["NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """A NaN or Inf value where a finite one is needed (a loss, a gradient, a product)."""
