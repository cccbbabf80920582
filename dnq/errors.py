"""The errors of :mod:`dnq`, in one module that imports nothing else of the package.

Every error a user can cause is a ``ValueError`` subclass whose message names the problem and
the fix; a diverged computation subclasses :class:`dnq_landscape_common.errors.NonFiniteError`
(and ``RuntimeError``, as before). The old import paths (``dnq.train.ConfigError``,
``dnq.data.DataError``, ...) keep working.

Example:
    >>> from dnq.errors import ConfigError, NonFiniteLossError
    >>> from dnq_landscape_common.errors import NonFiniteError
    >>> issubclass(ConfigError, ValueError), issubclass(NonFiniteLossError, NonFiniteError)
    (True, True)
"""

from __future__ import annotations

from dnq_landscape_common.errors import NonFiniteError

__all__ = ["CheckpointError", "ConfigError", "DataError", "InfeasibleBudgetError", "LockedError",
           "NonFiniteLossError", "ReconstructionError", "SensitivityFileError"]


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the valid values."""


class DataError(ValueError):
    """A dataset spec or file that cannot be used; the message names the fix."""


class LockedError(ValueError):
    """Another process holds the folder's lock (the message names it)."""


class CheckpointError(ValueError):
    """A checkpoint or model file that cannot be loaded (the message names the file and the fix)."""


class InfeasibleBudgetError(ValueError):
    """A budget no allocation meets (the message names the smallest and largest useful budgets)."""


class SensitivityFileError(ValueError):
    """A sensitivity file that is corrupt, from another model, or lacks the settings asked for."""


class NonFiniteLossError(NonFiniteError, RuntimeError):
    """Training produced a NaN or Inf loss; the last good checkpoint is kept."""


class ReconstructionError(NonFiniteError, RuntimeError):
    """A reconstruction that cannot go on (a NaN or Inf loss; the message names the block and
    the iteration)."""
