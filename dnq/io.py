"""Re-export of the atomic writers and the safe checkpoint loader of
:mod:`dnq_landscape_common.io` (their home since the leaf layer was split out).

Example:
    >>> import dnq.io, dnq_landscape_common.io
    >>> dnq.io.atomic_write_json is dnq_landscape_common.io.atomic_write_json
    True
"""

from dnq_landscape_common.io import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    safe_load,
)

__all__ = ["atomic_torch_save", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "safe_load"]
