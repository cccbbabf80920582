"""HTML escaping of every user-supplied string that the report and the figures show.

Example:
    >>> from dnq_landscape_common.html import esc
    >>> esc("<b>resnet20 & 'sgd'</b>")
    '&lt;b&gt;resnet20 &amp; &#x27;sgd&#x27;&lt;/b&gt;'
    >>> esc(3.5)
    '3.5'
"""

from __future__ import annotations

import html

__all__ = ["esc"]


def esc(v) -> str:
    """``str(v)`` with ``&``, ``<``, ``>`` and both quotes escaped (safe in text and attributes)."""
    return html.escape(str(v), quote=True)
