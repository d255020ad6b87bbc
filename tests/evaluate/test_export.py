"""evaluate/saelens.py: the input-scale fold, SAELens itself loading our export, and loading back into
our modules."""

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from torch import Tensor, nn

from sae_lightning.config import DataConfig, TrainConfig
from sae_lightning.evaluate.saelens import (
    export_saelens,
    export_trained,
    folded_weights,
    load_saelens,
    push_to_hub,
    read_saelens,
    saelens_encode,
    transformer_lens_hook_name,
)
from sae_lightning.saes import build_sae, config_from_dict

D_IN, D_SAE, K, SCALE = 6, 16, 3, 2.5
ARCHITECTURES = ["relu", "relu_dn", "topk", "jumprelu", "gated", "batchtopk", "matryoshka"]
AS_JUMPRELU = ("batchtopk", "matryoshka")  # exported as JumpReLU with their global threshold


def _cfg(architecture: str):
    own = {"k": K} if architecture in ("topk", *AS_JUMPRELU) else {}
    return config_from_dict({"architecture": architecture, "d_sae": D_SAE, **own})


@torch.no_grad()
def _sae(architecture: str) -> nn.Module:
    """One of our SAEs with random biases (and thresholds) and decoder rows of unequal norms, so a wrong
    fold of any of them (a rescaled decoder's norms included) shows."""
    torch.manual_seed(1)
    sae = build_sae(_cfg(architecture), D_IN)
    sae.set_input_scale(SCALE)
    sae.b_dec.normal_()
    sae.b_enc.normal_(std=0.3)
    sae.W_dec.mul_(0.5 + torch.rand(D_SAE, 1))
    if architecture == "jumprelu":
        sae.threshold.copy_(0.5 * torch.rand(D_SAE) + 0.1)
    if architecture in AS_JUMPRELU:  # the mean positive pre-activation: it cuts some positive ones
        pre = sae.pre_acts(sae.normalize(_raw_inputs(sae)))
        sae.threshold.fill_(pre[pre > 0].mean())
    if architecture == "gated":
        sae.r_mag.normal_(std=0.5)
        sae.b_mag.normal_(std=0.3)
    return sae


def _raw_inputs(sae: nn.Module) -> Tensor:
    """Raw-space activations whose normalized version sits around b_dec, so many latents fire."""
    return (torch.randn(32, D_IN, generator=torch.Generator().manual_seed(2)) + sae.b_dec.detach()) / SCALE


def _export(tmp_path: Path, architecture: str) -> tuple[nn.Module, Path]:
    sae = _sae(architecture)
    meta = {"model_name": "tiny-gpt2", "hook_name": transformer_lens_hook_name(1, "mlp_post")}
    return sae, export_saelens(sae, tmp_path / architecture, metadata=meta)


@torch.no_grad()
def test_fold_matches_the_derivation_by_hand() -> None:
    sae = _sae("relu")
    w = folded_weights(sae)
    x = _raw_inputs(sae)
    torch.testing.assert_close(w["W_enc"], sae.W_enc * SCALE)
    torch.testing.assert_close(w["b_dec"], sae.b_dec / SCALE)
    torch.testing.assert_close(w["W_dec"], sae.W_dec / SCALE)
    z = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    torch.testing.assert_close(z, sae.encode_normalized(x * SCALE))
    assert (z > 0).any()
    torch.testing.assert_close(z @ w["W_dec"] + w["b_dec"], sae.decode_normalized(z) / SCALE)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@torch.no_grad()
def test_sae_lens_runs_our_export_like_we_do(tmp_path: Path, architecture: str) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    sae, folder = _export(tmp_path, architecture)
    theirs = sae_lens.SAE.load_from_disk(folder)
    expected = {"relu": "standard", "relu_dn": "standard", "batchtopk": "jumprelu",
                "matryoshka": "jumprelu"}.get(architecture, architecture)
    assert theirs.cfg.architecture() == expected
    assert theirs.cfg.metadata.hook_name == "blocks.1.mlp.hook_post"
    x = _raw_inputs(sae)
    z_ours = sae.encode(x)
    z_theirs = theirs.encode(x)
    assert (z_ours != 0).any() and (z_ours == 0).any()
    torch.testing.assert_close(z_theirs, z_ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.decode(z_theirs), sae.decode(z_ours), rtol=1e-5, atol=1e-5)
    if architecture in AS_JUMPRELU:  # the global threshold for every latent, and it cuts some positive ones
        torch.testing.assert_close(theirs.threshold.detach(), sae.threshold.float().expand(D_SAE))
        pre = sae.pre_acts(sae.normalize(x))
        assert ((pre > 0) & (z_ours == 0)).any()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@torch.no_grad()
def test_load_saelens_back_into_our_module(tmp_path: Path, architecture: str) -> None:
    sae, folder = _export(tmp_path, architecture)
    loaded = load_saelens(folder)
    assert type(loaded) is type(sae) or (architecture == "relu_dn" and loaded.cfg.architecture == "relu") or (
        architecture in AS_JUMPRELU and loaded.cfg.architecture == "jumprelu")
    x = _raw_inputs(sae)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)), rtol=1e-5,
                               atol=1e-5)
    if architecture == "topk":
        assert loaded.k == K
    if loaded.cfg.architecture in ("jumprelu", "gated"):  # SAELens trains their decoders with free rows
        assert loaded.cfg.decoder_norm == "free" and not loaded.unit_norm_decoder


