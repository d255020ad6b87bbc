"""TopK SAE: L0 == k, AuxK, and the sparse kernels against the dense reference (loss and gradients)."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.saes import build_sae
from sae_lightning.saes.sparse_ops import LatentMajor, gathered_dots, uniform_rows
from sae_lightning.saes.topk import TopKConfig

D_IN, D_SAE, K, B = 16, 96, 5, 48


def make(kernel: str, **kw) -> torch.nn.Module:
    """A TopK SAE with random biases and decoder rows of unequal norms (which a rescaled decoder, the
    default, divides out and moves into the encoder)."""
    torch.manual_seed(0)
    sae = build_sae(TopKConfig(d_sae=D_SAE, k=K, sparse_kernel=kernel, **kw), D_IN)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.mul_(0.5 + torch.rand(D_SAE, 1))
    return sae


def batch() -> torch.Tensor:
    return torch.randn(B, D_IN, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def dead_mask() -> torch.Tensor:
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    return dead


def test_l0_is_k_and_fire_counts_match_latents() -> None:
    sae, x = make("sparse"), batch()
    with torch.no_grad():
        sae.b_enc.fill_(50.0)  # every top-k pre-activation positive, so exactly k latents fire
    out = sae(x, sparsity_coeff=0.0)
    z = sae.encode(x)
    assert out.l0.item() == K and bool(((z != 0).sum(1) == K).all())
    assert torch.equal(out.fire_counts, (z != 0).sum(0))
    torch.testing.assert_close(out.x_hat, sae.decode(z))


def test_relu_after_topk_counts_only_positive_latents() -> None:
    sae, x = make("sparse"), batch()
    with torch.no_grad():
        sae.b_enc.fill_(-50.0)  # all pre-activations negative: nothing fires
    out = sae(x, sparsity_coeff=0.0)
    assert out.l0.item() == 0 and out.fire_counts.sum() == 0


def test_auto_kernel_choice() -> None:
    assert make("auto").sparse and not make("dense").sparse
    assert not build_sae(TopKConfig(d_sae=64, k=32), 8).sparse


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_auxk_zero_when_nothing_dead(kernel: str) -> None:
    sae, x = make(kernel), batch()
    ref = sae(x, sparsity_coeff=0.0)
    out = sae(x, sparsity_coeff=0.0, dead_mask=torch.zeros(D_SAE, dtype=torch.bool))
    assert ref.terms["auxk"] == 0 and out.terms["auxk"] == 0
    torch.testing.assert_close(out.loss, ref.terms["reconstruction"])


@pytest.mark.parametrize(("kernel", "aux_k"), [("dense", 7), ("sparse", 3), ("sparse", 7), ("sparse", 40)])
def test_auxk_matches_hand_computation_and_trains_dead_latents_only(kernel: str, aux_k: int) -> None:
    """Value and gradients by each AuxK route: 32 dead latents, so aux_k=3 takes the sparse kernels,
    aux_k=7 a dense product over the dead latents, aux_k=40 all 32 of them (no top-k)."""
    sae, x, dead = make(kernel, aux_k=aux_k, aux_coeff=0.5), batch(), dead_mask()
    out = sae(x, sparsity_coeff=0.0, dead_mask=dead)
    w = sae.weights()
    pre = (x - sae.b_dec) @ w.W_enc + w.b_enc
    masked = pre.masked_fill(~dead, float("-inf"))
    top, idx = masked.topk(min(aux_k, int(dead.sum())), dim=-1)
    z_aux = torch.zeros_like(pre).scatter(1, idx, torch.relu(top))
    residual = (x - out.x_hat).detach()
    hand = 0.5 * ((z_aux @ w.W_dec - residual) ** 2).sum(-1).mean()
    torch.testing.assert_close(out.terms["auxk"], hand.detach())
    aux_term = out.loss - sae(x, sparsity_coeff=0.0).loss  # same graph minus the MSE: the AuxK term
    names, params = zip(*sae.named_parameters(), strict=True)
    got = dict(zip(names, torch.autograd.grad(aux_term, params), strict=True))
    want = torch.autograd.grad(hand, params)
    for name, g, h in zip(names, got.values(), want, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5, msg=name)
    assert got["W_dec"][~dead].abs().max() < 1e-6 and got["W_dec"][dead].abs().max() > 0


@pytest.mark.parametrize("dead", [None, "some"])
def test_sparse_path_equals_dense_path(dead: str | None) -> None:
    mask = dead_mask() if dead else None
    x = batch()
    results = []
    for kernel in ("dense", "sparse"):
        sae = make(kernel, aux_k=6)
        out = sae(x, sparsity_coeff=0.0, dead_mask=mask)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in sae.named_parameters()}))
    (dense, g_dense), (sparse, g_sparse) = results
    torch.testing.assert_close(sparse.loss, dense.loss)
    torch.testing.assert_close(sparse.x_hat, dense.x_hat)
    assert torch.equal(sparse.fire_counts, dense.fire_counts)
    for name, g in g_dense.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g_sparse[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_latent_major_scatter_and_gathered_dots_against_loops() -> None:
    g = torch.Generator().manual_seed(0)
    index, weights = torch.randint(0, 9, (6, 3), generator=g), torch.randn(6, 3, generator=g)
    rows, table = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    scattered = torch.zeros(9, 4)
    for b in range(6):
        for j in range(3):
            scattered[index[b, j]] += weights[b, j] * rows[b]
    dots = torch.stack([torch.stack([rows[b] @ table[index[b, j]] for j in range(3)]) for b in range(6)])
    crow = uniform_rows(6, 3, index.device)
    flat_index, flat_weights = index.reshape(-1), weights.reshape(-1)
    torch.testing.assert_close(LatentMajor(crow, flat_index, 9).scatter(flat_weights, rows), scattered)
    torch.testing.assert_close(gathered_dots(crow, flat_index, rows, table), dots.reshape(-1))


def test_sparse_ops_with_rows_of_different_lengths_against_loops() -> None:
    """BatchTopK's layout: rows keep 2, 0 and 3 entries (row pointers [0, 2, 2, 5])."""
    g = torch.Generator().manual_seed(1)
    crow, index = torch.tensor([0, 2, 2, 5]), torch.tensor([4, 1, 0, 4, 7])
    weights, rows = torch.randn(5, generator=g), torch.randn(3, 4, generator=g)
    table = torch.randn(9, 4, generator=g)
    token = [0, 0, 2, 2, 2]
    scattered = torch.zeros(9, 4)
    for e in range(5):
        scattered[index[e]] += weights[e] * rows[token[e]]
    dots = torch.stack([rows[token[e]] @ table[index[e]] for e in range(5)])
    torch.testing.assert_close(LatentMajor(crow, index, 9).scatter(weights, rows), scattered)
    torch.testing.assert_close(gathered_dots(crow, index, rows, table), dots)


