"""Errors shared by every layer (config, workloads, engine), defined below all of them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message names the full key and the value."""


class ResultsError(ValueError):
    """A results directory cannot be read: a table is missing or is not a readable Parquet file (the
    message names the file and the cause)."""
