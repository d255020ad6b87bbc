"""Registry, per-architecture configs, shared SAE behaviour, the SAE folder format, decoder-bias init and the
ReLU SAEs (relu: plain L1, relu_dn: decoder-norm-weighted L1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_lightning.checks import ConfigError
from sae_lightning.saes import SAE, SAE_REGISTRY, build_sae, config_from_dict
from sae_lightning.saes.base import column_stats
from sae_lightning.saes.init import decoder_bias_init, geometric_median
from sae_lightning.saes.relu import p_at

D_IN, D_SAE, B = 12, 40, 64
# each architecture with a few of its own keys set away from their defaults
ARCH_KEYS = {"relu": {"ghost_grads": True, "p_end": 0.5, "target_l0": 5.0},
             "relu_dn": {"ghost_grads": True, "p_end": 0.5, "target_l0": 5.0}, "topk": {"k": 4, "aux_k": 8},
             "jumprelu": {"init_threshold": 0.1, "bandwidth": 0.01, "l0_coeff": 2.0, "target_l0": 5.0},
             "gated": {"target_l0": 5.0},
             "batchtopk": {"k": 4, "aux_k": 8, "threshold_lr": 0.1},
             "matryoshka": {"k": 4, "aux_k": 8, "threshold_lr": 0.1, "prefixes": [10, D_SAE]}}


def cfg(architecture: str = "relu", **kw):
    return config_from_dict({"architecture": architecture, **kw})


def make(architecture: str = "relu", **kw) -> SAE:
    torch.manual_seed(0)
    sae = build_sae(cfg(architecture, **{"d_sae": D_SAE, **kw}), D_IN)
    with torch.no_grad():  # non-trivial biases so the pre-encoder bias is exercised
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
    return sae


def batch(n: int = B) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def grads(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


def test_registry_and_sizes() -> None:
    assert set(ARCH_KEYS) <= set(SAE_REGISTRY)
    assert build_sae(cfg(dict_mult=2.5), 8).d_sae == 20
    sae = build_sae(cfg(dict_mult=2.5, d_sae=7), 8)
    assert sae.d_sae == 7
    shapes = {n: tuple(p.shape) for n, p in sae.named_parameters()}
    assert shapes == {"W_enc": (8, 7), "b_enc": (7,), "W_dec": (7, 8), "b_dec": (8,)}
    with pytest.raises(ConfigError, match="Unknown SAE architecture 'nope': choose one of"):
        cfg("nope")


@pytest.mark.parametrize("arch", sorted(ARCH_KEYS))
def test_each_architecture_refuses_the_keys_of_the_others(arch: str) -> None:
    """One config class per architecture: another architecture's key fails naming it (no silent no-op)."""
    assert type(cfg(arch, **ARCH_KEYS[arch])).__name__ == SAE_REGISTRY[arch].config_class.__name__
    foreign = {k: v for other, keys in ARCH_KEYS.items() for k, v in keys.items() if k not in ARCH_KEYS[arch]
               and other != arch}
    assert foreign
    for key, value in foreign.items():
        with pytest.raises(ConfigError, match=rf"sae\.{key} is not a key of \w+Config \(sae={arch}\)"):
            cfg(arch, **{key: value})


@pytest.mark.parametrize("arch", sorted(ARCH_KEYS))
def test_save_load_round_trip_takes_raw_activations(arch: str, tmp_path: Path) -> None:
    """SAE.save/SAE.load: same latents and reconstructions on raw activations, the scale stored with them."""
    sae = make(arch, **ARCH_KEYS[arch])
    sae.set_input_scale(0.25)
    x = batch() * 4
    folder = sae.save(tmp_path / "sae")
    meta = json.loads((folder / "cfg.json").read_text())
    assert meta["architecture"] == arch and meta["input_scale"] == 0.25 and meta["d_in"] == D_IN
    loaded = SAE.load(folder)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))
    u = x * 0.25  # encode(x) is the weights' function of the normalized input
    torch.testing.assert_close(sae.encode(x), sae.encode_normalized(u))
    torch.testing.assert_close(sae.decode(sae.encode(x)), sae.decode_normalized(sae.encode(x)) / 0.25)


