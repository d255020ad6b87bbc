"""The gated SAE (sae=gated): its forward and loss terms against a hand computation, with the auxiliary
loss's decoder frozen (the paper) or trained (SAELens), and the unit-norm (project) or free decoder."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.checks import ConfigError
from sae_lightning.saes import build_sae
from sae_lightning.saes.gated import GatedConfig
from tests.saes.test_saes import D_IN, D_SAE, B, batch, cfg, make

AUX = ["frozen", "trained"]


def _gated(**kw):
    """A gated SAE with unit-norm decoder rows (``project``) unless ``kw`` says otherwise."""
    sae = make("gated", **{"decoder_norm": "project", **kw})
    with torch.no_grad():  # magnitude path unlike the gate path, so a mix-up of the two shows
        sae.r_mag.normal_(std=0.5)
        sae.b_mag.normal_(std=0.3)
    return sae


def _hand(sae, x: torch.Tensor, coeff: float, aux_decoder: str) -> dict[str, torch.Tensor]:
    """The definitions, written out term by term (the auxiliary reconstruction's decoder detached when
    ``aux_decoder`` is frozen)."""
    centred = x - sae.b_dec
    pi_gate = centred @ sae.W_enc + sae.b_enc
    pi_mag = centred @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    z = (pi_gate > 0).float() * torch.relu(pi_mag)
    x_hat = z @ sae.W_dec + sae.b_dec
    gate = torch.relu(pi_gate)
    l1 = sum(gate[b, i] * sae.W_dec[i].norm() for b in range(B) for i in range(D_SAE)) / B
    w_dec, b_dec = sae.W_dec, sae.b_dec
    if aux_decoder == "frozen":
        w_dec, b_dec = w_dec.detach(), b_dec.detach()
    aux = ((gate @ w_dec + b_dec - x) ** 2).sum(-1).mean()
    return {"z": z, "x_hat": x_hat, "reconstruction": ((x_hat - x) ** 2).sum(-1).mean(), "l1": coeff * l1,
            "aux": aux}


@pytest.mark.parametrize("aux_decoder", AUX)
def test_gated_forward_and_loss_terms_match_hand_computation(aux_decoder: str) -> None:
    sae, x = _gated(aux_decoder=aux_decoder), batch()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))  # unit-norm rows, as the paper
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])  # so the decoder-norm weights matter
    out = sae(x, sparsity_coeff=0.4)
    hand = _hand(sae, x, 0.4, aux_decoder)
    z = hand["z"]
    assert (z > 0).any() and (z == 0).any()
    assert ((z == 0) & ((x - sae.b_dec) @ sae.W_enc + sae.b_enc > 0)).any()  # gate open, magnitude <= 0
    torch.testing.assert_close(sae.encode_normalized(x), z)
    torch.testing.assert_close(out.x_hat, hand["x_hat"])
    for key in ("reconstruction", "l1", "aux"):
        torch.testing.assert_close(out.terms[key], hand[key].detach(), msg=key)
    torch.testing.assert_close(out.loss, hand["reconstruction"] + hand["l1"] + hand["aux"])
    assert torch.equal(out.fire_counts, (z > 0).sum(0)) and out.l0 == (z > 0).sum() / B


@pytest.mark.parametrize("aux_decoder", AUX)
def test_gated_gradients_match_hand_and_aux_loss_moves_decoder_only_when_trained(aux_decoder: str) -> None:
    """Every parameter's gradient is the hand loss's; the auxiliary term gives W_dec and b_dec a gradient only
    with ``aux_decoder=trained``, and always reaches the gate path (W_enc, b_enc), which the Heaviside cuts
    off from the reconstruction."""
    sae, x = _gated(aux_decoder=aux_decoder), batch()
    sae(x, sparsity_coeff=0.4).loss.backward()
    hand = _hand(sae, x, 0.4, aux_decoder)
    names = [n for n, _ in sae.named_parameters()]
    params = [getattr(sae, n) for n in names]
    want = torch.autograd.grad(hand["reconstruction"] + hand["l1"] + hand["aux"], params, retain_graph=True)
    for name, g in zip(names, want, strict=True):
        torch.testing.assert_close(getattr(sae, name).grad, g, rtol=1e-4, atol=1e-5, msg=name)

    aux = dict(zip(names, torch.autograd.grad(hand["aux"], params, allow_unused=True, retain_graph=True),
                   strict=True))
    if aux_decoder == "frozen":
        assert aux["W_dec"] is None and aux["b_dec"].abs().max() > 0  # b_dec still reaches it via the encoder
    else:
        assert aux["W_dec"].abs().max() > 0
    assert aux["r_mag"] is None and aux["b_mag"] is None
    assert aux["W_enc"].abs().max() > 0 and aux["b_enc"].abs().max() > 0
    recon = dict(zip(names, torch.autograd.grad(hand["reconstruction"], params, allow_unused=True),
                     strict=True))
    assert recon["b_enc"] is None  # the gate bias learns only from the sparsity and auxiliary terms


def _step(sae: torch.nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    sae(x, sparsity_coeff=0.4).loss.backward()
    sae.before_optimizer_step()
    opt.step()
    sae.after_optimizer_step()


def test_gated_step_keeps_decoder_rows_unit_norm() -> None:
    sae, x = _gated(), batch()
    _step(sae, x)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_gated_defaults_are_saelens_choices() -> None:
    """Free decoder rows (tested with jumprelu's in ``test_saes.py``), the auxiliary loss training the
    decoder, b_dec from zero."""
    sae = build_sae(cfg("gated", d_sae=D_SAE), D_IN)
    assert (sae.cfg.decoder_norm, sae.cfg.aux_decoder, sae.cfg.b_dec_init) == ("free", "trained", "zeros")
    assert not sae.unit_norm_decoder


def test_aux_decoder_rejects_unknown_values_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"sae.aux_decoder='detached'.*choose frozen or trained"):
        GatedConfig(aux_decoder="detached")
