"""Transcoders (read one hook, reconstruct another) and their skip connection: the maths by hand, every
architecture as a transcoder, save/load, config checks, aligned (x, y) pairs from the caches, and CE loss
recovered with the target hook fed from the input hook."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sae_lightning.cache import CacheError, CacheKey, build_cache
from sae_lightning.cache.datamodule import ActivationDataModule
from sae_lightning.checks import ConfigError
from sae_lightning.config import ActivationsConfig, TrainConfig
from sae_lightning.saes import SAE, SAE_REGISTRY, build_sae, config_from_dict
from sae_lightning.train.step import LatentStats, train_step


def _by_hand_relu() -> SAE:
    """d_in=2, d_sae=2, d_out=3 ReLU transcoder with a skip; weights chosen for the hand computation."""
    sae = build_sae(config_from_dict({"architecture": "relu", "d_sae": 2, "skip": True}), 2, d_out=3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        sae.b_dec.copy_(torch.ones(3))
        sae.W_skip.copy_(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    return sae


def test_relu_transcoder_with_skip_matches_the_hand_computation() -> None:
    """Row 1: u=(2,3): pre = u @ I + (0,-1) = (2,2) (nothing subtracted: b_dec lives in the target space),
    z=(2,2), û = (2,2,0) + b_dec (1,1,1) + u @ W_skip (0,0,2) = (3,3,3); target (3,1,3): squared error 4.
    Row 2: u=0: pre=(0,-1), z=0, û = b_dec = target: error 0. Recon 4/2 = 2; L1 0.5 * 4/2 = 1; L0 2/2 = 1."""
    sae = _by_hand_relu()
    u = torch.tensor([[2.0, 3.0], [0.0, 0.0]])
    target = torch.tensor([[3.0, 1.0, 3.0], [1.0, 1.0, 1.0]])
    out = sae(u, target=target, sparsity_coeff=0.5)
    torch.testing.assert_close(out.x_hat, torch.tensor([[3.0, 3.0, 3.0], [1.0, 1.0, 1.0]]))
    assert out.terms["reconstruction"].item() == pytest.approx(2.0)
    assert out.terms["l1"].item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(3.0) and out.l0.item() == pytest.approx(1.0)
    out.loss.backward()
    # d recon / d W_skip = 2/B u^T (û - t): only row 1 errs, e=(0, 2, 0); u1 (x) e = [[0,4,0],[0,6,0]]
    torch.testing.assert_close(sae.W_skip.grad, torch.tensor([[0.0, 4.0, 0.0], [0.0, 6.0, 0.0]]) * 2 / 2)


def test_raw_decode_uses_both_scales_and_needs_the_input_for_the_skip() -> None:
    """Raw x = u / input_scale; the raw output is û / target_scale: x=(1, 1.5), input_scale 2 -> u=(2,3),
    û=(3,3,3), target_scale 0.5 -> (6,6,6)."""
    sae = _by_hand_relu()
    sae.set_input_scale(2.0)
    sae.set_target_scale(0.5)
    x = torch.tensor([[1.0, 1.5]])
    torch.testing.assert_close(sae.decode(sae.encode(x), x), torch.tensor([[6.0, 6.0, 6.0]]))
    with pytest.raises(ValueError, match="skip connection: decode"):
        sae.decode(sae.encode(x))


def test_topk_transcoder_by_hand_and_sparse_equals_dense() -> None:
    """k=1: pre = (2, 2.5) -> only latent 1 fires with 2.5: û = (0, 2.5, 0) + b_dec (1,1,1) + skip (0,0,2)."""
    def make(kernel: str) -> SAE:
        sae = build_sae(config_from_dict({"architecture": "topk", "d_sae": 2, "k": 1, "skip": True,
                                          "sparse_kernel": kernel}), 2, d_out=3)
        ref = _by_hand_relu()
        sae.load_state_dict(ref.state_dict())
        with torch.no_grad():
            sae.b_enc.copy_(torch.tensor([0.0, -0.5]))
        return sae

    u = torch.tensor([[2.0, 3.0]])
    target = torch.tensor([[1.0, 3.5, 3.0]])
    dense, sparse = make("dense"), make("sparse")
    dead = torch.tensor([True, False])
    outs = [m(u, target=target, sparsity_coeff=0.0, dead_mask=dead) for m in (dense, sparse)]
    torch.testing.assert_close(outs[0].x_hat, torch.tensor([[1.0, 3.5, 3.0]]))
    for out in outs:
        out.loss.backward()
    for name, p in dense.named_parameters():
        torch.testing.assert_close(p.grad, dict(sparse.named_parameters())[name].grad, msg=name)


@pytest.mark.parametrize("arch", sorted(SAE_REGISTRY))
def test_every_architecture_trains_and_round_trips_as_a_transcoder(arch: str, tmp_path) -> None:
    torch.manual_seed(0)
    d_in, d_out = 6, 4
    own = {"k": 4} if arch in ("topk", "batchtopk", "matryoshka") else {}
    values = {"architecture": arch, "d_sae": 16, "skip": True} | own
    sae = build_sae(config_from_dict(values), d_in, d_out=d_out)
    assert sae.transcoder and sae.W_dec.shape == (16, d_out) and sae.W_enc.shape == (d_in, 16)
    assert sae.b_dec.shape == (d_out,) and not sae.W_skip.any()  # skip starts at zero
    sae.set_input_scale(2.0)
    sae.set_target_scale(0.25)
    x = torch.randn(64, d_in)
    y = x[:, :d_out] * 3 + 1
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    stats = LatentStats(sae.d_sae, 10**6)
    losses = [train_step(sae, opt, x, stats, coeff=1e-3, grad_clip=1.0, step=i, target=y).loss.item()
              for i in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    assert sae.W_skip.abs().sum() > 0
    sae.save(tmp_path / "tc")
    loaded = SAE.load(tmp_path / "tc")
    assert (loaded.d_out, loaded.transcoder, float(loaded.target_scale)) == (d_out, True, 0.25)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(x), x), sae.decode(sae.encode(x), x))


@pytest.mark.parametrize("values", [{"architecture": "relu", "ghost_grads": True},
                                    {"architecture": "topk", "k": 2, "aux_k": 4}])
def test_dead_latent_terms_reconstruct_the_target_residual(values: dict) -> None:
    """Ghost grads and AuxK fit the residual ``target - x_hat`` (d_out=3 wide; ``u - x_hat`` would not even
    have that shape): with every latent dead the term is positive and finite, and it backpropagates."""
    torch.manual_seed(0)
    sae = build_sae(config_from_dict({**values, "d_sae": 8}), 5, d_out=3)
    out = sae(torch.randn(16, 5), target=torch.randn(16, 3), sparsity_coeff=0.0,
              dead_mask=torch.ones(8, dtype=torch.bool))
    term = out.terms["ghost" if "ghost_grads" in values else "auxk"]
    assert torch.isfinite(term) and term > 0
    out.loss.backward()
    assert sae.W_dec.grad.abs().sum() > 0


def test_plain_sae_state_is_unchanged() -> None:
    """No target_scale buffer, no W_skip, b_dec subtracted: an SAE's checkpoints load as before."""
    sae = build_sae(config_from_dict({"architecture": "relu", "d_sae": 8}), 4)
    assert set(sae.state_dict()) == {"W_dec", "W_enc", "b_enc", "b_dec", "input_scale"}
    assert not sae.transcoder and sae.d_out == 4 and sae.output_scale is sae.input_scale


