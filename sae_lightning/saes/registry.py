"""Name -> SAE class registry, so ``sae.architecture=<name>`` selects a file in ``saes/``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from sae_lightning.config import SAEConfig
    from sae_lightning.saes.base import SAE

SAE_REGISTRY: dict[str, type[SAE]] = {}

_T = TypeVar("_T", bound="type[SAE]")


def register(name: str) -> Callable[[_T], _T]:
    """Class decorator adding an SAE class to ``SAE_REGISTRY`` under ``name``."""

    def add(cls: _T) -> _T:
        if name in SAE_REGISTRY:
            raise ValueError(f"SAE architecture {name!r} is registered twice")
        SAE_REGISTRY[name] = cls
        return cls

    return add


def build_sae(cfg: SAEConfig, d_in: int) -> SAE:
    """Instantiate the architecture named by ``cfg.architecture`` with ``cfg.resolve_d_sae(d_in)`` latents."""
    try:
        cls = SAE_REGISTRY[cfg.architecture]
    except KeyError:
        known = ", ".join(sorted(SAE_REGISTRY))
        raise ValueError(f"Unknown sae.architecture={cfg.architecture!r}: choose one of {known}") from None
    return cls(cfg, d_in)
