"""Training-time interventions, each a Lightning callback with its own config switch."""

from sae_lightning.train.callbacks.density import DensityMonitor
from sae_lightning.train.callbacks.preemption import PreemptionCheckpoint
from sae_lightning.train.callbacks.resample import ResampleDeadLatents, resample_dead_latents

__all__ = ["DensityMonitor", "PreemptionCheckpoint", "ResampleDeadLatents", "resample_dead_latents"]
