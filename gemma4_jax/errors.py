"""Errors of the ground floor, importable from every layer."""


class ConfigError(ValueError):
    """A config.json that cannot describe a working Gemma 4 model."""
