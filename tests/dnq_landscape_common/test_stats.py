"""The mean and standard deviation over seeds (one implementation for tables and figures)."""

import math
import statistics

import pytest

from dnq_landscape_common.stats import seed_stats


def test_matches_the_sample_statistics_and_skips_missing_values():
    vals = [0.91, 0.87, None, 0.95, 0.90]
    s = seed_stats(vals)
    kept = [v for v in vals if v is not None]
    assert s["n"] == 4
    assert s["mean"] == pytest.approx(sum(kept) / 4, rel=1e-15)
    assert s["std"] == pytest.approx(math.sqrt(sum((v - s["mean"]) ** 2 for v in kept) / 3), rel=1e-12)
    assert s["std"] == statistics.stdev(kept)


def test_one_seed_has_no_spread_and_none_has_no_statistics():
    assert seed_stats([0.5, None]) == {"mean": 0.5, "std": None, "n": 1}
    assert seed_stats([]) is None and seed_stats([None, None]) is None
    assert seed_stats(iter([1.0, 3.0])) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
