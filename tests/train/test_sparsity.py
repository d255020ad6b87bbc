"""The target-L0 controller (sparsity.py): its update rule by hand, convergence on a toy L0(coefficient)
with lag and noise, and its place in SAEModule (coefficient, checkpointed state)."""

from __future__ import annotations

import math

import pytest
import torch

from sae_lightning.checks import ConfigError
from sae_lightning.train.module import SAEModule
from sae_lightning.train.sparsity import EMA_WEIGHT, MAX_STEP, RATE, TargetL0
from tests.train.test_module import _config, _data, _fit


def test_update_rule_by_hand() -> None:
    ctl = TargetL0(20.0)
    ctl.update(torch.tensor(40.0))  # the first L0 seeds the average
    assert float(ctl.ema) == 40.0
    assert float(ctl.log_scale) == pytest.approx(min(MAX_STEP, RATE * math.log(2.0)))
    before = float(ctl.log_scale)
    ctl.update(10.0)
    ema = 40.0 + EMA_WEIGHT * (10.0 - 40.0)
    assert float(ctl.ema) == pytest.approx(ema)
    assert float(ctl.log_scale) - before == pytest.approx(RATE * math.log(ema / 20.0))
    ctl.update(1e6)  # a huge error moves the coefficient by at most exp(MAX_STEP)
    assert float(ctl.log_scale) - before == pytest.approx(RATE * math.log(ema / 20.0) + MAX_STEP)
    ctl.update(0.0)  # nothing fired: a finite step, not log(0)
    assert math.isfinite(float(ctl.log_scale))
    assert ctl.scale() == pytest.approx(math.exp(float(ctl.log_scale)))


def test_two_sided_controller_never_lowers_the_coefficient_below_its_start() -> None:
    """With a two-sided term (JumpReLU's) an L0 under the target leaves the coefficient at its start
    (``log_scale`` 0) instead of winding it down; above the target it rises as the one-sided controller's,
    and falls back to the start, not below."""
    one, two = TargetL0(100.0), TargetL0(100.0, two_sided=True)
    for ctl in (one, two):
        for _ in range(20):
            ctl.update(10.0)
    assert float(one.log_scale) == pytest.approx(-20 * MAX_STEP)
    assert float(two.log_scale) == 0.0 and two.scale() == 1.0
    two.update(500.0)  # the average moves from 10 towards 500, still under 100: no change
    assert float(two.ema) == pytest.approx(10.0 + EMA_WEIGHT * 490.0) and float(two.log_scale) == 0.0
    for _ in range(30):
        two.update(1000.0)
    assert float(two.log_scale) > 0.5
    for _ in range(200):
        two.update(1.0)
    assert float(two.log_scale) == 0.0


@pytest.mark.parametrize(("arch", "two_sided"), [("jumprelu", True), ("relu", False), ("gated", False)])
def test_the_module_gives_jumprelus_two_sided_term_the_floored_controller(arch: str, two_sided: bool) -> None:
    config = _config()
    config["sae"] = {"architecture": arch, "dict_mult": 4, "target_l0": 12.0}
    assert SAEModule(config, d_in=16).target_l0.two_sided is two_sided
    config["sae"] = {"architecture": "jumprelu", "dict_mult": 4, "target_l0": 12.0, "sparsity_loss": "tanh"}
    assert SAEModule(config, d_in=16).target_l0.two_sided is False  # the tanh term is one-sided


@pytest.mark.parametrize("target", [5.0, 40.0, 150.0])
def test_converges_on_a_toy_l0_of_the_coefficient(target: float) -> None:
    """L0 = 300 / (1 + c^0.8) relaxing towards its equilibrium with a 30-step lag, 5% noise: the controller
    ends within 3% of the target from a start coefficient far off, whichever side."""
    g = torch.Generator().manual_seed(0)
    ctl, base, l0 = TargetL0(target), 1.0, 300.0
    for _ in range(3000):
        c = base * ctl.scale()
        l0 += (300.0 / (1.0 + c**0.8) - l0) / 30
        ctl.update(l0 * (1 + 0.05 * float(torch.randn((), generator=g))))
    assert abs(l0 - target) / target < 0.03


def test_module_scales_the_coefficient_and_checkpoints_the_controller() -> None:
    config = _config()
    config["sae"]["target_l0"] = 12.0
    module = SAEModule(config, d_in=16)
    assert module.sparsity_coeff() == pytest.approx(0.5)  # l1 is the start value
    module.target_l0.update(24.0)
    assert module.sparsity_coeff() == pytest.approx(0.5 * math.exp(RATE * math.log(2.0)))
    state = module.state_dict()
    assert {"target_l0.log_scale", "target_l0.ema", "target_l0.updates"} <= set(state)
    fresh = SAEModule(config, d_in=16)
    fresh.load_state_dict(state)
    assert fresh.sparsity_coeff() == module.sparsity_coeff()
    assert SAEModule(_config(), d_in=16).target_l0 is None  # off by default: no extra state


def test_target_l0_must_be_below_d_sae() -> None:
    config = _config()
    config["sae"]["target_l0"] = 64.0  # d_sae = 4 * 16
    with pytest.raises(ConfigError, match=r"sae\.target_l0=64\.0: must be below d_sae=64"):
        SAEModule(config, d_in=16)


def test_short_run_ends_near_the_target_l0() -> None:
    """End to end on easy data (sparse codes over 48 directions, ~3 active per row): from l1=0.5, whatever
    L0 that gives, 250 steps end with the SAE's L0 on the data within 10% of the target."""
    data = _data()
    config = _config()
    config["train_tokens"] = 64 * 250
    config["sae"]["target_l0"] = 6.0
    module = SAEModule(config, d_in=16)
    _fit(module, data, 250)
    with torch.no_grad():
        l0 = (module.sae.encode(data) > 0).sum(-1).float().mean().item()
    assert abs(l0 - 6.0) / 6.0 < 0.10, (l0, module.sparsity_coeff())
    assert module.sparsity_coeff() != pytest.approx(0.5, rel=0.05)  # the controller did the work
