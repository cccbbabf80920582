"""The instruments' progress bars: ``tqdm.auto`` (a widget in notebooks), shown only once an
instrument has run for :data:`DELAY` seconds, cleared when it ends, silenced by
``progress=False``."""

from __future__ import annotations

from tqdm.auto import tqdm

#: seconds an instrument runs before its bar appears (short calls print nothing)
DELAY = 2.0


def bar(progress: bool, total: int | None, desc: str, unit: str = "it"):
    """A progress bar over ``total`` steps named ``desc`` (disabled when ``progress`` is false)."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not progress, delay=DELAY)
