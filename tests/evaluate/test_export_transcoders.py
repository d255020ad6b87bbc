"""Transcoder exports loaded by the tools themselves: a per-layer transcoder set by circuit-tracer 0.5.0's own
loader (and its attribution graph on a tiny random model), a transcoder by sae_lens; each computes what ours
computes on the same raw activations; what a format cannot hold is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

from sae_lightning.checks import UnsupportedFormatError
from sae_lightning.config import TrainConfig, train_config_from_dict
from sae_lightning.evaluate.circuit_tracer import export_circuit_tracer
from sae_lightning.evaluate.saelens import export_trained
from sae_lightning.saes import SAE, build_sae

try:  # installed --no-deps by `make setup-dev`: its own pins conflict with transformers 5 (Makefile)
    import circuit_tracer
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
except ImportError as error:
    raise ImportError("these tests load our export with circuit-tracer itself: run `make setup-dev`, which "
                      "installs it with `pip install --no-deps circuit-tracer==0.5.0`") from error
import sae_lens

D, D_SAE, K, S_IN, S_OUT = 16, 24, 4, 2.5, 0.4
CPU = torch.device("cpu")


def _cfg(layer: int, architecture: str = "relu", skip: bool = False, hook: str = "mlp_in",
         target: str = "mlp_out", target_layer: int | None = None) -> TrainConfig:
    own = {"k": K} if architecture in ("topk", "batchtopk", "matryoshka") else {}
    if architecture == "matryoshka":
        own["prefixes"] = [8, D_SAE]
    return train_config_from_dict({
        "layer": layer, "hook": {"name": hook}, "target": {"name": target, "layer": target_layer},
        "sae": {"architecture": architecture, "d_sae": D_SAE, "skip": skip, **own}})


@torch.no_grad()
def _transcoder(cfg: TrainConfig, seed: int) -> SAE:
    """A transcoder with both scales, random biases, thresholds that cut some positive pre-activations, a
    non-zero skip and decoder rows of unequal norms: a wrong fold or orientation of any of them shows."""
    torch.manual_seed(seed)
    sae = build_sae(cfg.sae, D, d_out=D)
    sae.set_input_scale(S_IN)
    sae.set_target_scale(S_OUT)
    sae.b_dec.normal_()
    sae.b_enc.normal_(std=0.3)
    sae.W_dec.mul_(0.5 + torch.rand(D_SAE, 1))
    if cfg.sae.skip:
        sae.W_skip.normal_(std=0.2)
    if hasattr(sae, "threshold"):
        pre = sae.pre_acts(sae.normalize(_inputs(1, seed)[0]))
        per_latent = 0.5 * torch.rand(D_SAE) + 0.1
        sae.threshold.copy_(pre[pre > 0].mean() if sae.threshold.dim() == 0 else per_latent)
    return sae.eval()


def _inputs(n_layers: int, seed: int = 0) -> Tensor:
    """Raw activations [n_layers, 40, D] of about the scale the transcoders were normalized for."""
    return torch.randn(n_layers, 40, D, generator=torch.Generator().manual_seed(100 + seed)) / S_IN


def _plt_set(architecture: str, skip: bool, n_layers: int = 3) -> list[tuple[SAE, TrainConfig]]:
    members = []
    for layer in range(n_layers):
        cfg = _cfg(layer, architecture, skip)
        members.append((_transcoder(cfg, seed=layer), cfg))
    return members


def _load_with_circuit_tracer(folder: Path, **lazy: bool):
    """The set as circuit-tracer loads a cached or downloaded folder (``load_transcoders_from_cache``: every
    ``layer_*.safetensors``, the hooks from ``config.yaml``), through its own ``load_transcoder_set``."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    paths = {int(f.stem.split("_")[1]): str(f) for f in sorted(folder.glob("layer_*.safetensors"))}
    return load_transcoder_set(paths, scan=str(folder), feature_input_hook=config["feature_input_hook"],
                               feature_output_hook=config["feature_output_hook"], device=CPU,
                               dtype=torch.float32, **lazy)


