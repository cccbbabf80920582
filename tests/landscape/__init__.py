"""Tests of the landscape package."""
