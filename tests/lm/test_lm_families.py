"""Every hook point on tiny random models of each family, built here with ``transformers`` config classes and
loaded through ``load_lm`` like a user's local directory: GPT-2, LLaMA, GPT-NeoX (parallel, as Pythia, and
sequential), Gemma, Gemma-2, Mistral, Qwen2, and OPT (the one family that needs an entry in ``OVERRIDES``).

For each: every hook point against a direct computation from the family's own modules (test-side knowledge,
``REF``; the library finds them itself), the truncated forward against the full one, the identity splice
against the clean logits, the direct-logit matrices against the norms' gains, and ``train.py`` (cache build +
20 steps) then ``evaluate.py`` run in-process as a user runs them.
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from sae_lightning.config import HOOK_NAMES, ModelConfig, module_hook_name, parse_module_hook
from sae_lightning.evaluate.saelens import transformer_lens_hook_name
from sae_lightning.lm import HookedLM, HookPoint, ModelUnavailableError, load_lm
from sae_lightning.lm.text import pack_rows, resolve_prepend_bos

REPO = Path(__file__).resolve().parents[2]
LAYER = 1  # of 3: a middle block, so the truncated forward has a block to skip


def _gated(mlp: nn.Module, x: Tensor) -> Tensor:
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


@dataclass(frozen=True)
class Ref:
    """How a family's block computes, for the direct computation (paths relative to the block)."""

    config: str
    attn: str
    norm2: str  # the norm whose output the MLP reads
    act: Callable[[nn.Module, Tensor], Tensor]  # the MLP up to mlp_post
    proj: str  # the MLP's output projection, relative to mlp
    final_norm: str
    mlp: str = "mlp"  # "" = the block itself (OPT)
    post_attn: str | None = None  # Gemma-2's norms after attention and MLP
    post_mlp: str | None = None
    parallel: bool = False
    gain_plus_one: bool = False  # Gemma's RMSNorm scales by 1 + weight
    bos: str = "adds"  # what the family's tokenizer does: adds BOS, has one it does not add, or has none


_LLAMA_LIKE = dict(attn="self_attn", norm2="post_attention_layernorm", act=_gated, proj="down_proj",
                   final_norm="model.norm")
_SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=3, max_position_embeddings=64)
REF = {
    "gpt2": Ref("GPT2Config", "attn", "ln_2", lambda m, x: m.act(m.c_fc(x)), "c_proj", "transformer.ln_f",
                bos="not added"),
    "llama": Ref("LlamaConfig", **_LLAMA_LIKE),
    "gpt_neox": Ref("GPTNeoXConfig", "attention", "post_attention_layernorm",
                    lambda m, x: m.act(m.dense_h_to_4h(x)), "dense_4h_to_h", "gpt_neox.final_layer_norm",
                    parallel=True, bos="not added"),
    "gpt_neox_sequential": Ref("GPTNeoXConfig", "attention", "post_attention_layernorm",
                               lambda m, x: m.act(m.dense_h_to_4h(x)), "dense_4h_to_h",
                               "gpt_neox.final_layer_norm", bos="not added"),
    "gemma": Ref("GemmaConfig", **_LLAMA_LIKE, gain_plus_one=True),
    "gemma2": Ref("Gemma2Config", **{**_LLAMA_LIKE, "norm2": "pre_feedforward_layernorm"},
                  post_attn="post_attention_layernorm", post_mlp="post_feedforward_layernorm",
                  gain_plus_one=True),
    "mistral": Ref("MistralConfig", **_LLAMA_LIKE),
    "qwen2": Ref("Qwen2Config", **_LLAMA_LIKE, bos="none"),
    "opt": Ref("OPTConfig", "self_attn", "final_layer_norm", lambda m, x: m.activation_fn(m.fc1(x)), "fc2",
               "model.decoder.final_layer_norm", mlp=""),
}
CONFIG_ARGS = {
    "gpt2": dict(n_layer=3, n_embd=32, n_inner=64, n_head=4, n_positions=64),
    "gpt_neox": dict(**_SMALL, use_parallel_residual=True),
    "gpt_neox_sequential": dict(**_SMALL, use_parallel_residual=False),
    "gemma": dict(**_SMALL, head_dim=8),
    "gemma2": dict(**_SMALL, head_dim=8, query_pre_attn_scalar=8),
    "opt": dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=3,
                word_embed_proj_dim=32, max_position_embeddings=64),
}
FAMILIES = list(REF)