@pytest.mark.parametrize(("overrides", "key"), [
    ({"sae": {"architecture": "relu", "skip": True}}, "sae.skip"),
    ({"target": {"name": "mlp_post"}}, "target.name"),
    ({"target": {"name": "attn_z"}}, "target.name"),
    ({"target": {"name": "mlp_out"}, "callbacks": {"resample": True}}, "callbacks.resample"),
    ({"target": {"name": "mlp_out"}, "activations": {"source": "file", "path": "x.npy"}}, "target.name"),
])
def test_bad_transcoder_configs_name_the_key(overrides: dict, key: str) -> None:
    from sae_lightning.config import train_config_from_dict

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train_config_from_dict(overrides)


def test_target_layer_defaults_to_the_root_layer() -> None:
    from sae_lightning.config import train_config_from_dict

    assert train_config_from_dict({"layer": 2, "target": {"name": "mlp_out"}}).target_hook == (2, "mlp_out")
    cfg = train_config_from_dict({"layer": 2, "hook": {"name": "resid_post"},
                                  "target": {"name": "mlp_out", "layer": 3}})
    assert cfg.target_hook == (3, "mlp_out") and isinstance(cfg, TrainConfig)


# ----- aligned pairs from the caches ---------------------------------------------------------------------
def _pair_caches(tmp_path, shard_rows: tuple[int, int] = (40, 40)):
    """Two hook caches of one text whose rows say where they are: x = (t, 2t, 3t), y = (-t, t*t) for the
    token t, with every token id unique (doc * 8 + pos + 1) and tokens divisible by 7 excluded."""
    batches = [torch.arange(1, 33).reshape(4, 8) + 32 * i for i in range(10)]
    key = CacheKey(model="m", data="d", hooks=("L0.x", "L1.y"), context_size=8, n_tokens=320)

    def compute(t: torch.Tensor) -> dict[str, torch.Tensor]:
        t = t.float()
        return {"L0.x": torch.stack([t, 2 * t, 3 * t], -1), "L1.y": torch.stack([-t, t * t], -1)}

    exclude = lambda t: t % 7 == 0  # noqa: E731
    if shard_rows[0] == shard_rows[1]:
        paths = build_cache(key, batches, compute, exclude, tmp_path, shard_rows=shard_rows[0])
    else:
        paths = {h: build_cache(key.for_hook(h), batches, compute, exclude, tmp_path / h, shard_rows=n)[h]
                 for h, n in zip(key.hooks, shard_rows, strict=True)}
    from sae_lightning.cache.reader import ActivationCache

    return ActivationCache(paths["L0.x"]), ActivationCache(paths["L1.y"])


