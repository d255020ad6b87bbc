"""Data-parallel training on CPU (gloo): disjoint rows per rank, identical weights after resampling, reduced
dead-latent counts, a 2-process run equal to a 1-process run with the doubled batch, DDP inside a sweep.

In-process runs use ``ddp_spawn`` (``ddp`` re-executes pytest: see ../shared/docs/field-notes.md); the
``trainer=ddp_sim`` runs are real ``python train.py`` processes, as users run them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from sae_lightning.cache.datamodule import ActivationDataModule
from sae_lightning.config import ActivationsConfig, TrainConfig
from sae_lightning.saes.batchtopk import BatchTopKConfig
from sae_lightning.train.callbacks import ResampleDeadLatents
from sae_lightning.train.module import SAEModule
from tests.sweep.test_sweep import train_py

N_ROWS, D = 512, 16


def _array(path: Path) -> Path:
    """Rows with their index in column 0 (``1 + i / N``), so a batch tells which rows it holds."""
    g = np.random.default_rng(0)
    x = (g.random((N_ROWS, 48)) * (g.random((N_ROWS, 48)) < 0.1)) @ g.normal(size=(48, D))
    x[:, 0] = 1 + np.arange(N_ROWS) / N_ROWS
    np.save(path, x.astype(np.float32))
    return path


class _RecordRank(L.Callback):
    """Kills latents 0..7 at the start (so resampling has work), records the row ids of every batch, and
    saves what this rank ends with."""

    def __init__(self, out: Path) -> None:
        self.out, self.rows = out, []

    def on_fit_start(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        with torch.no_grad():
            pl_module.sae.b_enc[:8] = -1e3
        self.w_dec0 = pl_module.sae.W_dec.detach().clone()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: SAEModule, batch: torch.Tensor, i: int):
        ids = torch.round((batch[:, 0] - 1) * N_ROWS).long()  # batches are raw rows
        self.rows.extend(ids.tolist())

    def on_train_end(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"rows": self.rows, "state": state, "w_dec0": self.w_dec0},
                   self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ranks_read_disjoint_rows_and_end_with_identical_weights(tmp_path):
    path = _array(tmp_path / "x.npy")
    cfg = TrainConfig(batch_size=32, train_tokens=32 * 8, lr=1e-2, l1=1.0)
    cfg.sae.dict_mult = 2
    cfg.sae.target_l0 = 4.0  # its controller reads the L0 averaged over ranks: same state on every rank
    cfg.latents.dead_window_tokens = 64
    acts_cfg = ActivationsConfig(source="file", path=str(path), val_fraction=0.5, eval_fraction=0.0)
    dm = ActivationDataModule(path, acts_cfg, batch_size=32, seed=0)
    module = SAEModule(asdict(cfg), d_in=dm.d_in)
    module.sae.set_input_scale(dm.norm_scale)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=8, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[ResampleDeadLatents([4], 128, seed=0),
                                                        _RecordRank(tmp_path)])
    trainer.fit(module, datamodule=dm)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    train_rows = N_ROWS // 2  # val_fraction=0.5 holds out the last half (by shard)
    assert len(r0["rows"]) == len(r1["rows"]) == 8 * 32  # 2 epochs of each rank's half
    assert not set(r0["rows"]) & set(r1["rows"])
    assert set(r0["rows"]) | set(r1["rows"]) == set(range(train_rows))

    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key  # weights, dead counters, controller: bit-identical
    assert int(r0["state"]["target_l0.updates"]) == 8
    w_dec = r0["state"]["sae.W_dec"]
    assert not torch.allclose(w_dec[:8], r0["w_dec0"][:8])  # the dead latents were resampled...
    assert torch.allclose(w_dec[:8].norm(dim=1), torch.ones(8), atol=1e-5)
    assert int(r0["state"]["latents.window_tokens"]) == 8 * 32 * 2  # ...and firing counted over both ranks


@pytest.mark.slow
def test_batchtopk_ranks_share_one_threshold(tmp_path):
    """BatchTopK's inference threshold is estimated from the smallest kept activation over EVERY rank's
    batch (an all-reduce in its forward): the ranks end with identical weights and threshold buffers."""
    path = _array(tmp_path / "x.npy")
    cfg = TrainConfig(batch_size=32, train_tokens=32 * 8, lr=1e-2, sae=BatchTopKConfig(dict_mult=2, k=4))
    cfg.latents.dead_window_tokens = 64  # latents 0..7 are killed: AuxK runs too
    dm = ActivationDataModule(path, ActivationsConfig(source="file", path=str(path), val_fraction=0.5),
                              batch_size=32, seed=0)
    module = SAEModule(asdict(cfg), d_in=dm.d_in)
    module.sae.set_input_scale(dm.norm_scale)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=8, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[_RecordRank(tmp_path)])
    trainer.fit(module, datamodule=dm)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not set(r0["rows"]) & set(r1["rows"])  # the ranks saw different rows ...
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key  # ... and still agree on every weight and buffer
    assert float(r0["state"]["sae.threshold"]) > 0 and int(r0["state"]["sae.threshold_batches"]) == 8


COMMON = ["activations=file", "activations.val_fraction=0.5", "activations.eval_fraction=0",
          "activations.shuffle_buffer=0", "logger=csv",
          "sae.dict_mult=4", "lr=1e-2", "trainer.progress_bar=false", "trainer.val_every_n_steps=5",
          "trainer.limit_val_batches=1"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The 1-process references of the ``trainer=ddp_sim`` tests, one sweep: relu, gated and JumpReLU (at
    their default coefficients) on the doubled batch (256 rows: the whole training split every step)."""
    root = tmp_path_factory.mktemp("one_process")
    x = _array(root / "x.npy")
    train_py("-m", *COMMON, f"activations.path={x}", "trainer=cpu", "batch_size=256", "train_tokens=1280",
             "sae=relu,gated,jumprelu", f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    return root / "sweep"


def final(run: Path) -> dict[str, torch.Tensor]:
    """The final weights of a run that finished its 5 steps."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 5, run
    return torch.load(run / "checkpoints" / "final.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_ddp_sim_in_a_sweep_matches_one_process_with_the_doubled_batch(tmp_path, one_process):
    """Every step sees the whole training split (256 rows: 1 process x 256, or 2 ranks x 128 disjoint rows),
    so with gradients averaged over ranks both runs take the same steps. Tolerance: 1e-5 absolute on every
    weight after 5 Adam steps at lr 1e-2 (float32 summation order; seen here: 1.2e-7)."""
    x = _array(tmp_path / "x.npy")
    sweep = tmp_path / "sweep"
    proc = train_py("-m", *COMMON, f"activations.path={x}", "trainer=ddp_sim", "batch_size=128",
                    "train_tokens=640", "l1=-1,5", f"hydra.sweep.dir={sweep}", cwd=tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["sweep"]  # no second sweep
    assert "runs in a fresh process (DDP)" in proc.stderr + proc.stdout
    failed = json.loads((sweep / "000_l1=-1" / "summary.json").read_text())  # and the next job did not hang
    assert failed["status"] == "failed" and "ConfigError" in failed["error"]
    ddp = json.loads((sweep / "001_l1=5" / "summary.json").read_text())
    one = json.loads((one_process / "000_sae=relu" / "summary.json").read_text())
    assert ddp["config"]["l1"] == one["config"]["l1"] == 5
    assert ddp["tokens"] == one["tokens"] == 1280

    w_ddp, w_one = final(sweep / "001_l1=5"), final(one_process / "000_sae=relu")
    for key in ("sae.W_enc", "sae.b_enc", "sae.W_dec", "sae.b_dec"):
        torch.testing.assert_close(w_ddp[key], w_one[key], atol=1e-5, rtol=0)
    for key in ("val/l0", "val/mse", "val/nmse", "val/explained_variance"):  # merged over ranks: the set's
        assert ddp["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5)


@pytest.mark.slow
def test_ddp_sim_trains_the_newer_per_row_architectures(tmp_path, one_process):
    """``trainer=ddp_sim`` (two real ranks) trains gated and JumpReLU from the CLI. They are per-row like
    relu, so they end with the weights of one process on the doubled batch (same tolerance as above;
    JumpReLU's thresholds too, which start from the data sample on every rank: the sparse start). The
    BatchTopK family selects per rank and shares its threshold over the ranks:
    ``test_batchtopk_ranks_share_one_threshold``."""
    x = _array(tmp_path / "x.npy")
    sweep = tmp_path / "sweep"
    train_py("-m", *COMMON, f"activations.path={x}", "trainer=ddp_sim", "batch_size=128", "train_tokens=640",
             "sae=gated,jumprelu", f"hydra.sweep.dir={sweep}", cwd=tmp_path)

    per_row = {"000_sae=gated": ("001_sae=gated", ("sae.r_mag", "sae.b_mag")),
               "001_sae=jumprelu": ("002_sae=jumprelu", ("sae.threshold",))}  # ddp job: (1-process job, own)
    for ddp_job, (one_job, own) in per_row.items():
        ddp, one = final(sweep / ddp_job), final(one_process / one_job)
        for key in ("sae.W_enc", "sae.b_enc", "sae.W_dec", "sae.b_dec", *own):
            torch.testing.assert_close(ddp[key], one[key], atol=1e-5, rtol=0)
