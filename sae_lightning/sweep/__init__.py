"""Sweeps: many training runs under Hydra's multirun, and their comparison.

- ``multirun.py``: job folder names, W&B grouping, failure capture, DDP jobs, the end-of-sweep callback;
- ``compare.py``: a sweep folder's runs as one table, frontier and interpretability plots, an HTML page
  (``python -m sae_lightning.sweep.compare <sweep dir>``).

Nothing is imported here, so the callback Hydra instantiates before every run (``multirun.SweepCallback``)
imports only what ``multirun.py`` needs.
"""
