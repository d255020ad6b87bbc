"""JumpReLU SAE: forward values, reported L0 == trained L0 == active count, STE threshold gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_lightning.saes import SAE, build_sae
from sae_lightning.saes.jumprelu import JumpReLUConfig
from sae_lightning.train.step import LatentStats, train_step

D_IN, D_SAE, B, EPS = 12, 40, 64, 0.05


def make(decoder_norm: str = "project", target_l0: float | None = None, **options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = JumpReLUConfig(d_sae=D_SAE, init_threshold=0.3, bandwidth=EPS, decoder_norm=decoder_norm,
                            target_l0=target_l0, **options)
    sae = build_sae(config, D_IN)
    with torch.no_grad():
        sae.b_dec.normal_()
    return sae


def batch() -> torch.Tensor:
    return torch.randn(B, D_IN, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


@pytest.mark.parametrize("decoder_norm", ["project", "free"])
def test_forward_and_reported_l0(decoder_norm: str) -> None:
    sae, x = make(decoder_norm), batch()
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), 0.3))
    out = sae(x, sparsity_coeff=2.0)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    active = pre > 0.3
    torch.testing.assert_close(out.x_hat, (pre * active) @ sae.W_dec + sae.b_dec)
    assert out.l0.item() == active.sum().item() / B
    assert 0 < out.l0.item() < D_SAE
    torch.testing.assert_close(out.terms["l0_penalty"], 2.0 * out.l0)  # trains for the L0 it reports
    assert torch.equal(out.fire_counts, active.sum(0))


@pytest.mark.parametrize("decoder_norm", ["project", "free"])
def test_threshold_gradient_matches_ste_formula(decoder_norm: str) -> None:
    sae, x = make(decoder_norm), batch()
    out = sae(x, sparsity_coeff=2.0)
    out.loss.backward()
    with torch.no_grad():
        g_xhat = 2 * (out.x_hat - x) / B  # d mse / d x_hat
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        theta = sae.threshold
        kernel = ((pre - theta).abs() < EPS / 2).float() / EPS
        g_z = g_xhat @ sae.W_dec.t()
        expected = -(theta * kernel * g_z).sum(0) - 2.0 * kernel.sum(0) / B
    assert sae.threshold.grad.abs().max() > 0
    torch.testing.assert_close(sae.threshold.grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("side", ["below", "above"])
def test_with_a_target_the_l0_term_pushes_the_thresholds_towards_it_from_either_side(side: str) -> None:
    """``sae.target_l0 = T``: the term is ``T/2 log((L0+1)/(T+1))^2`` and its threshold gradient is the STE's
    ``dH/dtheta`` times ``T log((L0+1)/(T+1)) / (L0+1)``: positive (thresholds go down) with L0 under T."""
    l0 = make()(batch(), sparsity_coeff=0.0).l0.item()
    target = l0 * 2 if side == "below" else l0 / 2
    sae, x = make(target_l0=target), batch()
    out = sae(x, sparsity_coeff=2.0)
    ratio = (l0 + 1) / (target + 1)
    assert out.terms["l0_penalty"].item() == pytest.approx(2.0 * target / 2 * math.log(ratio) ** 2, rel=1e-5)
    out.loss.backward()
    grad = sae.threshold.grad.clone()
    sae.zero_grad()
    sae(x, sparsity_coeff=0.0).loss.backward()
    grad -= sae.threshold.grad  # the L0 term's part
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        kernel = ((pre - sae.threshold).abs() < EPS / 2).float() / EPS
        expected = -2.0 * target * math.log(ratio) / (l0 + 1) * kernel.sum(0) / B
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    moved = grad[kernel.sum(0) > 0]
    assert moved.numel() > 0 and ((moved > 0) if side == "below" else (moved < 0)).all()


def test_l0_penalty_passes_no_gradient_to_pre_activations() -> None:
    sae, x = make(), batch()
    sae(x, sparsity_coeff=0.0).loss.backward()
    base = sae.W_enc.grad.clone()
    sae.zero_grad()
    sae(x, sparsity_coeff=5.0).loss.backward()
    torch.testing.assert_close(sae.W_enc.grad, base)


def test_clipping_is_per_group_so_the_l0_term_does_not_shrink_the_reconstruction_step() -> None:
    """The L0 term's gradient reaches only the thresholds, which are an optimizer group of their own and
    clipped on their own: the encoder/decoder step is the same at coefficient 0 and 1e4 (under one global
    norm the large threshold gradient would scale it down)."""
    after = {}
    for coeff in (0.0, 1e4):
        sae = make()
        opt = torch.optim.Adam(sae.param_groups(1e-3))
        train_step(sae, opt, batch(), LatentStats(D_SAE, 10**9), coeff=coeff, grad_clip=1.0, step=0)
        after[coeff] = {name: p.detach().clone() for name, p in sae.named_parameters()}
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(after[1e4][name], after[0.0][name], rtol=0, atol=0)
    assert not torch.equal(after[1e4]["threshold"], after[0.0]["threshold"])


def test_ste_to_input_passes_the_kernel_to_the_encoder() -> None:
    """``sae.ste_to_input``: the pre-activations' gradient is the reconstruction's through the open gates,
    plus ``theta K / eps`` times it (the jump) and ``coeff K / (eps B)`` (the L0 term), by hand; the
    thresholds' gradient is unchanged."""
    x, coeff = batch(), 2.0
    plain = make()
    plain(x, sparsity_coeff=coeff).loss.backward()
    sae = make(ste_to_input=True)
    out = sae(x, sparsity_coeff=coeff)
    out.loss.backward()
    with torch.no_grad():
        u = x - sae.b_dec
        pre = u @ sae.W_enc + sae.b_enc
        theta = sae.threshold
        kernel = ((pre - theta).abs() < EPS / 2).float() / EPS
        g_z = (2 * (out.x_hat - x) / B) @ sae.W_dec.t()
        g_pre = g_z * (pre > theta) + theta * kernel * g_z + coeff * kernel / B
    assert kernel.sum() > 0
    torch.testing.assert_close(sae.b_enc.grad, g_pre.sum(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sae.W_enc.grad, u.t() @ g_pre, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sae.threshold.grad, plain.threshold.grad)
    assert not torch.allclose(sae.W_enc.grad, plain.W_enc.grad)


@pytest.mark.parametrize("target_l0", [None, 5.0])
def test_tanh_sparsity_loss_by_hand(target_l0: float | None) -> None:
    """``sae.sparsity_loss=tanh`` (Anthropic's): the term is ``mean_tokens sum_i tanh(c z_i ||W_dec,i||)``
    whatever the target (the controller steers its coefficient); its gradient reaches z, and through the
    straight-through jump the thresholds and, with ``ste_to_input``, the pre-activations. Free decoder, so
    the row norms are not 1."""
    x, coeff, c = batch(), 2.0, 4.0
    sae = make("free", target_l0, sparsity_loss="tanh", tanh_scale=c, ste_to_input=True)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 20.0, D_SAE)[:, None])
    out = sae(x, sparsity_coeff=coeff)
    out.loss.backward()
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        theta, gate = sae.threshold, pre > sae.threshold
        z, norms = pre * gate, sae.W_dec.norm(dim=1)
        kernel = ((pre - theta).abs() < EPS / 2).float() / EPS
        tanh = torch.tanh(c * z * norms)
        g_z = (2 * (out.x_hat - x) / B) @ sae.W_dec.t() + coeff * c * norms * (1 - tanh**2) / B
    assert kernel.sum() > 0 and tanh[gate].min() > 0.05 and tanh.max() < 1  # the kernel and tanh's slope act
    torch.testing.assert_close(out.terms["l0_penalty"], coeff * tanh.sum(-1).mean())
    torch.testing.assert_close(sae.threshold.grad, -(theta * kernel * g_z).sum(0), rtol=1e-4, atol=1e-6)
    g_pre = g_z * gate + theta * kernel * g_z
    torch.testing.assert_close(sae.b_enc.grad, g_pre.sum(0), rtol=1e-4, atol=1e-6)
    assert out.l0.item() == gate.sum().item() / B  # L0 is still the count