@pytest.mark.parametrize(("architecture", "skip"), [("relu", False), ("relu_dn", True), ("jumprelu", False),
                                                    ("jumprelu", True), ("batchtopk", False),
                                                    ("matryoshka", False)])
@pytest.mark.parametrize("lazy", [False, True])
@torch.no_grad()
def test_circuit_tracer_loads_our_plt_set_and_computes_what_we_do(tmp_path: Path, architecture: str,
                                                                  skip: bool, lazy: bool) -> None:
    members = _plt_set(architecture, skip)
    folder = export_circuit_tracer(members, tmp_path / "plt")
    theirs = _load_with_circuit_tracer(folder, lazy_encoder=lazy, lazy_decoder=lazy)
    assert (theirs.n_layers, theirs.d_transcoder, theirs.skip_connection) == (3, D_SAE, skip)
    assert (theirs.feature_input_hook, theirs.feature_output_hook) == ("mlp.hook_in", "hook_mlp_out")
    jump = architecture != "relu" and architecture != "relu_dn"
    assert all(type(t.activation_function).__name__ == ("JumpReLU" if jump else "function") for t in theirs)
    x = _inputs(3)
    z_theirs = theirs.encode(x)
    y_theirs = theirs.decode(z_theirs, x)
    for layer, (ours, _) in enumerate(members):
        z = ours.encode(x[layer])
        assert (z > 0).any() and (z == 0).any()
        if jump:  # the threshold cuts positive pre-activations: a ReLU would not give these latents
            assert ((ours.pre_acts(ours.normalize(x[layer])) > 0) & (z == 0)).any()
        torch.testing.assert_close(z_theirs[layer], z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_theirs[layer], ours.decode(z, x[layer]), rtol=1e-5, atol=1e-5)


def test_circuit_tracer_config_names_the_model_and_hooks(tmp_path: Path) -> None:
    members = _plt_set("relu", False, n_layers=2)
    config = yaml.safe_load((export_circuit_tracer(members, tmp_path) / "config.yaml").read_text())
    assert config["model_name"] == members[0][1].model.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "layer_0.safetensors",
                                                          "layer_1.safetensors"]


@torch.no_grad()
def test_circuit_tracer_builds_an_attribution_graph_with_our_transcoders(tmp_path: Path,
                                                                         tiny_gpt2_dir: Path) -> None:
    """circuit-tracer's TransformerLens replacement model on a tiny random model, spliced with our exported
    transcoders, builds an attribution graph offline; its active features and their activations are our
    latents on the model's MLP inputs (position 0 is left out by circuit-tracer). circuit-tracer 0.5.0
    imports ``huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER``, gone from huggingface-hub 1.x; the
    test sets it to its old default (False) before importing the replacement model."""
    import huggingface_hub.constants
    from transformer_lens import HookedTransformerConfig
    from transformers import AutoTokenizer

    huggingface_hub.constants.HF_HUB_ENABLE_HF_TRANSFER = False
    from circuit_tracer.attribution.attribute import attribute
    from circuit_tracer.replacement_model import ReplacementModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    torch.manual_seed(0)
    model_cfg = HookedTransformerConfig(n_layers=2, d_model=D, d_head=4, n_heads=4, d_mlp=32, n_ctx=64,
                                        d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN",
                                        device="cpu")
    members = _plt_set("jumprelu", True, n_layers=2)
    for sae, _ in members:  # thresholds where this model's MLP inputs (LayerNorm outputs, norm ~4) fire
        sae.set_input_scale(1.0)
        sae.threshold.fill_(0.05)
    model = ReplacementModel.from_config(model_cfg, _load_with_circuit_tracer(export_circuit_tracer(
        members, tmp_path / "plt")), backend="transformerlens")
    model.set_tokenizer(tokenizer)
    with torch.enable_grad():
        graph = attribute("Once upon a time there was a", model, max_n_logits=3, desired_logit_prob=0.5,
                          batch_size=16, verbose=False)
    _, cache = model.run_with_cache(graph.input_tokens[None],
                                    names_filter=lambda name: name.endswith("mlp.hook_in"))
    expected = []
    for layer, (sae, _) in enumerate(members):
        z = sae.encode(cache[f"blocks.{layer}.mlp.hook_in"][0])[1:]  # circuit-tracer zeroes position 0
        for pos, feature in (z > 0).nonzero().tolist():
            expected.append(((layer, pos + 1, feature), float(z[pos, feature])))
    got = dict(zip(map(tuple, graph.active_features.tolist()), graph.activation_values.tolist(), strict=True))
    assert len(expected) > 0 and graph.adjacency_matrix.shape[0] > len(expected)
    assert sorted(got) == sorted(k for k, _ in expected)
    for key, value in expected:
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(("members", "match"), [
    (lambda: _plt_set("topk", False), "ReLU and JumpReLU activations, not a 'topk' transcoder"),
    (lambda: _plt_set("relu", False)[1:], r"every layer 0..n-1, this set has layers \[1, 2\]"),
    (lambda: [(_transcoder(c, 0), c) for c in (_cfg(0, hook="resid_post", target="mlp_out"),)],
     "must read mlp_in or resid_mid and write mlp_out of the same layer"),
    (lambda: [(_transcoder(c, 0), c) for c in (_cfg(0, target="mlp_out", target_layer=1),)],
     "layer 0 mlp_in -> layer 1 mlp_out"),
    (lambda: _plt_set("relu", False, 1) + [(s, c) for s, c in _plt_set("jumprelu", False, 2)[1:]],
     "one activation for every layer"),
])
def test_circuit_tracer_refuses_what_it_cannot_hold_before_writing(tmp_path: Path, members,
                                                                   match: str) -> None:
    with pytest.raises(UnsupportedFormatError, match=match):
        export_circuit_tracer(members(), tmp_path / "plt")
    assert not (tmp_path / "plt").exists()


