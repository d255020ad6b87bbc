"""The training stage: one SAE trained from a stream of activations into its run folder.

- ``step.py``: ``train_step``, the one optimisation step (Lightning-free; the benchmarks time it);
- ``sparsity.py``: ``TargetL0``, the controller that steers the sparsity coefficient to ``sae.target_l0``;
- ``module.py``: ``Trainee`` and ``SAEModule``, the ``LightningModule`` that runs the step;
- ``callbacks/``: resampling, the density histogram, the pre-emption checkpoint;
- ``checkpoints.py``: atomic checkpoint writes, their checks on load, the checkpoint a resume continues;
- ``rundir.py``: the run folder (``RunDir``) and its ``summary.json`` (``RunSummary``);
- ``loggers.py``: the CSV and W&B loggers;
- ``run.py``: ``run_training``, one run from a validated config to its folder (what ``train.py`` calls).

Nothing is imported here, so reading a run folder (``rundir.py``) does not import Lightning.
"""