def test_pre_act_loss_raises_only_the_dead_latents_towards_their_thresholds_by_hand() -> None:
    """``sae.pre_act_coeff``: ``coeff * mean_tokens sum_{i dead} relu(theta_i - pre_i) ||W_dec,i||``; off
    (None) by default, 0 with no dead latent, and its gradient reaches only the dead latents' encoder."""
    x, coeff = batch(), 0.5
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    assert "pre_act" not in make()(x, sparsity_coeff=1.0, dead_mask=dead).terms
    sae = make("free", pre_act_coeff=coeff)
    assert sae(x, sparsity_coeff=1.0, dead_mask=torch.zeros_like(dead)).terms["pre_act"].item() == 0.0
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, D_SAE)[:, None])
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        expected = coeff * ((0.3 - pre).clamp(min=0) * sae.W_dec.norm(dim=1) * dead).sum(-1).mean()
    out = sae(x, sparsity_coeff=0.0, dead_mask=dead)
    torch.testing.assert_close(out.terms["pre_act"], expected)
    assert expected > 0
    sae(x, sparsity_coeff=0.0, dead_mask=dead).loss.backward()
    with_term = sae.b_enc.grad.clone()
    sae.zero_grad()
    sae(x, sparsity_coeff=0.0, dead_mask=torch.zeros_like(dead)).loss.backward()
    moved = (with_term - sae.b_enc.grad).abs() > 0
    assert moved[dead].any() and not moved[~dead].any()


