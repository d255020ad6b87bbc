"""Faults during training: a SIGKILL in the middle of a checkpoint write, NaN/Inf in the loss or the weights,
and a disk that fills up. In each case the last good checkpoint stays usable and nothing bad is written."""

from __future__ import annotations

import math
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from sae_lightning.train.checkpoints import AtomicCheckpointIO, read_checkpoint
from sae_lightning.train.module import SAEModule
from sae_lightning.train.step import NonFiniteError
from tests.train.test_resume import REPO, configure, overrides, train_in_process, write_acts


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 10-step run (checkpoints every 5 steps) to copy and damage or continue."""
    root = tmp_path_factory.mktemp("trained")
    acts = write_acts(root / "acts.npy")
    train_in_process(overrides(acts, 10, **{"trainer.checkpoint_every_n_steps": 5}), root / "run")
    return root


def _copy(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest)
    return dest


def _all_checkpoints_good(ckpt_dir: Path, step: int) -> None:
    files = sorted(ckpt_dir.glob("*.ckpt"))
    assert files
    for f in files:
        assert read_checkpoint(f)["global_step"] == step, f.name  # complete, digest ok, finite


# ----- atomic writes ------------------------------------------------------------------------------------
_WRITER = """
import sys, torch
from pathlib import Path
from sae_lightning.train.checkpoints import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), Path(sys.argv[1])
g = torch.Generator().manual_seed(0)
for step in range(1, 1000):
    ckpt = {"state_dict": {"w": torch.randn(4096, 2048, generator=g)}, "global_step": step,
            "hyper_parameters": {"d_in": 2048}}
    print(step, flush=True)
    io.save_checkpoint(ckpt, path)
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_never_leaves_a_corrupt_file(tmp_path: Path) -> None:
    """A process saving 32 MiB checkpoints in a loop is SIGKILLed 20 ms into its third save (inside the
    write): the file under the checkpoint name is the complete second one, with a valid digest."""
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    while int(proc.stdout.readline()) < 3:
        pass
    time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert read_checkpoint(path)["global_step"] in (2, 3)
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]


# ----- NaN / Inf ----------------------------------------------------------------------------------------
def test_inf_loss_stops_with_step_and_quantity_and_keeps_the_last_good_checkpoint(trained: Path,
                                                                                  tmp_path: Path) -> None:
    """The run continues on activations that overflow float32 (1e30): the first step's loss is Inf, so
    training stops with an error naming the step and the loss, and nothing is written over the checkpoints
    of the good steps."""
    root = _copy(trained, tmp_path / "t")
    huge = root / "huge.npy"
    np.save(huge, np.full((2048, 16), 1e30, np.float32))
    over = overrides(huge, 20, **{"trainer.checkpoint_every_n_steps": 1, "activations.normalize": "false",
                                  "ckpt_path": "last"})
    with pytest.raises(NonFiniteError, match=r"Non-finite loss at step 10: loss=inf.*last good checkpoint"):
        train_in_process(over, root / "run")
    _all_checkpoints_good(root / "run" / "checkpoints", 10)
    earlier_log = (trained / "run" / "csv" / "metrics.csv").read_text()
    assert (root / "run" / "csv" / "metrics-1.csv").read_text() == earlier_log


def test_checkpoint_of_nan_weights_is_refused_naming_step_and_weight(trained: Path, tmp_path: Path) -> None:
    """Weights that went NaN are never written: the save raises (naming step and tensor) and the previous
    checkpoint at that path is untouched."""
    root = _copy(trained, tmp_path / "t")
    path = root / "run" / "checkpoints" / "last.ckpt"
    before = path.read_bytes()
    _, config_dict = configure(overrides(root / "acts.npy", 10))
    module = SAEModule(config_dict, d_in=16)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, plugins=[AtomicCheckpointIO()],
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    with torch.no_grad():
        module.sae.W_dec[3, 1] = math.inf
    with pytest.raises(NonFiniteError, match=r"Non-finite weights at step 0: sae\.W_dec hold NaN/Inf.*"
                                             r"without writing last\.ckpt"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before


# ----- a full disk --------------------------------------------------------------------------------------
def _file_size_limit(limit: int):
    """Make every write past ``limit`` bytes fail with EFBIG, as on a disk that has just filled up."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_failed_checkpoint_write_is_reported_and_the_previous_checkpoint_is_kept(trained: Path,
                                                                                 tmp_path: Path) -> None:
    """train.py continuing a run when no file may grow past 16 KiB (a 25 KiB checkpoint cannot be written):
    the error names the checkpoint and what to do, last.ckpt is byte-identical and no partial file remains."""
    root = _copy(trained, tmp_path / "t")
    ckpt_dir = root / "run" / "checkpoints"
    before = (ckpt_dir / "last.ckpt").read_bytes()
    over = overrides(root / "acts.npy", 20, **{"trainer.checkpoint_every_n_steps": 5, "ckpt_path": "last"})
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *over, f"hydra.run.dir={root / 'run'}"],
                          cwd=root, capture_output=True, text=True, timeout=600,
                          preexec_fn=_file_size_limit(16 * 1024))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for words in ("could not write checkpoint", "File too large", "hydra.run.dir"):
        assert words in out, out[-3000:]
    assert (ckpt_dir / "last.ckpt").read_bytes() == before
    assert not list(ckpt_dir.glob(".*tmp*"))
    _all_checkpoints_good(ckpt_dir, 10)
