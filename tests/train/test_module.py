"""The LightningModule, the Lightning-free training step it runs, and training-time callbacks, on small
in-memory data."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from sae_lightning.config import TrainConfig
from sae_lightning.saes import build_sae, config_from_dict
from sae_lightning.train.callbacks import resample_dead_latents
from sae_lightning.train.module import SAEModule, lr_lambda
from sae_lightning.train.step import LatentStats, NonFiniteError, train_step


class _Rows(IterableDataset):
    def __init__(self, data: torch.Tensor, batch: int) -> None:
        self.data, self.batch = data, batch

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield self.data[torch.randint(len(self.data), (self.batch,), generator=g)]


class _DM(L.LightningDataModule):
    """Minimal stand-in exposing what SAEModule uses of a datamodule: batches and ``sample``."""

    def __init__(self, data: torch.Tensor, batch: int) -> None:
        super().__init__()
        self.data, self.batch = data, batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Rows(self.data, self.batch), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(list(self.data[: 4 * self.batch].split(self.batch)), batch_size=None)

    def sample(self, n: int) -> torch.Tensor:
        return self.data[:n]


def _config(**over) -> dict:
    cfg = TrainConfig(batch_size=64, train_tokens=64 * 60, lr=3e-3, l1=0.5, **over)
    cfg.sae.dict_mult = 4
    cfg.latents.dead_window_tokens = 64 * 5
    return asdict(cfg)


def _data(n: int = 2048, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    dictionary = torch.randn(48, d, generator=g)
    codes = torch.rand(n, 48, generator=g) * (torch.rand(n, 48, generator=g) < 0.06)
    return codes @ dictionary


def _fit(module: SAEModule, data: torch.Tensor, steps: int) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=steps, check_val_every_n_epoch=None,
                        limit_val_batches=2, num_sanity_val_steps=0, log_every_n_steps=5)
    trainer.fit(module, datamodule=_DM(data, 64))
    return trainer


def test_training_reduces_loss_and_keeps_decoder_rows_unit_norm() -> None:
    data = _data()
    module = SAEModule(_config(), d_in=16)
    with torch.no_grad():
        before = module.sae(data[:256], sparsity_coeff=0.5).loss.item()
    trainer = _fit(module, data, 60)
    after = module.sae(data[:256], sparsity_coeff=0.5).loss.item()
    assert after < 0.5 * before
    torch.testing.assert_close(module.sae.W_dec.norm(dim=1), torch.ones(module.sae.d_sae))
    assert 0.0 < trainer.callback_metrics["val/explained_variance"] <= 1.0
    # b_dec was initialised from the data (not left at zero)
    assert module.sae.b_dec.abs().sum() > 0


def test_dead_tracking_counts_tokens_since_last_fire() -> None:
    stats = LatentStats(10, dead_window_tokens=64 * 5)
    counts = torch.zeros(10)
    counts[0] = 3
    for i in range(5):
        assert not stats.dead_mask().any(), i  # not yet a whole window without firing
        stats.update(counts, 64)
    dead = stats.dead_mask()
    assert not dead[0] and dead[1:].all()
    assert stats.densities()[0] == pytest.approx(3 / 64)
    assert stats.densities(reset=True)[0] == pytest.approx(3 / 64) and stats.densities()[0] == 0


def test_train_step_is_project_clip_step_renormalise() -> None:
    """``train_step`` by hand: normalize, loss, backward, project, clip at the norm given, Adam, renorm."""
    torch.manual_seed(0)
    cfg = TrainConfig().sae
    cfg.dict_mult = 2
    sae, ref = build_sae(cfg, 8), build_sae(cfg, 8)
    ref.load_state_dict(sae.state_dict())
    for m in (sae, ref):
        m.set_input_scale(0.5)
    x = torch.randn(64, 8) * 6
    opt, ref_opt = torch.optim.Adam(sae.parameters(), lr=1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2)
    stats = LatentStats(sae.d_sae, 10**6)
    out = train_step(sae, opt, x, stats, coeff=0.7, grad_clip=0.05, step=0)
    loss = ref(x * 0.5, sparsity_coeff=0.7).loss
    loss.backward()
    ref.before_optimizer_step()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    assert norm > 0.05  # the clip was active
    ref_opt.step()
    ref.after_optimizer_step()
    torch.testing.assert_close(out.loss, loss)
    for (name, p), q in zip(sae.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae))
    assert int(stats.window_tokens) == 64 and torch.equal(stats.window_fire_counts.long(), out.fire_counts)


def test_lr_schedule_warmup_and_linear_decay() -> None:
    cfg = TrainConfig(batch_size=1, train_tokens=100)
    cfg.optim.lr_warmup_steps, cfg.optim.lr_decay, cfg.optim.lr_decay_start = 10, "linear", 0.8
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(50) == 1.0
    assert f(90) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_l1_warmup_scales_sparsity_coefficient() -> None:
    module = SAEModule(_config(), d_in=16)
    module.cfg.optim.l1_warmup_steps = 10
    assert module.sparsity_coeff() == pytest.approx(0.5 * 0.1)


@pytest.mark.parametrize(("arch", "expected"), [("relu", 0.5), ("relu_dn", 0.5), ("topk", 0.0),
                                                ("jumprelu", 2.0), ("gated", 0.5)])
def test_each_architecture_takes_its_own_sparsity_coefficient(arch: str, expected: float) -> None:
    """The root ``l1`` is the L1 architectures' coefficient; JumpReLU's is ``sae.l0_coeff``; TopK has none."""
    config = _config()
    own = {"l0_coeff": 2.0} if arch == "jumprelu" else {}
    config["sae"] = {"architecture": arch, "dict_mult": 4, **own}
    assert SAEModule(config, d_in=16).sparsity_coeff() == pytest.approx(expected)


def test_jumprelu_thresholds_step_at_their_own_learning_rate() -> None:
    """The trainer's optimizer takes ``sae.param_groups``: Adam's first step moves each parameter by ``lr``
    times the sign of its gradient (|g| >> eps), so with ``sae.threshold_lr_mult=10`` the thresholds with a
    gradient move by exactly 10 lr and no other weight by more than lr."""
    config = _config()
    config["sae"] = {"architecture": "jumprelu", "dict_mult": 4, "init_threshold": 0.3,
                     "threshold_lr_mult": 10.0}
    module = SAEModule(config, d_in=16)
    sae, lr = module.sae, config["lr"]
    opt = module.configure_optimizers()["optimizer"]
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    sae(_data()[:256] * 3, sparsity_coeff=1.0).loss.backward()
    moved = sae.threshold.grad.abs() > 1e-4
    assert moved.sum() >= 10
    opt.step()
    step = (sae.threshold.detach() - before["threshold"])[moved]
    torch.testing.assert_close(step.abs(), torch.full_like(step, 10 * lr), rtol=1e-3, atol=0)
    for name, p in sae.named_parameters():
        if name != "threshold":
            assert (p.detach() - before[name]).abs().max() <= lr * (1 + 1e-4), name


def test_grad_clip_scope_reaches_the_training_step() -> None:
    """``optim.grad_clip_scope`` is what the trainer's step clips by (the clipping itself is tested in
    test_saes_jumprelu.py): the same seeded JumpReLU run trains to other weights under ``global`` than
    under ``group``, and to the same weights when run twice under one scope."""
    weights = []
    for scope in ("group", "global", "group"):
        torch.manual_seed(0)
        config = _config()
        config["sae"] = {"architecture": "jumprelu", "dict_mult": 4, "init_threshold": 0.3, "l0_coeff": 50.0}
        config["optim"]["grad_clip_scope"] = scope
        module = SAEModule(config, d_in=16)
        _fit(module, _data() * 3, 4)
        weights.append(module.sae.W_enc.detach().clone())
    assert not torch.equal(weights[0], weights[1])
    torch.testing.assert_close(weights[0], weights[2], rtol=0, atol=0)


def test_batchtopk_logs_its_inference_threshold_and_relu_nothing_extra() -> None:
    """Logged at steps 0 and 5 of 6 (``log_every_n_steps=5``): the last value is the final threshold."""
    config = _config()
    config["sae"] = {"architecture": "batchtopk", "dict_mult": 4, "k": 4}
    module = SAEModule(config, d_in=16)
    trainer = _fit(module, _data(), 6)
    assert trainer.callback_metrics["train/threshold"].item() == pytest.approx(module.sae.threshold.item())
    assert module.sae.threshold.item() > 0
    relu = _fit(SAEModule(_config(), d_in=16), _data(), 6)
    assert "train/threshold" not in relu.callback_metrics and "train/sparsity_coeff" in relu.callback_metrics


def test_module_tells_the_sae_its_progress_and_p_annealing_trains() -> None:
    """``set_progress(step / max_steps)`` before each step: at the last of 60 steps p-annealing (from 0 to
    the end, 1 -> 0.2) has p = 1 - 0.8 * 59/60; the run stays finite and ends sparser than it started."""
    config = _config()
    config["sae"].update(p_end=0.2, p_anneal_start=0.0)
    module = SAEModule(config, d_in=16)
    data = _data()
    l0_start = (module.sae.encode(data) > 0).float().sum(-1).mean()
    _fit(module, data, 60)
    assert module.sae.p == pytest.approx(1 - 0.8 * 59 / 60)
    assert all(torch.isfinite(p).all() for p in module.sae.parameters())
    assert (module.sae.encode(data) > 0).float().sum(-1).mean() < l0_start


def test_nan_loss_stops_with_step_and_quantity() -> None:
    data = _data()
    data[5:] = float("nan")
    module = SAEModule(_config(), d_in=16)
    with pytest.raises(NonFiniteError, match=r"step \d+.*non-finite"):
        _fit(module, data, 20)


def test_resampling_follows_towards_monosemanticity() -> None:
    torch.manual_seed(0)
    cfg = TrainConfig().sae
    cfg.dict_mult = 2
    sae = build_sae(cfg, 8)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(256, 8)
    sae(x, sparsity_coeff=1.0).loss.backward()
    opt.step()
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    alive_norm = sae.W_enc.norm(dim=0)[~dead].mean()
    old_alive_dec = sae.W_dec[~dead].clone()
    chosen = resample_dead_latents(sae, dead, x, opt, generator=torch.Generator().manual_seed(0))
    direction = chosen / chosen.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(sae.W_dec[dead], direction)
    torch.testing.assert_close(sae.W_enc[:, dead].T, direction * 0.2 * alive_norm)
    assert (sae.b_enc[dead] == 0).all()
    torch.testing.assert_close(sae.W_dec[~dead], old_alive_dec)
    assert (opt.state[sae.W_enc]["exp_avg"][:, dead] == 0).all()
    assert (opt.state[sae.W_dec]["exp_avg_sq"][dead] == 0).all()
    assert (opt.state[sae.W_dec]["exp_avg_sq"][~dead] != 0).any()
    # every chosen row is one of the inputs
    assert all((x == row).all(-1).any() for row in chosen)


@pytest.mark.parametrize(("arch", "start"), [("gated", {"r_mag": 0.0, "b_mag": 0.0}),
                                             ("jumprelu", {"threshold": 1.476})])  # the sparse start
def test_resampling_puts_an_architectures_own_latent_parameters_back_at_their_start(arch: str,
                                                                                     start: dict) -> None:
    """Gated's magnitude path and JumpReLU's threshold of a resampled latent restart as a new latent's do
    (Adam's moments included); the other latents keep theirs."""
    torch.manual_seed(0)
    sae = build_sae(config_from_dict({"architecture": arch, "dict_mult": 2}), 8)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-1)
    x = torch.randn(256, 8)
    sae(x, sparsity_coeff=1.0).loss.backward()
    opt.step()
    with torch.no_grad():  # as if trained away from the start, with momentum everywhere
        for name in start:
            getattr(sae, name).uniform_(-2.0, -1.0)
            opt.state[getattr(sae, name)]["exp_avg"].fill_(1.0)
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    before = {name: getattr(sae, name).detach().clone() for name in start}
    resample_dead_latents(sae, dead, x, opt, generator=torch.Generator().manual_seed(0))
    for name, value in start.items():
        param = getattr(sae, name)
        torch.testing.assert_close(param[dead], torch.full((3,), value))
        assert torch.equal(param[~dead], before[name][~dead])
        moments = opt.state[param]["exp_avg"]
        assert (moments[dead] == 0).all() and (moments[~dead] == 1).all()


def test_resampling_prefers_high_loss_inputs() -> None:
    torch.manual_seed(0)
    cfg = TrainConfig().sae
    cfg.dict_mult = 2
    sae = build_sae(cfg, 8)
    x = torch.randn(100, 8) * 0.01
    x[17] = torch.randn(8) * 100  # the only input the SAE reconstructs badly
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[:4] = True
    chosen = resample_dead_latents(sae, dead, x, None, generator=torch.Generator().manual_seed(0))
    assert all((row == x[17]).all() for row in chosen)
