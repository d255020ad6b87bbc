"""Config validation shared by every dataclass config (Hydra-free, so ``saes/`` can use it alone)."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the key and the fix."""


def check(ok: bool, key: str, value: Any, why: str) -> None:
    """Raise ``ConfigError`` naming ``key=value`` and ``why`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"Invalid config value {key}={value!r}: {why}")
