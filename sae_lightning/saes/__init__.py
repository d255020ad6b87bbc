"""SAE architectures as plain ``nn.Module``s behind a registry (``sae.architecture=<name>``)."""

from sae_lightning.saes import jumprelu, relu, topk  # noqa: F401  (importing registers them)
from sae_lightning.saes.base import SAE, SAEOutput
from sae_lightning.saes.registry import SAE_REGISTRY, build_sae

__all__ = ["SAE", "SAE_REGISTRY", "SAEOutput", "build_sae"]
