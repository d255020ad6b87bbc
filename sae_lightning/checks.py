"""Config validation shared by every dataclass config, and ``UserError``, the base of the errors a user can
fix (Hydra-free, so ``saes/`` can use it alone)."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Something the user gave or asked for cannot be used (a config value, a file, a checkpoint, a model);
    the message names it and what to do. ``train.py``, ``evaluate.py`` and ``python -m
    sae_lightning.cache`` print the message alone, with no traceback (``sae_lightning.console``)."""


class ConfigError(UserError, ValueError):
    """A configuration value is out of range; the message names the key and the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory named in the config does not exist; the message names the key and the path."""


class UnsupportedFormatError(UserError, NotImplementedError):
    """An export format cannot hold what is asked of it (an architecture, a transcoder, a layer set); the
    message names the format and what it lacks."""


def check(ok: bool, key: str, value: Any, why: str) -> None:
    """Raise ``ConfigError`` naming ``key=value`` and ``why`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"Invalid config value {key}={value!r}: {why}")
