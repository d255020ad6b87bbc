"""Save a checkpoint and stop cleanly when the job is asked to stop: SIGTERM (pre-emption, ``scancel``),
SIGUSR1 (SLURM's ``--signal=USR1@<seconds>`` warning before the time limit) or SIGUSR2 (the same warning as
submitit, i.e. ``hydra/launcher=slurm``, asks SLURM for it).

Lightning's own SIGTERM handling raises out of the loop without saving, and without SLURM's auto-requeue
it leaves SIGUSR1 at its default action, which kills the process. This callback takes these signals over
once training starts. The handler only records the signal; the checkpoint is written at the next step
boundary, where the weights, optimizer, schedules and the data stream position agree with each other.
Under DDP the decision is shared, so every rank stops at the same step even if only one got the signal.
Once the checkpoint is written, :func:`pass_on_signal` hands the signal to the handler that was there
before training (submitit's requeues the job, which then resumes with ``ckpt_path=auto``).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionCheckpoint(Callback):
    """On SIGTERM/SIGUSR1: write ``ckpt_path`` at the next step boundary and stop training.

    After ``fit`` returns, ``saved_step`` is the step saved (None when no signal came) and ``signum`` the
    signal received.
    """

    def __init__(self, ckpt_path: Path) -> None:
        self.ckpt_path = ckpt_path
        self.signum: int | None = None
        self.saved_step: int | None = None
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        log.warning("Received %s: saving a checkpoint after the current step, then stopping",
                    signal.Signals(signum).name)
        self.signum = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installs its handlers just before this hook; ours replace them until training ends.
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._record)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            return
        self.signum = self.signum or signal.SIGTERM  # a rank that got no signal itself
        trainer.save_checkpoint(self.ckpt_path, weights_only=False)  # full state, to resume from
        self.saved_step = trainer.global_step
        trainer.should_stop = True

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, err: BaseException) -> None:
        self._restore_handlers()


def pass_on_signal(signum: int) -> None:
    """Run the Python handler that ``signum`` had before training (e.g. submitit's, which requeues the job
    and exits), now that the checkpoint is saved. Default and ignored dispositions are left alone: the run
    then exits with 128 + signal itself."""
    handler = signal.getsignal(signum)
    if callable(handler):
        log.info("Passing %s on to the job launcher's handler", signal.Signals(signum).name)
        handler(signum, None)
