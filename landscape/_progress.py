"""The instruments' progress bars: ``tqdm.auto`` (a widget in notebooks), shown only once an
instrument has run for :data:`DELAY` seconds, cleared when it ends, silenced by
``progress=False``.

Example:
    >>> from landscape._progress import DELAY, bar
    >>> with bar(True, total=3, desc="trace") as b:  # nothing shown: it ends before DELAY seconds
    ...     b.update(3)
    >>> b.n, b.delay == DELAY, b.leave  # counted all steps; cleared at the end (leave=False)
    (3, True, False)
    >>> bar(False, total=3, desc="trace").disable  # progress=False
    True
"""

from __future__ import annotations

from tqdm.auto import tqdm

#: seconds an instrument runs before its bar appears (short calls print nothing)
DELAY = 2.0


def bar(progress: bool, total: int | None, desc: str, unit: str = "it"):
    """A progress bar over ``total`` steps named ``desc`` (disabled when ``progress`` is false)."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not progress, delay=DELAY)