def test_circuit_tracer_refuses_an_sae(tmp_path: Path) -> None:
    cfg = train_config_from_dict({"layer": 0, "hook": {"name": "mlp_in"},
                                  "sae": {"architecture": "relu", "d_sae": D_SAE}})
    sae = build_sae(cfg.sae, D)
    with pytest.raises(UnsupportedFormatError, match="export=circuit_tracer writes per-layer transcoders"):
        export_circuit_tracer([(sae, cfg)], tmp_path / "plt")


@pytest.mark.parametrize(("architecture", "skip", "theirs"), [
    ("relu", False, "transcoder"), ("relu", True, "skip_transcoder"),
    ("jumprelu", False, "jumprelu_transcoder"), ("jumprelu", True, "jumprelu_skip_transcoder"),
    ("batchtopk", True, "jumprelu_skip_transcoder")])
@torch.no_grad()
def test_sae_lens_loads_our_transcoder_and_computes_what_we_do(tmp_path: Path, architecture: str, skip: bool,
                                                               theirs: str) -> None:
    cfg = _cfg(3, architecture, skip)
    ours = _transcoder(cfg, seed=0)
    folder = export_trained(ours, cfg, tmp_path / "saelens")
    loaded = sae_lens.SAE.load_from_disk(folder)
    assert loaded.cfg.architecture() == theirs and loaded.cfg.d_out == D
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.3.ln2.hook_normalized"
    assert (meta["hook_name_out"], meta["hook_layer_out"]) == ("blocks.3.hook_mlp_out", 3)
    x = _inputs(1)[0]
    z = ours.encode(x)
    assert (z > 0).any() and (z == 0).any()
    torch.testing.assert_close(loaded.encode(x), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded(x), ours.decode(z, x), rtol=1e-5, atol=1e-5)  # forward: skip included


@pytest.mark.parametrize("architecture", ["topk", "gated"])
def test_sae_lens_refuses_a_transcoder_it_has_no_class_for(tmp_path: Path, architecture: str) -> None:
    cfg = _cfg(0, architecture)
    with pytest.raises(UnsupportedFormatError, match=f"SAELens format has no '{architecture}' transcoder"):
        export_trained(_transcoder(cfg, 0), cfg, tmp_path / "saelens")
    assert not (tmp_path / "saelens").exists()


def test_the_circuit_tracer_under_test_is_the_pinned_one() -> None:
    assert circuit_tracer.__version__ == "0.5.0"