def test_sae_folder_loads_with_torch_and_safetensors_alone(tmp_path: Path) -> None:
    """``SAE.load`` in a fresh interpreter imports neither Lightning, Hydra nor OmegaConf."""
    sae = make("topk", k=4)
    sae.set_input_scale(2.0)
    x = batch()
    torch.save(x, tmp_path / "x.pt")
    torch.save(sae.encode(x).detach(), tmp_path / "z.pt")
    sae.save(tmp_path / "sae")
    code = f"""
import sys, torch
from sae_lightning.saes import SAE
sae = SAE.load({str(tmp_path / "sae")!r})
z = sae.encode(torch.load({str(tmp_path / "x.pt")!r}))
assert torch.allclose(z, torch.load({str(tmp_path / "z.pt")!r}), atol=1e-6), "other latents"
frameworks = ("lightning", "pytorch_lightning", "hydra", "omegaconf")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in frameworks)
assert not heavy, heavy
print("ok", tuple(z.shape))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ok ({B}, {D_SAE})"


def test_load_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"is not an SAE folder: it has no cfg\.json"):
        SAE.load(tmp_path)
    folder = make().save(tmp_path / "sae")
    meta = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**meta, "config": {**meta["config"], "k": 3}}))
    with pytest.raises(ConfigError, match=r"sae\.k is not a key of ReLUConfig"):
        SAE.load(folder)


def test_relu_loss_matches_hand_computation() -> None:
    sae, x = make(), batch()
    out = sae(x, sparsity_coeff=0.3)
    z = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    x_hat = z @ sae.W_dec + sae.b_dec
    mse = ((x_hat - x) ** 2).sum(-1).mean()
    l1 = z.abs().sum(-1).mean()
    torch.testing.assert_close(out.x_hat, x_hat)
    torch.testing.assert_close(out.terms["reconstruction"], mse.detach())
    torch.testing.assert_close(out.terms["l1"], 0.3 * l1.detach())
    torch.testing.assert_close(out.loss, mse + 0.3 * l1)
    torch.testing.assert_close(sae.encode_normalized(x), z)


def test_fire_counts_and_l0() -> None:
    sae, x = make(), batch()
    out = sae(x, sparsity_coeff=0.0)
    active = sae.encode_normalized(x) != 0
    assert out.fire_counts.dtype == torch.int64
    assert torch.equal(out.fire_counts, active.sum(0))
    assert out.l0.item() == pytest.approx(active.sum().item() / B)
    assert 0 < out.l0.item() < D_SAE  # the check above is not vacuous
    assert out.terms["l0"] == out.l0


def test_decoder_norm_l1_matches_hand_computation_and_is_unconstrained() -> None:
    sae, x = make("relu_dn"), batch()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((D_SAE,), 0.1))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, D_SAE)[:, None])  # rows of different norms
    out = sae(x, sparsity_coeff=0.7)
    z = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    hand = sum(z[b, i] * sae.W_dec[i].norm() for b in range(B) for i in range(D_SAE)) / B
    torch.testing.assert_close(out.terms["l1"], 0.7 * hand.detach())
    out.loss.backward()
    before = sae.W_dec.detach().clone()
    grad = sae.W_dec.grad.clone()
    sae.before_optimizer_step()
    sae.after_optimizer_step()
    assert torch.equal(sae.W_dec.grad, grad) and torch.equal(sae.W_dec, before)


@pytest.mark.parametrize("arch", ["gated", "jumprelu"])
def test_free_decoder_starts_at_norm_0_1_with_the_encoder_its_transpose_and_stays_free(arch: str) -> None:
    """``sae.decoder_norm=free``: SAELens's init (rows of norm 0.1, ``W_enc = W_dec^T``), no constraint."""
    torch.manual_seed(0)
    sae = build_sae(cfg(arch, d_sae=D_SAE, decoder_norm="free"), D_IN)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((D_SAE,), 0.1))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    sae(batch(), sparsity_coeff=0.4).loss.backward()
    grad = sae.W_dec.grad.clone()
    sae.before_optimizer_step()
    assert torch.equal(sae.W_dec.grad, grad)  # no projection
    opt.step()
    sae.after_optimizer_step()
    assert (sae.W_dec.norm(dim=1) - 0.1).abs().max() > 1e-3  # the step moved the norms, nothing put them back


@pytest.mark.parametrize("arch", ["gated", "jumprelu"])
def test_project_decoder_starts_at_unit_norm_with_the_encoder_scaled_down(arch: str) -> None:
    """``sae.decoder_norm=project``: unit rows, ``W_enc = min(1, 2 d_in / d_sae) W_dec^T`` (here 24/40)."""
    torch.manual_seed(0)
    sae = build_sae(cfg(arch, d_sae=D_SAE, decoder_norm="project"), D_IN)
    assert sae.unit_norm_decoder
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.W_enc, 0.6 * sae.W_dec.t())


@pytest.mark.parametrize("arch", ["gated", "jumprelu"])
def test_decoder_norm_rejects_unknown_values_naming_the_key(arch: str) -> None:
    with pytest.raises(ConfigError, match=r"sae.decoder_norm='unit'.*choose project or free"):
        cfg(arch, decoder_norm="unit")