def test_rescaled_decoder_weights_by_hand() -> None:
    sae = build_sae(TopKConfig(d_sae=2, k=1), 2)  # decoder_norm=rescale, the default
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.5]]))  # row norms 5 and 0.5
        sae.W_enc.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # columns are latents
        sae.b_enc.copy_(torch.tensor([1.0, -2.0]))
    w = sae.weights()
    torch.testing.assert_close(w.W_dec, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(w.W_enc, torch.tensor([[5.0, 1.0], [15.0, 2.0]]))
    torch.testing.assert_close(w.b_enc, torch.tensor([5.0, -1.0]))
    # x = (1, 0): pre-activations 5 + 5 = 10 and 1 - 1 = 0 as used; latent 0 wins and decodes to 10 * d_0
    z = sae.encode_normalized(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(z, torch.tensor([[10.0, 0.0]]))
    torch.testing.assert_close(sae.decode_normalized(z), torch.tensor([[6.0, 8.0]]) + sae.b_dec)
    projected = build_sae(TopKConfig(d_sae=2, k=1, decoder_norm="project"), 2)
    assert projected.weights().W_dec is projected.W_dec and not projected.rescaled_decoder


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_rescale_computes_what_a_projected_sae_with_its_weights_computes(kernel: str) -> None:
    rescaled, x, dead = make(kernel, aux_k=6), batch(), dead_mask()
    projected = build_sae(TopKConfig(d_sae=D_SAE, k=K, sparse_kernel=kernel, aux_k=6, decoder_norm="project"),
                          D_IN)
    with torch.no_grad():
        for name, value in rescaled.weights()._asdict().items():
            getattr(projected, name).copy_(value)
        projected.b_dec.copy_(rescaled.b_dec)
    a = rescaled(x, sparsity_coeff=0.0, dead_mask=dead)
    b = projected(x, sparsity_coeff=0.0, dead_mask=dead)
    torch.testing.assert_close(a.x_hat, b.x_hat)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(rescaled.encode(x), projected.encode(x))


def test_rescaled_weights_have_the_gradients_of_their_formula() -> None:
    """``weights()``'s written-out backward against autograd through ``W_enc n, b_enc n, W_dec / n``
    (``n`` the decoder rows' norms), in float64 on an encoder stored latent-major as in the SAE."""
    from sae_lightning.saes.base import _Rescaled

    gen = torch.Generator().manual_seed(0)
    w_enc = torch.randn(7, 5, dtype=torch.float64, generator=gen).t().requires_grad_()   # [d_in, d_sae]
    b_enc = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    w_dec = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(_Rescaled.apply, (w_enc, b_enc, w_dec))
    n = w_dec.norm(dim=1)
    grads = [torch.randn(5, 7, dtype=torch.float64, generator=gen), torch.randn(7, dtype=torch.float64,
             generator=gen), torch.randn(7, 4, dtype=torch.float64, generator=gen)]
    ours = torch.autograd.grad(_Rescaled.apply(w_enc, b_enc, w_dec), (w_enc, b_enc, w_dec), grads)
    formula = torch.autograd.grad((w_enc * n, b_enc * n, w_dec / n[:, None]), (w_enc, b_enc, w_dec), grads)
    for got, want in zip(ours, formula, strict=True):
        torch.testing.assert_close(got, want)


def test_rescaled_decoder_trains_free_rows_and_saves_them_at_unit_norm(tmp_path) -> None:
    from sae_lightning.saes import SAE
    from sae_lightning.train.step import LatentStats, train_step

    sae, x = make("sparse"), batch()
    norms = sae.W_dec.norm(dim=1).clone()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    train_step(sae, opt, x, LatentStats(D_SAE, 10**6), coeff=0.0, grad_clip=1.0, step=0)
    moved = sae.W_dec.norm(dim=1)
    assert not torch.allclose(moved, norms) and not torch.allclose(moved, torch.ones(D_SAE))  # no renorm
    loaded = SAE.load(sae.save(tmp_path / "sae"))
    torch.testing.assert_close(loaded.W_dec.norm(dim=1), torch.ones(D_SAE))
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))
