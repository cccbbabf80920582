"""Re-export of :func:`dnq_landscape_common.precision.full_precision` (its home since the
leaf layer was split out; this path keeps working).

Example:
    >>> from landscape.precision import full_precision
    >>> from dnq_landscape_common.precision import full_precision as leaf
    >>> full_precision is leaf
    True
"""

from dnq_landscape_common.precision import full_precision

__all__ = ["full_precision"]