def test_unit_norm_decoder_after_step_and_projected_gradient() -> None:
    sae, x = make(), batch()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    opt = torch.optim.Adam(sae.parameters(), lr=0.1)
    sae(x, sparsity_coeff=0.1).loss.backward()
    assert sae.W_dec.grad.mul(sae.W_dec).sum(1).abs().max() > 1e-3  # parallel part present before
    sae.before_optimizer_step()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1) / sae.W_dec.grad.norm(dim=1)
    assert parallel.abs().max() < 1e-5
    opt.step()
    assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 1e-3  # the step moved the norms ...
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))  # ... and renorm restored them


def test_ghost_grads_zero_when_nothing_dead() -> None:
    sae, x = make(ghost_grads=True), batch()
    plain = sae(x, sparsity_coeff=0.1)
    for dead in (None, torch.zeros(D_SAE, dtype=torch.bool)):
        out = sae(x, sparsity_coeff=0.1, dead_mask=dead)
        assert out.terms["ghost"] == 0
        torch.testing.assert_close(out.loss, plain.loss)
    assert "ghost" not in make()(x, sparsity_coeff=0.1, dead_mask=torch.ones(D_SAE, dtype=torch.bool)).terms


def test_ghost_grads_only_reach_dead_latents() -> None:
    sae, x = make(ghost_grads=True), batch()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[3, 17, 30]] = True
    sae(x, sparsity_coeff=0.1).loss.backward()
    base = grads(sae)
    sae.zero_grad()
    out = sae(x, sparsity_coeff=0.1, dead_mask=dead)
    out.loss.backward()
    diff = {n: g - base[n] for n, g in grads(sae).items()}
    torch.testing.assert_close(out.terms["ghost"], out.terms["reconstruction"])  # rescaled to the main loss
    assert diff["W_enc"][:, dead].abs().amin(0).gt(0).all() and diff["W_dec"][dead].abs().amax(1).gt(0).all()
    assert diff["b_enc"][dead].abs().gt(0).all()
    for name, d in (("W_enc", diff["W_enc"][:, ~dead]), ("W_dec", diff["W_dec"][~dead]),
                    ("b_enc", diff["b_enc"][~dead]), ("b_dec", diff["b_dec"])):
        assert d.abs().max() < 1e-6, name


