"""Errors shared by every layer (config, workloads, engine), defined below all of them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message names the full key and the value."""
