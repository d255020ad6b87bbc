"""evaluate/downstream.py on the tiny random GPT-2 (real HookedLM) with hand-built SAEs whose answers are
known: an exact reconstruction (recovered 1, KL 0) and a zero one (recovered 0)."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from sae_lightning.evaluate.downstream import downstream_metrics, mean_activation
from sae_lightning.lm import HookPoint
from sae_lightning.lm.text import special_token_mask
from sae_lightning.metrics import next_token_kl, next_token_loss
from sae_lightning.saes import build_sae
from sae_lightning.saes.relu import ReLUConfig

HOOK = HookPoint(0, "mlp_post")


def _batches(lm) -> list[Tensor]:
    """Six rows of 10 random tokens starting with BOS, as two uneven batches (4 + 2 rows)."""
    rows = torch.randint(3, len(lm.tokenizer), (6, 10), generator=torch.Generator().manual_seed(1))
    rows[:, 0] = lm.tokenizer.bos_token_id
    return list(rows.split(4))


def _specials(lm) -> Callable[[Tensor], Tensor]:
    return lambda tokens: special_token_mask(tokens, lm.tokenizer)


def _relu_sae(d: int, identity: bool) -> torch.nn.Module:
    """A real ReLU SAE with 2d latents: W_enc = [I, -I], W_dec = [I; -I] reconstructs exactly
    (relu(u) - relu(-u) = u); with W_dec = 0 it reconstructs zero."""
    sae = build_sae(ReLUConfig(d_sae=2 * d), d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0) if identity else torch.zeros(2 * d, d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _run(lm, identity: bool, input_scale: float = 3.0) -> dict[str, float]:
    sae = _relu_sae(lm.hook_dim(HOOK), identity)
    sae.set_input_scale(input_scale)  # the identity stays an identity on raw activations
    return downstream_metrics(lm, _batches(lm), HOOK, sae, exclude=_specials(lm))


def test_perfect_sae_recovers_everything(tiny_gpt2) -> None:
    m = _run(tiny_gpt2, identity=True)
    assert abs(m["ce_loss_zero"] - m["ce_loss_clean"]) > 1e-3  # the hook matters in this model
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_clean"], abs=1e-5)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-5)
    assert m["kl_div_zero"] > 1e-4 and m["kl_div_score"] == pytest.approx(1.0, abs=1e-3)
    assert m["n_tokens_downstream"] == 6 * 9 - 6  # 9 predictions per row, the one made at BOS not counted


def test_zero_sae_recovers_nothing(tiny_gpt2) -> None:
    m = _run(tiny_gpt2, identity=False)
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_zero"], abs=1e-6)
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_div"] > 0
    assert m["kl_div"] == pytest.approx(m["kl_div_zero"], rel=1e-6)
    assert m["kl_div_score"] == pytest.approx(0.0, abs=1e-6)


@torch.no_grad()
def test_bos_positions_are_left_alone_and_left_out(tiny_gpt2) -> None:
    lm = tiny_gpt2
    batches = _batches(lm)
    tokens = torch.cat(batches)
    acts = lm.activations(tokens, [HOOK])[HOOK]
    mean = acts[:, 1:].reshape(-1, acts.shape[-1]).mean(0)  # the mean over non-BOS positions only
    torch.testing.assert_close(mean_activation(lm, batches, HOOK, _specials(lm)), mean, rtol=1e-5, atol=1e-6)

    def ablate(x: Tensor) -> Tensor:  # by hand, all rows at once: BOS untouched, its prediction dropped
        return torch.cat([x[:, :1], mean.expand_as(x[:, 1:])], 1)

    expected = next_token_loss(lm.logits(tokens, {HOOK: ablate}), tokens)[:, 1:].mean()
    m = _run(lm, identity=True)
    assert m["ce_loss_mean_ablation"] == pytest.approx(float(expected), rel=1e-5)

    def zero(x: Tensor) -> Tensor:  # zero-ablation keeps BOS too (SAEBench zeroes it)
        return torch.cat([x[:, :1], torch.zeros_like(x[:, 1:])], 1)

    kl_zero = next_token_kl(lm.logits(tokens), lm.logits(tokens, {HOOK: zero}))[:, 1:].mean()
    assert m["kl_div_zero"] == pytest.approx(float(kl_zero), rel=1e-5)
