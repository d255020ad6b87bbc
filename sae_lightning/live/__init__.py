"""Live activations (``activations=live``): the LM runs inside training, no disk cache.

``contexts.py`` numbers the text's contexts and splits them (held out / per rank), ``stream.py`` turns a
rank's contexts into shuffled batches through windows of ``activations.buffer_tokens`` rows computed by
the LM (in a background thread), ``datamodule.py`` is the ``LightningDataModule`` with the interface of the
cache's.
"""

from sae_lightning.live.datamodule import LiveDataModule, lm_device

__all__ = ["LiveDataModule", "lm_device"]
