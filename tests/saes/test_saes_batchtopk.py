"""BatchTopK and Matryoshka BatchTopK: selection over the whole batch, the inference threshold, the nested
prefix losses, the sparse path against the dense one, presets and key checks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize

from sae_lightning.checks import ConfigError
from sae_lightning.config import register_configs, to_config
from sae_lightning.evaluate.prefixes import has_prefixes, prefix_metrics
from sae_lightning.saes import SAE, build_sae, config_from_dict
from sae_lightning.saes.batchtopk import batch_top
from sae_lightning.saes.matryoshka import default_prefixes

D_IN, D_SAE, K, B = 8, 32, 3, 20


def make(architecture: str = "batchtopk", **kw) -> SAE:
    torch.manual_seed(0)
    sae = build_sae(config_from_dict({"architecture": architecture, "d_sae": D_SAE, "k": K, **kw}), D_IN)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
        # row norms 0.5 to 1.5, unequal (a rescaled decoder divides them out), whatever the init norm
        sae.W_dec.mul_((0.5 + torch.rand(D_SAE, 1)) / sae.W_dec.norm(dim=1, keepdim=True))
    return sae


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, D_IN, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def hand_latents(sae: SAE, u: torch.Tensor) -> torch.Tensor:
    """Keep the K * B largest relu'd pre-activations of the batch, found by sorting all of them."""
    w = sae.weights()
    acts = torch.relu((u - sae.b_dec) @ w.W_enc + w.b_enc)
    cut = acts.flatten().sort(descending=True).values[K * u.shape[0] - 1]
    return acts * (acts >= cut)