def test_read_saelens_rewrites_bias_not_applied_to_input(tmp_path: Path) -> None:
    _, folder = _export(tmp_path, "relu")
    cfg, w = read_saelens(folder)
    cfg["apply_b_dec_to_input"] = False  # same weights, read as z = relu(x W_enc + b_enc)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    _, rewritten = read_saelens(folder)
    x = torch.randn(5, D_IN)
    torch.testing.assert_close((x - rewritten["b_dec"]) @ rewritten["W_enc"] + rewritten["b_enc"],
                               x @ w["W_enc"] + w["b_enc"], rtol=1e-5, atol=1e-5)


def test_read_saelens_rewrites_both_gated_paths_for_bias_not_applied_to_input(tmp_path: Path) -> None:
    """Gated without the pre-encoder bias: ``1[x W_enc + b_gate > 0] relu(x W_enc e^r_mag + b_mag)``."""
    _, folder = _export(tmp_path, "gated")
    cfg, w = read_saelens(folder)
    cfg["apply_b_dec_to_input"] = False
    (folder / "cfg.json").write_text(json.dumps(cfg))
    cfg, rewritten = read_saelens(folder)
    x = torch.randn(64, D_IN)
    gate = x @ w["W_enc"] + w["b_gate"]
    mag = x @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]
    expected = (gate > 0) * mag.relu()
    assert (expected > 0).any() and (expected == 0).any()
    torch.testing.assert_close(saelens_encode(cfg, rewritten, x), expected, rtol=1e-5, atol=1e-5)


def test_export_refuses_a_module_with_another_encode(tmp_path: Path) -> None:
    class NoBiasSubtraction(type(_sae("relu"))):
        def encode_normalized(self, x: Tensor) -> Tensor:
            return (x @ self.W_enc + self.b_enc).relu()

    sae = NoBiasSubtraction(_cfg("relu"), D_IN)
    with torch.no_grad():
        sae.b_dec.normal_()
    with pytest.raises(RuntimeError, match="SAELens export would give other latents"):
        export_saelens(sae, tmp_path)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    sae = _sae("relu")
    sae.cfg.architecture = "matching_pursuit"
    with pytest.raises(NotImplementedError, match="matching_pursuit"):
        export_saelens(sae, tmp_path)


def test_export_trained_takes_everything_from_the_config(tmp_path: Path) -> None:
    cfg = TrainConfig(sae=_cfg("topk"), data=DataConfig(prepend_bos=True), layer=2)
    folder = export_trained(_sae("topk"), cfg, tmp_path)
    written = json.loads((folder / "cfg.json").read_text())
    assert written["architecture"] == "topk" and written["k"] == K
    assert written["metadata"]["hook_name"] == "blocks.2.mlp.hook_post"
    assert written["metadata"]["model_name"] == "gpt2" and written["metadata"]["prepend_bos"] is True


def test_push_to_hub_uploads_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {}

    class FakeApi:  # records what would be sent; nothing leaves the machine
        def __init__(self, token: str | None = None) -> None:
            calls["token"] = token

        def create_repo(self, repo_id: str, **kw: object) -> None:
            calls["create"] = (repo_id, kw)

        def upload_folder(self, **kw: object) -> str:
            calls["upload"] = kw
            return "https://huggingface.co/me/saes/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    _, folder = _export(tmp_path, "relu")
    url = push_to_hub(folder, "me/saes", token="t")
    assert url.endswith("/abc") and calls["token"] == "t"
    assert calls["create"] == ("me/saes", {"private": False, "exist_ok": True})
    assert calls["upload"]["folder_path"] == str(folder) and calls["upload"]["path_in_repo"] == "relu"


@pytest.mark.parametrize("rescale", [True, False])
@torch.no_grad()
def test_load_a_saelens_topk_with_or_without_decoder_norm_rescaling(tmp_path: Path, rescale: bool) -> None:
    """SAELens's ``rescale_acts_by_decoder_norm`` is our ``decoder_norm=rescale``; without it the rows are
    used as they are (``project`` computes with the parameters): either way the same encode and decode."""
    topk = pytest.importorskip("sae_lens.saes.topk_sae")
    torch.manual_seed(3)
    theirs = topk.TopKSAE(topk.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype="float32", device="cpu",
                                             rescale_acts_by_decoder_norm=rescale))
    for param in theirs.parameters():
        param.normal_()
    theirs.W_dec.mul_(0.5 + torch.rand(D_SAE, 1))  # unequal norms: rescaling changes which latents win
    theirs.save_model(tmp_path)
    ours = load_saelens(tmp_path)
    assert ours.cfg.decoder_norm == ("rescale" if rescale else "project")
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x)), rtol=1e-5,
                               atol=1e-5)
