"""Errors that are the user's to fix: the CLI prints them in one line and exits 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid run configuration or input (one line per problem)."""


class StageError(RuntimeError):
    """An artifact is missing, stale, or does not match what this stage expects."""
