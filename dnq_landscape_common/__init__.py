"""The leaf layer under both packages: generic utilities that :mod:`dnq` (the trainer and the
quantizers) and :mod:`landscape` (the instruments, the study and its report) share.

It imports neither package (``import-linter`` holds this in CI) and holds no logic of either:

- :mod:`~dnq_landscape_common.io`: atomic writes (temp file + fsync + rename), safe checkpoint loading;
- :mod:`~dnq_landscape_common.precision`: full float32 precision (no TF32, no autocast) in a scope;
- :mod:`~dnq_landscape_common.cli`: one-line command-line errors and their exit codes;
- :mod:`~dnq_landscape_common.device`: the one ``--device`` parser;
- :mod:`~dnq_landscape_common.distributed`: ``torchrun`` helpers;
- :mod:`~dnq_landscape_common.errors`: :class:`NonFiniteError`, the base of every non-finite error;
- :mod:`~dnq_landscape_common.tensors`: per-channel moments.

It is a third top-level package rather than a module of either: importing ``dnq.x`` runs
``dnq/__init__`` (the trainer, torchvision) and ``landscape.x`` runs ``landscape/__init__``
(every instrument), so a leaf inside either package would pull that package into the other.

Example:
    >>> import dnq_landscape_common as common
    >>> issubclass(common.NonFiniteError, FloatingPointError)
    True
"""

from .errors import NonFiniteError

__all__ = ["NonFiniteError"]
