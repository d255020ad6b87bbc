"""Replacement-model evaluation (``evaluate/replacement.py``): the splice is exact for a transcoder that
returns the true MLP output, every number equals a hand computation with plain forward hooks on a tiny
GPT-2 (the second replaced layer reading the first one's replacement), a layer alone equals the single
transcoder's downstream numbers, and bad inputs are refused before any work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_lightning.checks import ConfigError
from sae_lightning.config import ModelConfig
from sae_lightning.evaluate.downstream import downstream_metrics
from sae_lightning.evaluate.replacement import PLTSet, Transcoders, check_replaceable, replacement_metrics
from sae_lightning.lm import HookPoint, LayoutError, load_lm
from sae_lightning.saes import SAE, build_sae, config_from_dict


class TrueMLP:
    """A transcoder whose latents are its input and whose decode is the model's own MLP (its ``forward``:
    calling the module would run the splice hooked on its output again)."""

    def __init__(self, lm, layers: list[int]) -> None:
        self.lm, self.layers = lm, layers

    def encode(self, layer: int, mlp_in: Tensor) -> Tensor:
        return mlp_in

    def decode(self, layer: int, latents: dict[int, Tensor], mlp_in: Tensor) -> Tensor:
        return self.lm.blocks[layer].mlp.forward(latents[layer])


def tokens(n: int = 3, t: int = 12, seed: int = 0) -> Tensor:
    return torch.randint(3, 250, (n, t), generator=torch.Generator().manual_seed(seed))


def first_position(t: Tensor) -> Tensor:
    mask = torch.zeros_like(t, dtype=torch.bool)
    mask[:, 0] = True
    return mask


def random_transcoder(seed: int, skip: bool) -> SAE:
    torch.manual_seed(seed)
    sae = build_sae(config_from_dict({"architecture": "relu", "d_sae": 16, "skip": skip}), 32, d_out=32)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.3)
        sae.W_dec.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.1)
        if skip:
            sae.W_skip.normal_(0, 0.1)
    sae.set_input_scale(1.3)
    sae.set_target_scale(0.7)
    return sae


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_true_mlp_transcoders_recover_everything(model, request) -> None:
    """decode = the MLP itself: CE loss recovered 1, KL 0, NMSE 0, at once and alone, BOS excluded."""
    lm = request.getfixturevalue(model)
    plt_set = TrueMLP(lm, [0, 1, 2])
    assert isinstance(plt_set, Transcoders)
    out = replacement_metrics(lm, [tokens(), tokens(seed=1)], plt_set, exclude=first_position)
    for run in ("replacement", "alone/layer0", "alone/layer1", "alone/layer2"):
        assert out[f"{run}/ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
        assert out[f"{run}/kl_div"] == pytest.approx(0.0, abs=1e-6)
        assert out[f"{run}/kl_div_score"] == pytest.approx(1.0, abs=1e-5)
        assert out[f"{run}/ce_loss_zero"] > out[f"{run}/ce_loss_clean"]
    for layer in (0, 1, 2):
        assert out[f"replacement/layer{layer}/nmse"] == pytest.approx(0.0, abs=1e-10)
        assert out[f"replacement/layer{layer}/l0"] == 32  # latents = mlp_in: every dimension non-zero
    assert out["replacement/l0_total"] == 96 and out["n_tokens_downstream"] == 2 * 3 * 10


def by_hand(lm, toks: Tensor, saes: dict[int, SAE], zero: bool) -> tuple[Tensor, dict[int, tuple]]:
    """Logits with each ``saes`` layer's MLP output (GPT-2: the ``mlp`` module's output) replaced by the
    transcoder of its actual input (or by zeros), position 0 left alone; per layer the true outputs, the
    decodes and the latents at positions >= 1, through plain forward hooks."""
    seen: dict[int, tuple] = {}

    def hook(layer: int):
        def fn(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            x = args[0]
            rows = x.reshape(-1, x.shape[-1])
            z = saes[layer].encode(rows)
            new = torch.zeros_like(out) if zero else saes[layer].decode(z, rows).reshape(out.shape)
            new[:, 0] = out[:, 0]
            seen[layer] = (out[:, 1:].reshape(-1, 32), new[:, 1:].reshape(-1, 32),
                           z.reshape(*x.shape[:2], -1)[:, 1:].reshape(-1, z.shape[-1]))
            return new
        return fn

    handles = [lm.blocks[layer].mlp.register_forward_hook(hook(layer)) for layer in saes]
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=toks).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def ce(logits: Tensor, toks: Tensor) -> Tensor:
    """Per-prediction cross-entropy of positions 1.. (position 0 is excluded)."""
    return F.cross_entropy(logits[:, 1:-1].reshape(-1, logits.shape[-1]), toks[:, 2:].reshape(-1),
                           reduction="none")


def kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    p, q = p_logits[:, 1:-1].log_softmax(-1), q_logits[:, 1:-1].log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).reshape(-1)


def test_replacement_matches_a_hand_computation(tiny_gpt2) -> None:
    """Layers 0 and 2 replaced by random ReLU transcoders (one with a skip, scales != 1): CE losses, KL,
    CE loss recovered and each layer's NMSE and L0 inside the replaced forward, by hand."""
    lm = tiny_gpt2
    saes = {0: random_transcoder(0, skip=True), 2: random_transcoder(1, skip=False)}
    toks = tokens()
    out = replacement_metrics(lm, [toks], PLTSet(saes), exclude=first_position)
    with torch.no_grad():
        clean = lm.model(input_ids=toks).logits
    replaced, seen = by_hand(lm, toks, saes, zero=False)
    zeroed, _ = by_hand(lm, toks, saes, zero=True)
    l_clean, l_rep, l_zero = (float(ce(x, toks).mean()) for x in (clean, replaced, zeroed))
    assert abs(l_rep - l_clean) > 1e-4 and abs(l_zero - l_clean) > 1e-4  # the splices change the loss
    assert out["replacement/ce_loss_clean"] == pytest.approx(l_clean, rel=1e-5)
    assert out["replacement/ce_loss_replaced"] == pytest.approx(l_rep, rel=1e-5)
    assert out["replacement/ce_loss_zero"] == pytest.approx(l_zero, rel=1e-5)
    assert out["replacement/ce_loss_recovered"] == pytest.approx((l_zero - l_rep) / (l_zero - l_clean),
                                                                 rel=1e-4)
    assert out["replacement/kl_div"] == pytest.approx(float(kl(clean, replaced).mean()), rel=1e-4)
    assert out["replacement/kl_div_zero"] == pytest.approx(float(kl(clean, zeroed).mean()), rel=1e-4)
    for layer, (true, decoded, z) in seen.items():
        nmse = float(((true - decoded) ** 2).sum() / ((true - true.mean(0)) ** 2).sum())
        assert out[f"replacement/layer{layer}/nmse"] == pytest.approx(nmse, rel=1e-5)
        assert out[f"replacement/layer{layer}/l0"] == pytest.approx(float((z != 0).sum(1).float().mean()))
    assert 0 < out["replacement/layer0/l0"] < 16
    # layer 2's input is read after layer 0's replacement: its MLP output differs from the clean one's
    alone, alone_seen = by_hand(lm, toks, {2: saes[2]}, zero=False)
    assert not torch.allclose(alone_seen[2][0], seen[2][0])
    assert out["alone/layer2/ce_loss_replaced"] == pytest.approx(float(ce(alone, toks).mean()), rel=1e-5)
    assert out["alone/layer2/nmse"] != pytest.approx(out["replacement/layer2/nmse"])


