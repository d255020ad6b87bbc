"""evaluate/downstream.py on a tiny random GPT-2 with hand-built SAEs whose answers are known."""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import pytest
import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel

from sae_lightning.config import SAEConfig
from sae_lightning.evaluate.downstream import downstream_metrics, mean_activation
from sae_lightning.metrics import next_token_loss
from sae_lightning.saes import build_sae

BOS = 0


class Hook(NamedTuple):
    layer: int
    name: str


HOOK = Hook(1, "mlp_post")


class TinyLM:
    """The HookedLM contract on a 2-layer random GPT-2, hooking ``mlp.act``'s output (mlp_post)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=16, vocab_size=40, initializer_range=0.3,
                         bos_token_id=BOS, eos_token_id=BOS)
        self.model = GPT2LMHeadModel(cfg).eval()
        self.d_mlp = 4 * cfg.n_embd

    def _run(self, tokens: Tensor, hooks: dict[Hook, Callable[[Tensor], Tensor | None]]) -> Tensor:
        handles = [self.model.transformer.h[h.layer].mlp.act.register_forward_hook(lambda m, i, o, f=f: f(o))
                   for h, f in hooks.items()]
        try:
            return self.model(tokens).logits
        finally:
            for handle in handles:
                handle.remove()

    def logits(self, tokens: Tensor, replace: dict | None = None) -> Tensor:
        return self._run(tokens, replace or {})

    def activations(self, tokens: Tensor, hooks: Sequence[Hook]) -> dict[Hook, Tensor]:
        out: dict[Hook, Tensor] = {}
        self._run(tokens, {h: lambda o, h=h: out.__setitem__(h, o) for h in hooks})
        return out


def _batches() -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(1, 40, (6, 10), generator=g)
    rows[:, 0] = BOS
    return list(rows.split(4))  # uneven batches: 4 + 2 rows


def _is_bos(tokens: Tensor) -> Tensor:
    return tokens == BOS


def _relu_sae(d: int, identity: bool) -> torch.nn.Module:
    """A real ReLU SAE with 2d latents: W_enc = [I, -I], W_dec = [I; -I] reconstructs exactly
    (relu(u) - relu(-u) = u); with W_dec = 0 it reconstructs zero."""
    sae = build_sae(SAEConfig(architecture="relu", d_sae=2 * d), d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0) if identity else torch.zeros(2 * d, d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def lm() -> TinyLM:
    return TinyLM()


def test_perfect_sae_recovers_everything(lm: TinyLM) -> None:
    m = downstream_metrics(lm, _batches(), HOOK, _relu_sae(lm.d_mlp, identity=True), norm_scale=3.0,
                           exclude=_is_bos)
    assert abs(m["ce_loss_zero"] - m["ce_loss_clean"]) > 0.05  # the hook matters in this model
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_clean"], abs=1e-5)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-5)
    assert m["n_tokens_downstream"] == 6 * 9 - 6  # 9 predictions per row, the one made at BOS not counted


def test_zero_sae_recovers_nothing(lm: TinyLM) -> None:
    m = downstream_metrics(lm, _batches(), HOOK, _relu_sae(lm.d_mlp, identity=False), norm_scale=3.0,
                           exclude=_is_bos)
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_zero"], abs=1e-6)
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_div"] > 0


@torch.no_grad()
def test_bos_positions_are_left_alone_and_left_out(lm: TinyLM) -> None:
    batches = _batches()
    tokens = torch.cat(batches)
    acts = lm.activations(tokens, [HOOK])[HOOK]
    mean = acts[:, 1:].reshape(-1, lm.d_mlp).mean(0)  # the mean over non-BOS positions only
    torch.testing.assert_close(mean_activation(lm, batches, HOOK, _is_bos), mean, rtol=1e-5, atol=1e-6)
    # mean ablation done by hand on all rows at once: BOS activations untouched, BOS predictions dropped
    def ablate(x: Tensor) -> Tensor:
        return torch.cat([x[:, :1], mean.expand_as(x[:, 1:])], 1)

    expected = next_token_loss(lm.logits(tokens, {HOOK: ablate}), tokens)[:, 1:].mean()
    m = downstream_metrics(lm, batches, HOOK, _relu_sae(lm.d_mlp, identity=True), 1.0, exclude=_is_bos)
    assert m["ce_loss_mean_ablation"] == pytest.approx(float(expected), rel=1e-5)