def test_a_bad_sparsity_loss_names_its_key() -> None:
    with pytest.raises(ValueError, match=r"sae\.sparsity_loss"):
        JumpReLUConfig(sparsity_loss="l1")


class _RecordingSGD(torch.optim.SGD):
    """SGD that keeps the gradients it applies, i.e. after ``train_step``'s clipping."""

    def step(self, closure: object = None) -> object:
        self.applied = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


@pytest.mark.parametrize("scope", ["group", "global"])
def test_grad_clip_scope_clips_each_group_or_one_norm_over_all(scope: str) -> None:
    """``group``: the weights' and the thresholds' gradients are each brought to norm 1; ``global``
    (SAELens's trainer): all are divided by one total norm, keeping their ratio. Checked against the raw
    gradients computed by hand (free decoder: no gradient projection before the clip)."""
    sae, x = make("free"), batch()
    sae(x, sparsity_coeff=50.0).loss.backward()
    raw = [[p.grad.clone() for p in g["params"]] for g in sae.param_groups(1.0)]
    sae.zero_grad()
    norms = [torch.linalg.vector_norm(torch.stack([g.norm() for g in group])) for group in raw]
    assert min(norms) > 1  # the clip is active for both groups
    opt = _RecordingSGD(sae.param_groups(1.0))
    train_step(sae, opt, x, LatentStats(D_SAE, 10**9), coeff=50.0, grad_clip=1.0, clip_scope=scope, step=0)
    total = torch.linalg.vector_norm(torch.stack(norms))
    expected = [g / (n if scope == "group" else total) for group, n in zip(raw, norms, strict=True)
                for g in group]
    for got, want in zip(opt.applied, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_unit_norm_decoder() -> None:
    sae, x = make(), batch()
    opt = torch.optim.SGD(sae.parameters(), lr=1.0)
    sae(x, sparsity_coeff=1.0).loss.backward()
    sae.before_optimizer_step()
    assert ((sae.W_dec.grad * sae.W_dec).sum(1)).abs().max() < 1e-4
    opt.step()
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_threshold_is_projected_onto_non_negative_values_after_a_step() -> None:
    sae = make()
    with torch.no_grad():
        sae.threshold[:5] = -0.2
    sae.after_optimizer_step()
    assert (sae.threshold[:5] == 0).all()
    torch.testing.assert_close(sae.threshold[5:], torch.full((D_SAE - 5,), 0.3))


def _l0_after_training(l0_coeff: float, steps: int = 300) -> float:
    """Held-out L0 of the default JumpReLU SAE after ``steps`` of the trainer's step (Adam, lr 1e-3)."""
    torch.manual_seed(0)
    sae = build_sae(JumpReLUConfig(d_sae=64), 16)
    opt = torch.optim.Adam(sae.param_groups(1e-3))
    stats = LatentStats(sae.d_sae, 10**9)
    data = torch.Generator().manual_seed(3)
    for step in range(steps):
        train_step(sae, opt, torch.randn(128, 16, generator=data), stats, coeff=l0_coeff, grad_clip=1.0,
                   step=step)
    with torch.no_grad():
        return float((sae.encode(torch.randn(4096, 16, generator=data)) != 0).sum(-1).float().mean())


def test_the_l0_coefficient_moves_l0_within_a_short_run() -> None:
    """The threshold is trained directly (at 10x Adam's lr 1e-3 by default), so 300 steps can move it by up to
    3 and the coefficient halves L0 (trained as log theta from 0.001, as before: L0 37.9 with either
    coefficient)."""
    free, penalised = _l0_after_training(0.0), _l0_after_training(0.1)
    assert penalised < 0.6 * free, (free, penalised)


def test_a_bad_threshold_learning_rate_multiplier_names_its_key() -> None:
    with pytest.raises(ValueError, match=r"sae\.threshold_lr_mult"):
        JumpReLUConfig(threshold_lr_mult=0.0)


def test_a_folder_saved_with_log_threshold_loads_its_threshold(tmp_path: Path) -> None:
    sae = make()
    with torch.no_grad():
        sae.threshold.uniform_(0.1, 0.5)
    folder = sae.save(tmp_path / "sae")
    weights = load_file(folder / "sae.safetensors")
    weights["log_threshold"] = weights.pop("threshold").log()
    save_file(weights, folder / "sae.safetensors")
    loaded = SAE.load(folder)
    torch.testing.assert_close(loaded.threshold, sae.threshold.detach())
    x = batch()
    torch.testing.assert_close(loaded.encode(x), sae.eval().encode(x))


@pytest.mark.parametrize("d_sae", [48, 96])
def test_default_start_fires_each_latent_on_seven_percent_of_the_data_sample(d_sae: int) -> None:
    """Unset, ``init_threshold`` is the sparse start: before data, ``SPARSE_START_Z`` times the encoder's gain
    (1.476: the pre-activations' 93rd percentile were they Gaussian with std the gain; the gain is 1 at
    ``d_sae <= 2 d_in``, 0.5 at 4 d_in); after ``init_from_data``, each latent's threshold is the
    ``ceil(0.93 n)``-th smallest of its pre-activations on the sample, so it fires on ``n - ceil(0.93 n)``
    of the n rows (continuous data: no ties; one more where the encoder's own sum rounds the threshold's
    row above it). Resampling restarts at the first value."""
    d_in, n = 24, 1000
    torch.manual_seed(0)
    sae = build_sae(JumpReLUConfig(d_sae=d_sae), d_in)
    gain = min(1.0, 2 * d_in / d_sae)
    torch.testing.assert_close(sae.threshold, torch.full((d_sae,), 1.476 * gain))
    assert sae.latent_init_values() == {"threshold": pytest.approx(1.476 * gain)}
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.2, 3, d_in) + 1
    sae.init_from_data(x)
    fired = (sae.encode(x) > 0).sum(0)
    assert ((fired - (n - math.ceil(0.93 * n))).abs() <= 1).all()
    assert fired.float().mean() < n - math.ceil(0.93 * n) + 0.5
    assert sae.threshold.std() > 0  # a threshold per latent, set by its own pre-activations


@pytest.mark.parametrize("options", [{"decoder_norm": "free"}, {"init_threshold": 0.2}])
def test_a_free_decoder_or_a_set_threshold_starts_where_it_says(options: dict) -> None:
    """SAELens's free decoder starts its thresholds at SAELens's 0.01; a set ``init_threshold`` is where they
    start; the data sample changes neither."""
    torch.manual_seed(0)
    sae = build_sae(JumpReLUConfig(d_sae=48, **options), 24)
    sae.init_from_data(torch.randn(500, 24) + 1)
    torch.testing.assert_close(sae.threshold, torch.full((48,), options.get("init_threshold", 0.01)))