def test_a_layer_alone_equals_the_single_transcoder_downstream_numbers(tiny_gpt2) -> None:
    sae = random_transcoder(3, skip=True)
    batches = [tokens(), tokens(seed=2)]
    out = replacement_metrics(tiny_gpt2, batches, PLTSet({1: sae}), exclude=first_position)
    single = downstream_metrics(tiny_gpt2, batches, HookPoint(1, "mlp_out"), sae, exclude=first_position,
                                input_hook=HookPoint(1, "mlp_in"))
    for ours, theirs in (("ce_loss_replaced", "ce_loss_sae"), ("ce_loss_zero", "ce_loss_zero"),
                         ("ce_loss_recovered", "ce_loss_recovered"), ("kl_div", "kl_div"),
                         ("kl_div_score", "kl_div_score")):
        assert out[f"replacement/{ours}"] == pytest.approx(single[theirs], rel=1e-5)
        assert out[f"alone/layer1/{ours}"] == pytest.approx(single[theirs], rel=1e-5)


class Doubler(nn.Module):
    """An MLP with no weight matrix: nothing the layout can call an MLP output projection."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * x


def test_bad_layers_are_refused_before_any_work(tiny_gpt2_dir) -> None:
    lm = load_lm(ModelConfig(name=str(tiny_gpt2_dir), device="cpu"))
    with pytest.raises(ConfigError, match=r"layers \[5\] are beyond the model's depth: it has n_layers=3"):
        check_replaceable(lm, [0, 5])
    with pytest.raises(ConfigError, match="ascending, without repeats"):
        check_replaceable(lm, [2, 1])
    lm.blocks[1].mlp = Doubler()
    check_replaceable(lm, [0, 2])
    with pytest.raises(LayoutError, match=r"layer 1 of this 'gpt2' model \(transformer.h.1\) has no MLP "
                                          "with an output projection"):
        check_replaceable(lm, [0, 1, 2])