def _tokenizer(base, bos: str):
    """The conftest tokenizer (prepends BOS itself), or a copy that has BOS but does not add it (GPT-2,
    Pythia), or one without BOS at all (Qwen2.5)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if bos == "adds":
        return base
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    specials = {"eos_token": "</s>", "pad_token": "<pad>"}
    if bos == "not added":
        specials["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=64, **specials)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def family_dir(family: str, tmp_path_factory, tiny_tokenizer) -> Path:
    """A randomly initialised model of ``family`` (norm gains and biases randomised too, so that folding them
    is tested) saved with its tokenizer, as ``save_pretrained`` writes it."""
    import transformers

    ref = REF[family]
    tokenizer = _tokenizer(tiny_tokenizer, ref.bos)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = getattr(transformers, ref.config)(**CONFIG_ARGS.get(family, _SMALL), **ids)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or ".ln" in name):
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(family_dir: Path) -> HookedLM:
    return load_lm(ModelConfig(name=str(family_dir)), device="cpu")


def _tokens(lm: HookedLM, batch: int = 3, seq: int = 12) -> Tensor:
    return torch.randint(0, lm.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(2))


def _hooks(family: str) -> list[str]:
    return [n for n in HOOK_NAMES if not (REF[family].parallel and n == "resid_mid")]


def _direct(lm: HookedLM, ref: Ref, tokens: Tensor) -> dict[str, Tensor]:
    """Every hook point of block LAYER computed from the family's modules: plain PyTorch hooks read the
    block's input and output and the attention's output on a full forward; the rest is computed from those."""
    block = lm.blocks[LAYER]
    got: dict[str, Tensor] = {}

    def keep(key: str, x) -> None:  # hooks must return None, or they would replace the tensor
        got.setdefault(key, (x[0] if isinstance(x, tuple) else x).clone())

    handles = [
        block.register_forward_pre_hook(
            lambda m, a, kw: keep("resid_pre", a[0] if a else kw["hidden_states"]), with_kwargs=True),
        block.register_forward_hook(lambda m, a, o: keep("resid_post", o)),
        block.get_submodule(ref.attn).register_forward_hook(lambda m, a, o: keep("attn", o)),
    ]
    try:
        with torch.no_grad():
            lm.model(input_ids=tokens)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        pre = got["resid_pre"]
        attn = got["attn"].reshape(pre.shape)
        out = {"resid_pre": pre, "resid_post": got["resid_post"],
               "attn_out": block.get_submodule(ref.post_attn)(attn) if ref.post_attn else attn}
        mid = pre if ref.parallel else pre + out["attn_out"]
        if not ref.parallel:
            out["resid_mid"] = mid
        mlp = block.get_submodule(ref.mlp)
        out["mlp_in"] = block.get_submodule(ref.norm2)(mid)
        out["mlp_post"] = ref.act(mlp, out["mlp_in"])
        mlp_out = mlp.get_submodule(ref.proj)(out["mlp_post"])
        out["mlp_out"] = block.get_submodule(ref.post_mlp)(mlp_out) if ref.post_mlp else mlp_out
    adds_up = mid + out["mlp_out"] + (out["attn_out"] if ref.parallel else 0)
    torch.testing.assert_close(adds_up, got["resid_post"], rtol=1e-5, atol=1e-5,
                               msg="the direct computation itself does not add up")
    return out


def test_every_hook_point_equals_the_direct_computation(lm: HookedLM, family: str) -> None:
    tokens = _tokens(lm)
    expected = _direct(lm, REF[family], tokens)
    hooks = [HookPoint(LAYER, n) for n in _hooks(family)]
    got = lm.activations(tokens, hooks)
    assert sorted(expected) == sorted(h.name for h in hooks)
    for hook in hooks:
        assert got[hook].shape == (3, 12, lm.hook_dim(hook)), hook
        torch.testing.assert_close(got[hook], expected[hook.name], rtol=1e-5, atol=1e-5, msg=str(hook))
    assert lm.hook_dim(HookPoint(LAYER, "mlp_post")) == 64 and lm.hook_dim(HookPoint(LAYER, "mlp_in")) == 32
    if REF[family].parallel:
        with pytest.raises(ValueError, match=r"resid_mid does not exist.*parallel attention"):
            lm.activations(tokens, [HookPoint(LAYER, "resid_mid")])


def test_truncated_forward_equals_the_full_one_and_skips_later_blocks(lm: HookedLM, family: str) -> None:
    tokens = _tokens(lm)
    last = HookPoint(lm.n_layers - 1, "resid_post")
    for name in _hooks(family):
        hook = HookPoint(LAYER, name)
        lm.check_hooks([hook, last])
        ran: list[int] = []
        handles = [b.register_forward_pre_hook(lambda m, a, i=i, ran=ran: ran.append(i))
                   for i, b in enumerate(lm.blocks)]
        try:
            truncated = lm.activations(tokens, [hook])[hook]
        finally:
            for h in handles:
                h.remove()
        assert ran == [0, 1], (name, ran)
        assert torch.equal(truncated, lm.activations(tokens, [hook, last])[hook]), name


def test_identity_splice_gives_the_clean_logits(lm: HookedLM, family: str) -> None:
    tokens = _tokens(lm)
    clean = lm.logits(tokens)
    with torch.no_grad():
        assert torch.equal(clean, lm.model(input_ids=tokens).logits)
    for name in _hooks(family):
        hook = HookPoint(LAYER, name)
        spliced = lm.logits(tokens, replace={hook: lambda x: x})
        if name == "resid_mid":  # replaced through attn_out: (resid_pre + attn_out) - resid_pre, rounded
            torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(spliced, clean), name
        assert not torch.allclose(lm.logits(tokens, replace={hook: torch.zeros_like}), clean), name
    assert torch.equal(lm.logits(tokens), clean), "replacement hooks must be removed afterwards"


@pytest.mark.parametrize("family", [f for f in FAMILIES if not REF[f].parallel], indirect=True)
def test_resid_mid_splice_replaces_the_residual_stream(lm: HookedLM) -> None:
    """Replacing resid_mid by resid_mid + v equals adding v to attn_out (what a real replacement must do:
    change the residual both the MLP and the skip connection carry on)."""
    tokens = _tokens(lm)
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(3))
    via_mid = lm.logits(tokens, replace={HookPoint(LAYER, "resid_mid"): lambda x: x + v})
    via_attn = lm.logits(tokens, replace={HookPoint(LAYER, "attn_out"): lambda x: x + v})
    torch.testing.assert_close(via_mid, via_attn, rtol=1e-4, atol=1e-4)


def test_direct_logit_matrices_fold_the_norm_gains(lm: HookedLM, family: str) -> None:
    ref = REF[family]

    def gain(path: str) -> Tensor:
        weight = lm.model.get_submodule(path).weight.detach()
        return weight + 1 if ref.gain_plus_one else weight

    w_u = lm.model.get_output_embeddings().weight.detach().T
    expected = gain(ref.final_norm)[:, None] * w_u
    torch.testing.assert_close(lm.unembed_directions(), expected, rtol=1e-4, atol=1e-6)
    block = f"{lm.blocks_path}.{LAYER}"
    proj = lm.model.get_submodule(".".join(p for p in (block, ref.mlp, ref.proj) if p))
    w_out = proj.weight.detach() if family == "gpt2" else proj.weight.detach().T  # GPT-2's Conv1D: [in, out]
    if ref.post_mlp:
        w_out = w_out * gain(f"{block}.{ref.post_mlp}")
    got = lm.output_projection(HookPoint(LAYER, "mlp_post"))
    torch.testing.assert_close(got, w_out, rtol=1e-4, atol=1e-6)
    assert lm.output_projection(HookPoint(LAYER, "attn_out")) is None
    assert not lm.has_direct_logit_effect(HookPoint(LAYER, "mlp_in"))


def test_prepend_bos_auto_follows_the_tokenizer(lm: HookedLM, family: str) -> None:
    adds = REF[family].bos == "adds"
    assert resolve_prepend_bos("auto", lm.tokenizer) is adds
    rows = next(pack_rows(["Once upon a time there was a cat."] * 4, lm.tokenizer, 8, "auto"))
    assert (rows[:, 0] == lm.tokenizer.bos_token_id).all() == adds


@pytest.mark.parametrize("family", ["gpt_neox"], indirect=True)
def test_cli_shows_where_each_hook_point_is(family_dir: Path, capsys) -> None:
    from sae_lightning.lm.__main__ import main

    assert main([str(family_dir), "--layer", "1"]) == 0
    out = capsys.readouterr().out
    assert "blocks: gpt_neox.layers  layer 1 (parallel attention)" in out
    assert "mlp_post   d=64     input of gpt_neox.layers.1.mlp.dense_4h_to_h" in out
    assert "resid_mid  missing: resid_mid does not exist" in out


# ---------------------------------------------------------------- hook=module


@pytest.fixture(scope="module")
def neox(tmp_path_factory, tiny_tokenizer) -> HookedLM:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**_SMALL, vocab_size=len(tiny_tokenizer)))
    return HookedLM(model, tiny_tokenizer)


def test_module_hook_reads_any_module(neox: HookedLM) -> None:
    tokens = _tokens(neox)
    post = HookPoint(LAYER, "mlp_post")
    absolute = HookPoint(LAYER, module_hook_name(f"gpt_neox.layers.{LAYER}.mlp.dense_4h_to_h", "input"))
    relative = HookPoint(LAYER, module_hook_name("mlp.dense_4h_to_h", "input"))
    norm = HookPoint(LAYER, module_hook_name("post_attention_layernorm", "output"))
    acts = neox.activations(tokens, [post, absolute, relative, norm, HookPoint(LAYER, "mlp_in")])
    assert torch.equal(acts[absolute], acts[post]) and torch.equal(acts[relative], acts[post])
    assert torch.equal(acts[norm], acts[HookPoint(LAYER, "mlp_in")])
    assert neox.hook_dim(absolute) == 64 and not neox.has_direct_logit_effect(absolute)
    clean = neox.logits(tokens)
    assert torch.equal(neox.logits(tokens, replace={absolute: lambda x: x}), clean)
    zeroed = neox.logits(tokens, replace={absolute: torch.zeros_like})
    torch.testing.assert_close(zeroed, neox.logits(tokens, replace={post: torch.zeros_like}))


@pytest.mark.parametrize(("path", "layer", "match"), [
    ("gpt_neox.layers.2.mlp", 1, r"lies in block 2 but layer=1: set layer=2.*hook\.module=mlp"),
    ("gpt_neox.layers.1.mlp.nope", 1, r"no such module.*gpt_neox\.layers\.1\.mlp has children: dense_h"),
    ("gpt_neox.rotary_emb", 1, r"not one vector per token"),
])
def test_module_hook_errors_name_the_module(neox: HookedLM, path: str, layer: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        neox.activations(_tokens(neox), [HookPoint(layer, module_hook_name(path, "output"))])


def test_module_hook_on_a_shared_module_is_refused(tiny_tokenizer) -> None:
    """Phi calls one resid_dropout for both attention and MLP: which call to read would be a guess."""
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(**{**_SMALL, "num_key_value_heads": 4}, vocab_size=len(tiny_tokenizer))
    phi = HookedLM(PhiForCausalLM(config), tiny_tokenizer)
    shared = HookPoint(1, module_hook_name("model.layers.1.resid_dropout", "output"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.resid_dropout.* runs 2 times per forward"):
        phi.activations(_tokens(phi), [shared])
    assert phi.layout(1).parallel and "resid_mid" in phi.layout(1).missing


def test_transformer_lens_names_in_the_export() -> None:
    assert [transformer_lens_hook_name(3, n) for n in HOOK_NAMES] == [
        "blocks.3.hook_resid_pre", "blocks.3.hook_resid_mid", "blocks.3.hook_resid_post",
        "blocks.3.hook_attn_out", "blocks.3.ln2.hook_normalized", "blocks.3.mlp.hook_post",
        "blocks.3.hook_mlp_out"]
    assert transformer_lens_hook_name(3, module_hook_name("gpt_neox.layers.3.mlp", "output")) == \
        "gpt_neox.layers.3.mlp"
    assert transformer_lens_hook_name(3, module_hook_name("a.b", "input")) == "a.b:input"


# ---------------------------------------------------------------- presets


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from sae_lightning.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return to_config(compose("train", overrides=list(overrides)))


@pytest.mark.parametrize(("preset", "name", "layer"), [
    ("pythia-70m", "EleutherAI/pythia-70m", 3), ("pythia-160m", "EleutherAI/pythia-160m", 6),
    ("gemma-2-2b", "google/gemma-2-2b", 12), ("gpt2-medium", "openai-community/gpt2-medium", 12),
    ("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", 12),
])
def test_model_presets(preset: str, name: str, layer: int) -> None:
    cfg = _compose(f"model={preset}")
    assert (cfg.model.name, cfg.model.source, cfg.layer, cfg.data.prepend_bos) == (name, "hub", layer, "auto")
    assert _compose(f"model={preset}", "layer=1").layer == 1


def test_a_preset_offline_stops_with_the_offline_message(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    match = r"'EleutherAI/pythia-70m'.*cannot be reached.*experiment=quickstart"
    with pytest.raises(ModelUnavailableError, match=match):
        load_lm(_compose("model=pythia-70m").model)


@pytest.mark.parametrize("family", ["gemma", "gpt_neox"], indirect=True)
def test_export_metadata_resolves_prepend_bos_without_downloading(family: str, family_dir: Path) -> None:
    """``auto`` is resolved from a tokenizer this machine has; for one it has not, it is left unknown (None)
    at once, with no download: SAEBench's result and the SAELens export write it without the model."""
    from sae_lightning.config import TrainConfig
    from sae_lightning.evaluate.saelens import saelens_metadata

    local = saelens_metadata(TrainConfig(model=ModelConfig(name=str(family_dir))))
    assert local["prepend_bos"] is (REF[family].bos == "adds")
    start = time.monotonic()
    assert saelens_metadata(TrainConfig(model=ModelConfig(name="sae-test/not-cached")))["prepend_bos"] is None
    assert time.monotonic() - start < 5