def _dm(x, y, rank: int = 0, world: int = 1) -> ActivationDataModule:
    cfg = ActivationsConfig(shard_rows=40, val_fraction=0.2, shuffle_buffer=64, normalize=True)
    dm = ActivationDataModule(x, cfg, 8, 0, target=y)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    dm.setup("fit")
    dm.trainer = None
    return dm


def test_stream_yields_aligned_pairs_in_the_plain_stream_order(tmp_path) -> None:
    x, y = _pair_caches(tmp_path)
    cfg = ActivationsConfig(shard_rows=40, val_fraction=0.2, shuffle_buffer=64)
    plain = ActivationDataModule(x, cfg, 8, 0)
    for rank in (0, 1):
        dm = _dm(x, y, rank, world=2)
        assert (dm.d_in, dm.d_out) == (3, 2) and dm.target_norm_scale == pytest.approx(y.norm_scale)
        it = iter(dm.train_dataloader())
        for _ in range(40):  # several epochs and shuffle windows
            xb, yb = next(it)
            assert xb.shape == (8, 3) and yb.shape == (8, 2)
            assert torch.equal(yb[:, 0], -xb[:, 0]) and torch.equal(yb[:, 1], xb[:, 0] ** 2)
    first = [b for _, b in zip(range(20), plain.train_dataloader(), strict=False)]
    paired = [b for _, b in zip(range(20), _dm(x, y).train_dataloader(), strict=False)]
    assert all(torch.equal(a, p[0]) for a, p in zip(first, paired, strict=True))  # same order as an SAE's


def test_pair_stream_resumes_at_the_exact_next_pair(tmp_path) -> None:
    x, y = _pair_caches(tmp_path)
    full = [b for _, b in zip(range(30), _dm(x, y).train_dataloader(), strict=False)]
    resumed = _dm(x, y)
    resumed.load_state_dict({**resumed.state_dict(), "batches": 17})
    got = [b for _, b in zip(range(5), resumed.train_dataloader(), strict=False)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(got, full[17:22], strict=True))


def test_eval_rows_and_samples_carry_aligned_targets(tmp_path) -> None:
    x, y = _pair_caches(tmp_path)
    dm = _dm(x, y)
    rows = list(dm.eval_rows(max_tokens=30, batch_size=8))
    assert sum(len(r.tokens) for r in rows) == 30
    for r in rows:
        t = r.tokens.float()
        assert torch.equal(r.acts[:, 0], t) and torch.equal(r.target[:, 0], -t)
        assert torch.equal(r.tokens, r.doc * 8 + r.pos + 1)   # the (doc, pos) the token came from
    xs, ys = dm.sample(50, seed=3), dm.sample_targets(50, seed=3)
    assert torch.equal(ys[:, 0], -xs[:, 0])


def test_misaligned_target_cache_is_refused(tmp_path) -> None:
    x, y = _pair_caches(tmp_path, shard_rows=(40, 30))
    with pytest.raises(CacheError, match="not row-aligned"):
        _dm(x, y)


