"""Tests of the leaf layer (dnq_landscape_common)."""
