"""SAE architectures as plain ``nn.Module``s, one file each, behind a registry (``sae=<name>``).

Every module of this package is imported here so that its ``@register`` runs: a new architecture file
needs no edit anywhere else in Python.
"""

import importlib
import pkgutil

from sae_lightning.saes.base import SAE, SAEConfig, SAEOutput
from sae_lightning.saes.registry import SAE_REGISTRY, build_sae, config_from_dict, sae_class

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SAE", "SAE_REGISTRY", "SAEConfig", "SAEOutput", "build_sae", "config_from_dict", "sae_class"]