def test_hook_module_config() -> None:
    cfg = _compose("hook=module", "hook.module=gpt_neox.layers.3.mlp.dense_4h_to_h", "hook.side=input",
                   "layer=3")
    assert cfg.hook.name == "module:gpt_neox.layers.3.mlp.dense_4h_to_h:input"
    with pytest.raises(Exception, match=r"hook\.module"):
        _compose("hook=module")
    with pytest.raises(ValueError, match=r"hook\.side='in'"):
        _compose("hook=module", "hook.module=a.b", "hook.side=in")
    with pytest.raises(ValueError, match=r"hook\.module='a\.b'.*only read with hook=module"):
        _compose("hook=mlp_out", "hook.module=a.b")


# ---------------------------------------------------------------- train.py + evaluate.py

# what each family trains on end to end: together every hook point, and the hook=module example; all of a
# family's hook points are cached in the same forward through hook.extra. The report (direct logit
# effects) where they differ most: Gemma-2's post-norms, mlp_in and a module, which have none.
MODULE = module_hook_name(f"gpt_neox.layers.{LAYER}.mlp.dense_4h_to_h", "input")
E2E = [("gpt2", "resid_mid"), ("llama", "attn_out"), ("gpt_neox", "mlp_in"), ("gemma", "resid_pre"),
       ("gemma2", "mlp_out"), ("mistral", "resid_post"), ("qwen2", "mlp_post"), ("gpt_neox", MODULE)]