def test_batch_top_on_a_hand_example() -> None:
    pre = torch.tensor([[5.0, -1.0, 0.5, 4.0],
                        [0.1, 0.2, -3.0, 0.3],
                        [6.0, 7.0, 8.0, 0.4]])
    flat, values = batch_top(pre, 2)  # 6 of 12 entries: 8, 7, 6, 5, 4 and 0.5
    assert flat.tolist() == [0, 2, 3, 8, 9, 10]
    assert values.tolist() == [5.0, 0.5, 4.0, 6.0, 7.0, 8.0]
    for hint in (0.3, 3.0, 4.5):  # below the cut (6 candidates ranked) or above it (too few: all ranked)
        hinted = batch_top(pre, 2, hint=hint)
        assert hinted[0].tolist() == flat.tolist() and hinted[1].tolist() == values.tolist()
    kept_zero = batch_top(torch.tensor([[1.0, -2.0], [-1.0, -3.0]]), 1)[1]  # 2 kept, only one positive
    assert sorted(kept_zero.tolist()) == [0.0, 1.0]


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_forward_matches_hand_computation(kernel: str) -> None:
    sae, u = make(sparse_kernel=kernel), batch()
    out = sae(u, sparsity_coeff=0.0)
    z = hand_latents(sae, u)
    x_hat = z @ sae.weights().W_dec + sae.b_dec
    torch.testing.assert_close(out.x_hat, x_hat)
    torch.testing.assert_close(out.loss, ((x_hat - u) ** 2).sum(-1).mean())
    assert torch.equal(out.fire_counts, (z > 0).sum(0))
    assert out.l0.item() == K  # every kept value is positive here ...
    assert len(set((z > 0).sum(1).tolist())) > 1  # ... and rows keep different numbers of latents


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
@pytest.mark.parametrize("dead", [None, "some"])
def test_sparse_path_equals_dense_path(dead: str | None, arch: str) -> None:
    """Loss terms (each prefix's for matryoshka), every gradient and the threshold update agree."""
    mask = torch.arange(D_SAE) % 3 == 0 if dead else None
    results = []
    for kernel in ("dense", "sparse"):
        sae = make(arch, sparse_kernel=kernel, aux_k=4)
        out = sae(batch(), sparsity_coeff=0.0, dead_mask=mask)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in sae.named_parameters()}, sae.threshold.clone()))
    (dense, g_dense, t_dense), (sparse, g_sparse, t_sparse) = results
    torch.testing.assert_close(sparse.loss, dense.loss)
    assert sparse.terms.keys() == dense.terms.keys()
    for name, term in dense.terms.items():
        torch.testing.assert_close(sparse.terms[name], term, msg=name)
    assert (dense.terms["auxk"] > 0) == bool(dead)
    assert torch.equal(t_sparse, t_dense)
    for name, g in g_dense.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g_sparse[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_threshold_is_a_moving_average_of_the_smallest_kept_activation() -> None:
    sae = make(threshold_lr=0.25)
    assert sae.threshold.item() == 0 and torch.equal(sae.encode(batch()), torch.relu(sae.encode(batch())))
    smallest = []
    for seed in (1, 2, 3):
        u = batch(seed)
        z = hand_latents(sae, u)
        smallest.append(z[z > 0].min().item())
        sae(u, sparsity_coeff=0.0)
    hand = smallest[0]  # the first batch sets it, later ones move it by a quarter of the way
    for m in smallest[1:]:
        hand = 0.75 * hand + 0.25 * m
    assert sae.threshold.item() == pytest.approx(hand, rel=1e-6)
    assert int(sae.threshold_batches) == 3
    sae.eval()
    sae(batch(4), sparsity_coeff=0.0)  # evaluation forwards leave it alone
    assert sae.threshold.item() == pytest.approx(hand, rel=1e-6)
    u = batch(5)
    w = sae.weights()
    pre = (u - sae.b_dec) @ w.W_enc + w.b_enc
    z = sae.encode_normalized(u)
    torch.testing.assert_close(z, pre * (pre > hand))
    assert (z > 0).any() and ((pre > 0) & (z == 0)).any()  # the threshold, not the ReLU, cut some


def test_save_load_keeps_the_threshold(tmp_path: Path) -> None:
    sae = make()
    sae(batch(), sparsity_coeff=0.0)
    loaded = SAE.load(sae.save(tmp_path / "sae"))
    assert loaded.threshold.item() == pytest.approx(sae.threshold.item(), rel=1e-7) and loaded.threshold > 0
    assert int(loaded.threshold_batches) == 1
    torch.testing.assert_close(loaded.encode(batch(2)), sae.encode(batch(2)))


def test_matryoshka_prefix_losses_match_hand_computation() -> None:
    sae, u, dead = make("matryoshka", prefixes=[4, 12, D_SAE]), batch(), torch.arange(D_SAE) % 4 == 1
    out = sae(u, sparsity_coeff=0.0, dead_mask=dead)
    z = hand_latents(sae, u)
    w_dec = sae.weights().W_dec
    recon = {m: ((z[:, :m] @ w_dec[:m] + sae.b_dec - u) ** 2).sum(-1).mean() for m in (4, 12, D_SAE)}
    torch.testing.assert_close(out.terms["reconstruction_p4"], recon[4].detach())
    torch.testing.assert_close(out.terms["reconstruction_p12"], recon[12].detach())
    torch.testing.assert_close(out.terms["reconstruction"], recon[D_SAE].detach())
    assert "reconstruction_p32" not in out.terms and out.terms["auxk"] > 0
    hand_loss = recon[4] + recon[12] + recon[D_SAE] + out.terms["auxk"]
    torch.testing.assert_close(out.loss, hand_loss)
    torch.testing.assert_close(out.x_hat, z @ sae.weights().W_dec + sae.b_dec)
    # gradients without AuxK (no dead mask): ours against plain autograd on the hand loss
    params = dict(sae.named_parameters())
    ours = torch.autograd.grad(sae(u, sparsity_coeff=0.0).loss, list(params.values()))
    theirs = torch.autograd.grad(recon[4] + recon[12] + recon[D_SAE], list(params.values()))
    for name, g_ours, g_hand in zip(params, ours, theirs, strict=True):
        assert g_hand.abs().max() > 0, name
        torch.testing.assert_close(g_ours, g_hand, rtol=1e-4, atol=1e-5, msg=name)


def test_matryoshka_prefix_reconstructions_use_each_prefix_alone() -> None:
    sae, x = make("matryoshka", prefixes=[4, 12, D_SAE]), batch()
    sae.set_input_scale(0.5)
    sae(x * 0.5, sparsity_coeff=0.0)  # sets the threshold
    recs = sae.prefix_reconstructions(x)
    z = sae.encode(x)
    assert list(recs) == [4, 12, D_SAE]
    torch.testing.assert_close(recs[D_SAE], sae.decode(z))
    only_4 = z.clone()
    only_4[:, 4:] = 0
    torch.testing.assert_close(recs[4], sae.decode(only_4))
    assert not torch.allclose(recs[4], recs[12])


def test_matryoshka_prefix_checks_name_the_key() -> None:
    assert default_prefixes(4096) == [64, 256, 1024, 4096] and default_prefixes(8) == [1, 2, 8]
    assert make("matryoshka").prefixes == [1, 2, 8, 32]  # default from d_sae
    with pytest.raises(ConfigError, match=r"sae\.prefixes.*last prefix must be the dictionary size d_sae=32"):
        make("matryoshka", prefixes=[4, 16])
    with pytest.raises(ConfigError, match=r"sae\.prefixes.*strictly increasing"):
        make("matryoshka", prefixes=[16, 4, 32])
    with pytest.raises(ConfigError, match=r"sae\.prefixes.*must be > 0"):
        make("matryoshka", prefixes=[0, 32])
    with pytest.raises(ConfigError, match=r"sae\.threshold_lr"):
        make(threshold_lr=0.0)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_quickstart_composes_with_the_presets(arch: str) -> None:
    register_configs()
    with initialize(config_path="../../conf", version_base="1.3"):
        cfg = to_config(compose("train", overrides=["experiment=quickstart", f"sae={arch}"]))
        over = ["sae=matryoshka", "sae.d_sae=64", "sae.prefixes=[8,16,64]", "sae.k=4"]
        own = to_config(compose("train", overrides=over))
    assert cfg.sae.architecture == arch and cfg.sae.k == 32 and cfg.sae.dict_mult == 2
    assert build_sae(cfg.sae, 16).d_sae == 32
    assert own.sae.prefixes == [8, 16, 64] and build_sae(own.sae, 16).prefixes == [8, 16, 64]


def test_prefix_metrics_over_batches_match_hand_nmse() -> None:
    sae, x = make("matryoshka", prefixes=[4, 12, D_SAE]), torch.cat([batch(1), batch(2)])
    sae(x, sparsity_coeff=0.0)
    sae.eval()
    rows = [SimpleNamespace(acts=part) for part in x.split(7)]  # uneven batches
    got = prefix_metrics(rows, sae)
    assert set(got) == {f"{name}_p{m}" for name in ("nmse", "explained_variance") for m in (4, 12, D_SAE)}
    z = sae.encode(x)
    variance = ((x - x.mean(0)) ** 2).sum()
    for m in (4, 12, D_SAE):
        nmse = ((x - (z[:, :m] @ sae.weights().W_dec[:m] + sae.b_dec)) ** 2).sum() / variance
        assert got[f"nmse_p{m}"] == pytest.approx(nmse.item(), rel=1e-5)
        assert got[f"explained_variance_p{m}"] == pytest.approx(1 - nmse.item(), rel=1e-5, abs=1e-6)
    assert has_prefixes(sae) and not has_prefixes(make())


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_auto_kernel_is_sparse_up_to_an_eighth_of_the_dictionary(arch: str) -> None:
    assert make(arch, k=4).sparse and not make(arch, k=5).sparse  # d_sae = 32
    assert make(arch, k=5, sparse_kernel="sparse").sparse
    assert not make(arch, k=4, sparse_kernel="dense").sparse


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_bf16_autocast_trains_keeps_k_per_token_and_a_float64_threshold(arch: str) -> None:
    sae = make(arch)
    with torch.no_grad():
        sae.b_enc.fill_(20.0)  # every kept activation positive: exactly K * n fire
    x = torch.randn(600, D_IN, generator=torch.Generator().manual_seed(3))  # > 256: bf16 cannot count it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x, sparsity_coeff=0.0)
    out.loss.backward()
    assert int(out.fire_counts.sum()) == K * 600 and out.l0.item() == K
    assert sae.threshold.dtype == torch.float64 and sae.threshold > 0
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().max() > 0 for p in sae.parameters())