# ----- CE loss recovered through the input hook -------------------------------------------------------
def _exact_mlp_transcoder(lm, layer: int) -> SAE:
    """A transcoder mlp_post -> mlp_out that IS the MLP's output projection: no latent fires (b_enc very
    negative), the skip holds c_proj's weight and b_dec its bias, rescaled for the input/target scales."""
    from sae_lightning.lm import HookPoint

    hook = HookPoint(layer, "mlp_post")
    w = lm.output_projection(hook)  # [d_mlp, d_model]
    proj = lm._module(hook)
    s_in, s_t = 3.0, 0.5
    sae = build_sae(config_from_dict({"architecture": "relu", "d_sae": 8, "skip": True}), w.shape[0],
                    d_out=w.shape[1])
    sae.set_input_scale(s_in)
    sae.set_target_scale(s_t)
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)
        sae.W_skip.copy_(w * (s_t / s_in))
        sae.b_dec.copy_(proj.bias * s_t)
    return sae


def test_exact_transcoder_recovers_all_the_loss(tiny_gpt2) -> None:
    from sae_lightning.evaluate.downstream import downstream_metrics
    from sae_lightning.lm import HookPoint
    from sae_lightning.lm.text import special_token_mask

    rows = torch.randint(3, len(tiny_gpt2.tokenizer), (4, 10), generator=torch.Generator().manual_seed(1))
    rows[:, 0] = tiny_gpt2.tokenizer.bos_token_id
    sae = _exact_mlp_transcoder(tiny_gpt2, 1)
    m = downstream_metrics(tiny_gpt2, [rows], HookPoint(1, "mlp_out"), sae,
                           input_hook=HookPoint(1, "mlp_post"),
                           exclude=lambda t: special_token_mask(t, tiny_gpt2.tokenizer))
    assert abs(m["ce_loss_zero"] - m["ce_loss_clean"]) > 1e-3
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_clean"], abs=1e-4)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert m["kl_div"] == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="ran before input hook"):  # resid_post of layer 1 comes after
        downstream_metrics(tiny_gpt2, [rows], HookPoint(0, "mlp_out"), sae,
                           input_hook=HookPoint(1, "resid_post"))


def test_ensure_cache_adds_the_target_hook_to_one_build() -> None:
    from sae_lightning.cache.ensure import hook_points
    from sae_lightning.config import train_config_from_dict

    cfg = train_config_from_dict({"layer": 1, "hook": {"name": "mlp_post", "extra": ["mlp_out"]},
                                  "target": {"name": "resid_post", "layer": 2}})
    assert hook_points(cfg) == [(1, "mlp_post"), (1, "mlp_out"), (2, "resid_post")]
    cfg = train_config_from_dict({"layer": 1, "hook": {"name": "mlp_post", "extra": ["mlp_out"]},
                                  "target": {"name": "mlp_out"}})
    assert hook_points(cfg) == [(1, "mlp_post"), (1, "mlp_out")]
    assert hook_points(train_config_from_dict({"layer": 1})) == [(1, "mlp_post")]


@pytest.mark.parametrize(("architecture", "export", "match"), [
    ("topk", "saelens", "SAELens format has no 'topk' transcoder"),
    ("gated", "circuit_tracer", "ReLU and JumpReLU activations, not a 'gated' transcoder"),
    ("relu", ["saelens", "circuit_tracer"], r"export=circuit_tracer: .* layers \[2\].*group folder"),
])
def test_an_export_the_format_cannot_hold_is_refused_before_any_work(tmp_path, architecture, export,
                                                                    match) -> None:
    """The run's data does not exist: the error must come before the evaluation opens it."""
    from sae_lightning.checks import UnsupportedFormatError
    from sae_lightning.config import EvalConfig, train_config_from_dict
    from sae_lightning.evaluate.run import run_evaluation

    own = {"k": 2} if architecture == "topk" else {}
    sae = build_sae(config_from_dict({"architecture": architecture, "d_sae": 4, **own}), 3, d_out=3)
    train_cfg = {"layer": 2, "hook": {"name": "mlp_in"}, "target": {"name": "mlp_out"},
                 "sae": {"architecture": architecture, "d_sae": 4, **own}}
    sae.metadata = {"train_config": train_cfg}
    assert train_config_from_dict(train_cfg).target_hook is not None
    sae.save(tmp_path / "sae")
    with pytest.raises(UnsupportedFormatError, match=match):
        run_evaluation(EvalConfig(ckpt_path=str(tmp_path / "sae"), export=export))
    assert not (tmp_path / "eval").exists()