REPORT = {"mlp_in", "mlp_out", MODULE}


def _script(script: str, args: list[str]) -> None:
    """``python <script> <args>`` in this process (Hydra and all), saving the interpreter start-up. Hydra
    configures logging for its job; that is undone after, so later tests see the logging they expect."""
    loggers = [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    saved = [(lg, lg.level, lg.handlers[:], lg.propagate, lg.disabled) for lg in loggers]
    argv = sys.argv
    sys.argv = [str(REPO / script), *args]
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    finally:
        sys.argv = argv
        for lg, level, handlers, propagate, disabled in saved:
            for h in lg.handlers:
                if h not in handlers:
                    h.close()
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate, lg.disabled = propagate, disabled


@pytest.mark.slow
@pytest.mark.parametrize(("family", "hook"), E2E, indirect=["family"])
def test_train_then_evaluate(lm: HookedLM, family: str, hook: str, family_dir: Path, tmp_path: Path,
                             tinystories_path: Path, monkeypatch) -> None:
    """``train.py model.name=<dir> layer=1 hook=<hook>`` (cache build, 20 steps), then ``evaluate.py``."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = parse_module_hook(hook)
    hook_args = [f"hook={hook}"] if module is None else ["hook=module", f"hook.module={module[0]}",
                                                        f"hook.side={module[1]}"]
    extra = [n for n in _hooks(family) if n != hook] if module is None else []
    run = tmp_path / "run"
    _script("train.py", [
        f"model.name={family_dir}", "model.device=cpu", "data=tinystories_local",
        f"data.path={tinystories_path}", "data.context_size=32", "data.n_tokens=3072",
        "data.lm_batch_size=32",
        f"activations.cache_dir={tmp_path}/c", "activations.shard_rows=1024", f"layer={LAYER}", *hook_args,
        f"hook.extra=[{','.join(extra)}]",
        "sae.dict_mult=2", "batch_size=64", "train_tokens=1280", "logger=csv", "trainer=cpu",
        "trainer.progress_bar=false", "trainer.val_every_n_steps=20", "trainer.limit_val_batches=2",
        "trainer.checkpoint_every_n_steps=20", f"hydra.run.dir={run}"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["d_in"] == lm.hook_dim(HookPoint(LAYER, hook))
    assert len(list((tmp_path / "c").glob(f"*-L{LAYER}.*"))) == 1 + len(extra)  # all cached in one pass
    _script("evaluate.py", [f"ckpt_path={run}/checkpoints/final.ckpt", "monosemanticity=false",
                            "downstream_contexts=8", "report_latents=4", "report_neurons=4", "export=true",
                            f"report={str(hook in REPORT).lower()}"])
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["ce_loss_zero"] != m["ce_loss_clean"] and torch.isfinite(torch.tensor(m["ce_loss_recovered"]))
    assert m["l0"] > 0 and m["n_tokens"] > 0 and (run / "eval" / "report.html").exists() == (hook in REPORT)
    meta = json.loads((Path(m["export_path"]) / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == transformer_lens_hook_name(LAYER, hook)
    assert meta["prepend_bos"] is (REF[family].bos == "adds")


# ---------------------------------------------------------------- more families, no table entry for any

ALL = set(HOOK_NAMES)
NO_MID = ALL - {"resid_mid"}
MORE = {  # config class, extra config arguments, the hook points that must be found and verified
    "Qwen3Config": ({"head_dim": 8}, ALL),
    "Phi3Config": ({}, ALL),
    "PhiConfig": ({"num_key_value_heads": 4}, NO_MID),  # parallel
    "GPTJConfig": ({"n_layer": 2, "n_embd": 32, "n_head": 4, "rotary_dim": 4, "n_positions": 64}, NO_MID),
    "FalconConfig": ({"num_kv_heads": 4, "new_decoder_architecture": False, "parallel_attn": True}, NO_MID),
    "StableLmConfig": ({}, ALL),
    "OlmoConfig": ({}, ALL),
    "Olmo2Config": ({}, ALL),
    "Gemma3TextConfig": ({"head_dim": 8}, ALL),
    "CohereConfig": ({}, NO_MID),  # parallel
    "GraniteConfig": ({}, ALL),
    "Starcoder2Config": ({}, ALL),
    "MixtralConfig": ({"num_local_experts": 4, "num_experts_per_tok": 2}, ALL - {"mlp_post"}),  # experts
    "BloomConfig": ({"n_layer": 2, "n_head": 4}, {"resid_pre", "resid_post", "mlp_in"}),  # adds inside
}


@pytest.mark.parametrize("config", list(MORE))
def test_more_families_find_and_check_their_hook_points(config: str) -> None:
    """Found and verified with no table entry; every found hook point splices back to the clean logits, every
    other one says why (Mixtral's experts have no single output projection; Bloom's attention and MLP add the
    residual themselves, so what they add is no module's output)."""
    import transformers

    extra, expected = MORE[config]
    if not hasattr(transformers, config):
        pytest.skip(f"transformers {transformers.__version__} has no {config}")
    args = {**_SMALL, "num_hidden_layers": 2, **extra, "vocab_size": 100, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 0}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config)(**args))
    lm = HookedLM(model, None)
    layout = lm.layout(1)
    assert set(layout.sites) == expected, layout.missing
    assert all(("hook=module" in why) for why in layout.missing.values())
    tokens = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    clean = lm.logits(tokens)
    for name in expected:
        hook = HookPoint(1, name)
        spliced = lm.logits(tokens, replace={hook: lambda x: x})
        torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(lm.logits(tokens, replace={hook: torch.zeros_like}), clean), name
    assert lm.activations(tokens, [HookPoint(1, n) for n in expected])
