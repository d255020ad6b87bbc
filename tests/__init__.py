"""Tests, one folder per package of ``sae_lightning`` (``tests/train/`` tests ``sae_lightning/train/``); the
shared modules and the end-to-end runs are tested here. Every folder is a package, so a test module reuses
another's helpers as ``from tests.train.test_resume import ...`` whatever folder pytest collects first."""
