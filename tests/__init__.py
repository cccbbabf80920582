"""The test suite (its tree mirrors the source: tests/dnq, tests/landscape)."""
