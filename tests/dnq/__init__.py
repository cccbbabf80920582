"""Tests of the dnq package."""
