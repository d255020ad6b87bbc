"""Name -> SAE class registry: ``sae=<name>`` selects a file in ``saes/`` and its config class.

Adding an architecture is one file in ``saes/`` (a config dataclass + an ``SAE`` subclass decorated with
``@register("<name>")``, imported automatically by ``saes/__init__``) plus one preset
``conf/sae/<name>.yaml``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sae_lightning.checks import ConfigError

if TYPE_CHECKING:
    from sae_lightning.saes.base import SAE, SAEConfig

SAE_REGISTRY: dict[str, type[SAE]] = {}

_T = TypeVar("_T", bound="type[SAE]")


def register(name: str) -> Callable[[_T], _T]:
    """Class decorator adding an SAE class to ``SAE_REGISTRY`` under ``name`` (its config class's
    ``architecture`` default must be that name)."""

    def add(cls: _T) -> _T:
        if name in SAE_REGISTRY:
            raise ValueError(f"SAE architecture {name!r} is registered twice")
        if cls.config_class().architecture != name:
            raise ValueError(f"{cls.config_class.__name__}.architecture must default to {name!r}")
        SAE_REGISTRY[name] = cls
        return cls

    return add


def sae_class(architecture: str) -> type[SAE]:
    """The registered class, or a ``ConfigError`` listing the known names."""
    try:
        return SAE_REGISTRY[architecture]
    except KeyError:
        known = ", ".join(sorted(SAE_REGISTRY))
        raise ConfigError(f"Unknown SAE architecture {architecture!r}: choose one of {known} "
                          "(sae=<name>)") from None


def config_from_dict(values: dict[str, Any]) -> SAEConfig:
    """The architecture's config from plain values (a checkpoint, ``cfg.json``); a key that architecture
    does not have fails naming it."""
    cls = sae_class(str(values.get("architecture"))).config_class
    known = {f.name for f in dataclasses.fields(cls)}
    foreign = sorted(set(values) - known)
    if foreign:
        raise ConfigError(f"sae.{foreign[0]} is not a key of {cls.__name__} (sae={values['architecture']}); "
                          f"its keys: {', '.join(sorted(known))}")
    return cls(**values)


def build_sae(cfg: SAEConfig, d_in: int, d_out: int | None = None) -> SAE:
    """Instantiate ``cfg.architecture`` for ``d_in``-wide activations; a transcoder to ``d_out``-wide targets
    when ``d_out`` is given."""
    cls = sae_class(cfg.architecture)
    if not isinstance(cfg, cls.config_class):
        raise ConfigError(f"sae={cfg.architecture} needs a {cls.config_class.__name__}, got "
                          f"{type(cfg).__name__}")
    return cls(cfg, d_in, d_out=d_out)
