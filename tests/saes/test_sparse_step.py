"""The penalised SAEs' sparse kernels (``sae.sparse_kernel``) against the dense path: the same loss terms,
fire counts, gradients and optimizer step, for every architecture and option that changes what reaches the
entries (p-annealing, ghost grads, JumpReLU's straight-through variants and terms, the gated decoders,
transcoders with a skip), and the per-step choice of ``auto``."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.checks import ConfigError
from sae_lightning.saes import SAE, build_sae, config_from_dict, sparse_ops
from sae_lightning.saes.sparse_ops import Dense, Entries, layout
from sae_lightning.train.step import LatentStats, train_step

D_IN, D_OUT, D_SAE, B = 12, 7, 96, 64
CASES = {
    "relu": {},
    "relu ghost p": {"ghost_grads": True, "p_start": 0.6},
    "relu_dn": {},
    "relu_dn p": {"p_start": 0.5},
    "jumprelu": {"bandwidth": 0.5},
    "jumprelu ste tanh": {"bandwidth": 0.5, "ste_to_input": True, "sparsity_loss": "tanh"},
    "jumprelu target preact": {"bandwidth": 0.5, "target_l0": 20.0, "pre_act_coeff": 0.1,
                               "decoder_norm": "free"},
    "gated": {},
    "gated frozen project": {"aux_decoder": "frozen", "decoder_norm": "project"},
}


def make(case: str, kernel: str, d_out: int | None = None, skip: bool = False) -> SAE:
    """The case's SAE with random biases, thresholds and gated magnitudes, about a fifth of its latents
    active on :func:`batch` (so both the entries and the latents outside them matter)."""
    torch.manual_seed(0)
    arch = case.split()[0]
    sae = build_sae(config_from_dict({"architecture": arch, "d_sae": D_SAE, "sparse_kernel": kernel,
                                      "skip": skip, **CASES[case]}), D_IN, d_out)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.W_dec.mul_(0.5 + torch.rand(D_SAE, 1))
        sae.b_enc.normal_(-1.0, 0.3)
        if skip:
            sae.W_skip.normal_(0, 0.1)
        if arch == "jumprelu":
            sae.b_enc.zero_()
            sae.threshold.uniform_(0.5, 1.5)
        if arch == "gated":
            sae.r_mag.normal_(std=0.5)
            sae.b_mag.normal_(std=0.3)
    return sae


def batch(d: int = D_IN, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, d, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def dead() -> torch.Tensor:
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[::5] = True
    return mask


def run(case: str, kernel: str, d_out: int | None = None, skip: bool = False):
    """(output, gradients, parameters after one ``train_step``) of the case under ``kernel``."""
    sae = make(case, kernel, d_out, skip)
    x, y = batch(), None if d_out is None else batch(d_out, seed=2)
    u = sae.normalize(x)
    out = sae(u, target=None if y is None else sae.normalize_target(y), sparsity_coeff=0.3, dead_mask=dead())
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    stats = LatentStats(D_SAE, 1)
    stats.tokens_since_fired[dead()] = 10  # the same dead latents in the step
    opt = torch.optim.Adam(sae.param_groups(1e-2))
    train_step(sae, opt, x, stats, coeff=0.3, grad_clip=1.0, step=0, target=y)
    return out, grads, {n: p.detach().clone() for n, p in sae.named_parameters()}


def assert_same(case: str, d_out: int | None = None, skip: bool = False) -> None:
    dense, sparse = run(case, "dense", d_out, skip), run(case, "sparse", d_out, skip)
    assert torch.equal(dense[0].fire_counts, sparse[0].fire_counts)
    assert 0 < dense[0].l0 < D_SAE / 2
    torch.testing.assert_close(sparse[0].x_hat, dense[0].x_hat, rtol=1e-5, atol=1e-5)
    assert dense[0].terms.keys() == sparse[0].terms.keys()
    for name, term in dense[0].terms.items():
        torch.testing.assert_close(sparse[0].terms[name], term, rtol=1e-5, atol=1e-6, msg=name)
    for name, grad in dense[1].items():
        assert grad.abs().max() > 0, name  # every parameter is exercised
        torch.testing.assert_close(sparse[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, param in dense[2].items():
        torch.testing.assert_close(sparse[2][name], param, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_sparse_kernels_equal_the_dense_path(case: str) -> None:
    assert_same(case)


@pytest.mark.parametrize("case", ["relu", "jumprelu", "gated"])
def test_sparse_kernels_equal_the_dense_path_for_transcoders_with_a_skip(case: str) -> None:
    assert_same(case, d_out=D_OUT, skip=True)


def test_the_jumprelu_entries_include_the_band_below_the_threshold() -> None:
    """Latents inside the straight-through band but below their threshold are zero and still move the
    threshold: without them the threshold gradients would differ (the case above checks they do not)."""
    sae = make("jumprelu", "sparse")
    with torch.no_grad():
        pre = sae.pre_acts(sae.normalize(batch()))
        gap = pre - sae.threshold
    assert bool(((gap > -0.25) & (gap <= 0)).any())


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "gated"])
def test_nothing_active_gives_zero_latents_on_both_paths(arch: str) -> None:
    outs = []
    for kernel in ("dense", "sparse"):
        sae = make(arch, kernel)
        with torch.no_grad():
            sae.b_enc.fill_(-100.0)
        out = sae(sae.normalize(batch()), sparsity_coeff=0.3)
        out.loss.backward()
        outs.append((out, sae.W_enc.grad))
    assert outs[1][0].l0 == 0 and outs[0][0].l0 == 0
    torch.testing.assert_close(outs[1][0].loss, outs[0][0].loss)
    torch.testing.assert_close(outs[1][1], outs[0][1])


def test_auto_picks_the_layout_from_the_batch_share_of_entries_in_play() -> None:
    share = sparse_ops.SPARSE_MAX_SHARE
    mask = torch.zeros(32, 64, dtype=torch.bool)
    n = int(share * mask.numel())
    mask.view(-1)[:n] = True
    chosen = layout(mask, "auto")
    assert isinstance(chosen, Entries) and chosen.index.numel() == n
    mask.view(-1)[n] = True
    assert isinstance(layout(mask, "auto"), Dense)
    assert isinstance(layout(mask, "sparse"), Entries)
    assert isinstance(layout(torch.zeros_like(mask), "dense"), Dense)


def test_entries_are_row_major_with_row_pointers() -> None:
    mask = torch.tensor([[False, True, True], [False, False, False], [True, False, True]])
    entries = Entries.where(mask)
    assert entries.crow.tolist() == [0, 2, 2, 4] and entries.index.tolist() == [1, 2, 0, 2]
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    dense = torch.zeros(3, 3).masked_scatter(mask, values)
    table = torch.randn(3, 5)
    torch.testing.assert_close(entries.decode(values, table), dense @ table)
    torch.testing.assert_close(entries.latent_sums(values), dense.sum(0))


def test_a_bad_sparse_kernel_names_its_key() -> None:
    with pytest.raises(ConfigError, match=r"sae\.sparse_kernel"):
        config_from_dict({"architecture": "relu", "sparse_kernel": "fast"})