def test_geometric_median_is_robust_to_an_outlier() -> None:
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    pts = torch.cat([square, torch.tensor([[1000.0, 0.0]])])
    med = geometric_median(pts)
    assert pts.mean(0)[0] > 150  # the mean is dragged far away ...
    assert med.norm() < 1.0  # ... the median stays inside the square
    unit = (pts - med) / (pts - med).norm(dim=1, keepdim=True)
    assert unit.sum(0).norm() < 1e-4  # first-order optimality: unit vectors to the points cancel
    triangle = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0**0.5]])  # equilateral: centroid
    torch.testing.assert_close(geometric_median(triangle), triangle.mean(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["geometric_median", "mean", "zeros"])
def test_init_from_data_sets_b_dec(method: str) -> None:
    sample = batch(200)
    sae = make(b_dec_init=method)
    sae.set_input_scale(0.5)
    sae.init_from_data(sample)  # raw rows; b_dec lives where the weights act, on the normalized rows
    sample = sample * 0.5
    torch.testing.assert_close(sae.b_dec.detach(), decoder_bias_init(sample, method))
    expected = {"mean": sample.mean(0), "zeros": torch.zeros(D_IN)}.get(method, geometric_median(sample))
    torch.testing.assert_close(sae.b_dec.detach(), expected)



def test_geometric_median_init_is_shared_only_by_equal_samples() -> None:
    """A group's SAEs on one slot start from one sample: the median is computed once for them, and each
    gets its own copy; a sample that differs in one value gets its own median."""
    sample = batch(300) * 3
    first = decoder_bias_init(sample, "geometric_median")
    first.add_(1.0)  # an SAE writing into its b_dec must not change the next SAE's start
    again = decoder_bias_init(sample.clone(), "geometric_median")
    assert torch.equal(again, geometric_median(sample))
    other = sample.clone()
    other[0, 0] += 50.0
    assert torch.equal(decoder_bias_init(other, "geometric_median"), geometric_median(other))
    assert not torch.equal(geometric_median(other), geometric_median(sample))

def test_column_stats() -> None:
    z = torch.relu(torch.randn(1000, 37, generator=torch.Generator().manual_seed(0)))
    sums, counts = column_stats(z)  # 1000 rows: the last block is partial
    assert counts.dtype == torch.int64
    assert torch.equal(counts, torch.count_nonzero(z, dim=0))
    torch.testing.assert_close(sums, z.sum(0))


@pytest.mark.parametrize("arch", ["relu", "relu_dn"])
def test_relu_gradients_match_plain_autograd(arch: str) -> None:
    sae, x = make(arch), batch()
    sae(x, sparsity_coeff=0.3).loss.backward()
    ours = grads(sae)
    sae.zero_grad()
    z = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    weights = sae.W_dec.norm(dim=1) if arch == "relu_dn" else torch.ones(D_SAE)
    loss = ((z @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean() + 0.3 * (z * weights).sum(-1).mean()
    loss.backward()
    for name, g in grads(sae).items():
        torch.testing.assert_close(ours[name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_bf16_autocast_trains_and_counts_exactly(arch: str) -> None:
    torch.manual_seed(0)
    own = {"topk": {"k": 4}, "jumprelu": {"init_threshold": 0.1}}.get(arch, {})
    sae = build_sae(cfg(arch, d_sae=D_SAE, **own), D_IN)
    x = batch(600)  # > 256 rows: bf16 could not even hold the counts exactly
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x, sparsity_coeff=0.1)
        z = sae.encode_normalized(x)
    out.loss.backward()
    assert torch.equal(out.fire_counts, (z != 0).sum(0))
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().max() > 0 for p in sae.parameters())


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_torch_compile_matches_eager(arch: str) -> None:
    """``trainer.compile=true`` compiles the SAE (``nn.Module.compile``): its custom autograd functions and
    in-place ops must trace, and the compiled step must give eager's loss and gradients."""
    eager = make(arch, **ARCH_KEYS[arch])
    compiled = make(arch, **ARCH_KEYS[arch])
    compiled.compile()
    x = batch(300)
    outs = [sae(x, sparsity_coeff=0.5) for sae in (eager, compiled)]
    for out in outs:
        out.loss.backward()
    torch.testing.assert_close(outs[1].loss, outs[0].loss)
    assert torch.equal(outs[1].fire_counts, outs[0].fire_counts)
    for name, g in grads(eager).items():
        torch.testing.assert_close(grads(compiled)[name], g, rtol=1e-4, atol=1e-5, msg=name)


# ----- p-annealing (relu, relu_dn) ------------------------------------------------------------------
def test_p_schedule_holds_then_falls_linearly() -> None:
    c = cfg(p_start=0.9, p_end=0.2, p_anneal_start=0.5)
    assert [p_at(c, f) for f in (0.0, 0.25, 0.5)] == [0.9, 0.9, 0.9]
    assert p_at(c, 0.75) == pytest.approx(0.55) and p_at(c, 1.0) == pytest.approx(0.2)
    sae = make(p_start=0.9, p_end=0.2, p_anneal_start=0.5)
    assert sae.p == 0.9
    sae.set_progress(0.75)
    assert sae.p == pytest.approx(0.55)
    plain = make()
    plain.set_progress(0.9)
    assert plain.p == 1.0  # off by default


@pytest.mark.parametrize("arch", ["relu", "relu_dn"])
def test_lp_penalty_and_its_rescaling_match_hand_computation(arch: str) -> None:
    """At p = 0.5 the term's value is coeff * S_1 (the L1 term's) and its gradient coeff * (S_1 / S_p) * dS_p,
    with ``S_p = mean_tokens sum_i w_i z_i^p`` (w = 1, or the decoder row norms for relu_dn)."""
    sae, x = make(arch, p_end=0.5, p_anneal_start=0.0), batch()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])
    sae.set_progress(1.0)
    out = sae(x, sparsity_coeff=0.3)
    out.loss.backward()

    z = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    w = sae.W_dec.norm(dim=1) if arch == "relu_dn" else torch.ones(D_SAE)
    assert 0 < (z > 0).float().mean() < 1
    s_p = sum(w[i] * z[b, i] ** 0.5 for b in range(B) for i in range(D_SAE) if z[b, i] > 0) / B
    s_1 = (z * w).sum() / B
    mse = ((z @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean()
    torch.testing.assert_close(out.terms["l1"], 0.3 * s_1.detach())
    hand = mse + 0.3 * (s_1 / s_p).detach() * s_p
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    for name, g in zip(names, torch.autograd.grad(hand, [getattr(sae, n) for n in names]), strict=True):
        assert torch.isfinite(g).all()  # z^p's infinite slope at 0 stays out
        torch.testing.assert_close(getattr(sae, name).grad, g, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize(("key", "value"), [("p_end", 0.0), ("p_start", 1.5), ("p_anneal_start", 1.0),
                                            ("target_l0", 0.0)])
def test_p_anneal_and_target_l0_keys_are_checked(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"sae\.{key}={value}"):
        cfg(**{key: value})
