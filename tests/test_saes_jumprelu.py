"""JumpReLU SAE: forward values, reported L0 == trained L0 == active count, STE threshold gradients."""

from __future__ import annotations

import torch

from sae_lightning.saes import build_sae
from sae_lightning.saes.jumprelu import JumpReLUConfig

D_IN, D_SAE, B, EPS = 12, 40, 64, 0.05


def make() -> torch.nn.Module:
    torch.manual_seed(0)
    sae = build_sae(JumpReLUConfig(d_sae=D_SAE, init_threshold=0.3,
                              bandwidth=EPS), D_IN)
    with torch.no_grad():
        sae.b_dec.normal_()
    return sae


def batch() -> torch.Tensor:
    return torch.randn(B, D_IN, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def test_forward_and_reported_l0() -> None:
    sae, x = make(), batch()
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), 0.3))
    out = sae(x, sparsity_coeff=2.0)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    active = pre > 0.3
    torch.testing.assert_close(out.x_hat, (pre * active) @ sae.W_dec + sae.b_dec)
    assert out.l0.item() == active.sum().item() / B
    assert 0 < out.l0.item() < D_SAE
    torch.testing.assert_close(out.terms["l0_penalty"], 2.0 * out.l0)  # trains for the L0 it reports
    assert torch.equal(out.fire_counts, active.sum(0))


def test_threshold_gradient_matches_ste_formula() -> None:
    sae, x = make(), batch()
    out = sae(x, sparsity_coeff=2.0)
    out.loss.backward()
    with torch.no_grad():
        g_xhat = 2 * (out.x_hat - x) / B  # d mse / d x_hat
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        theta = sae.threshold
        kernel = ((pre - theta).abs() < EPS / 2).float() / EPS
        g_z = g_xhat @ sae.W_dec.t()
        d_theta = (-(theta * kernel * g_z).sum(0) - 2.0 * kernel.sum(0) / B)
        expected = d_theta * theta  # chain rule through theta = exp(log_threshold)
    assert sae.log_threshold.grad.abs().max() > 0
    torch.testing.assert_close(sae.log_threshold.grad, expected, rtol=1e-4, atol=1e-6)


def test_l0_penalty_passes_no_gradient_to_pre_activations() -> None:
    sae, x = make(), batch()
    sae(x, sparsity_coeff=0.0).loss.backward()
    base = sae.W_enc.grad.clone()
    sae.zero_grad()
    sae(x, sparsity_coeff=5.0).loss.backward()
    torch.testing.assert_close(sae.W_enc.grad, base)


def test_unit_norm_decoder() -> None:
    sae, x = make(), batch()
    opt = torch.optim.SGD(sae.parameters(), lr=1.0)
    sae(x, sparsity_coeff=1.0).loss.backward()
    sae.before_optimizer_step()
    assert ((sae.W_dec.grad * sae.W_dec).sum(1)).abs().max() < 1e-4
    opt.step()
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
