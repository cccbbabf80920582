"""The mean and standard deviation over seeds, as every table and figure of a study reports them.

One implementation, so that a table and a figure of the same numbers agree, also for one seed
(standard deviation ``None``: not measured, rather than 0).

Example:
    >>> from dnq_landscape_common.stats import seed_stats
    >>> s = seed_stats([0.9, 0.7, None])
    >>> round(s["mean"], 6), round(s["std"], 6), s["n"]
    (0.8, 0.141421, 2)
    >>> seed_stats([0.5])
    {'mean': 0.5, 'std': None, 'n': 1}
    >>> seed_stats([None]) is None
    True
"""

from __future__ import annotations

import statistics

__all__ = ["seed_stats"]


def seed_stats(values) -> dict | None:
    """``{"mean", "std", "n"}`` of the values that are not ``None``: the sample standard deviation
    (``n - 1``), ``None`` for a single value; ``None`` when no value is left."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}
