"""Hydra composition: the command-line contract and errors that name the bad key, before any heavy work."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize
from hydra.errors import ConfigCompositionException

from sae_lightning.config import (
    ConfigError,
    TrainConfig,
    check_sparsity_override,
    register_configs,
    to_config,
)
from sae_lightning.saes import build_sae
from sae_lightning.saes.relu_dn import ReLUDecoderNormSAE

register_configs()


def _compose(*overrides: str) -> TrainConfig:
    """The config train.py runs for these command-line overrides (with its typed-``l1`` check)."""
    with initialize(config_path="../conf", version_base="1.3"):
        cfg = to_config(compose("train", overrides=list(overrides)))
    check_sparsity_override(cfg, list(overrides))
    return cfg


def test_reference_default_is_gpt2_layer6_mlp_post_tinystories() -> None:
    cfg = _compose()
    assert (cfg.model.name, cfg.layer, cfg.hook.name, cfg.data.name) == ("gpt2", 6, "mlp_post",
                                                                          "roneneldan/TinyStories")


def test_bare_root_keys_and_group_selection() -> None:
    cfg = _compose("sae.dict_mult=8", "l1=1e-3", "lr=2e-4", "batch_size=1024", "train_tokens=8192", "seed=3",
                   "layer=2", "hook=resid_post")
    assert cfg.sae.dict_mult == 8 and cfg.l1 == 1e-3 and cfg.lr == 2e-4 and cfg.layer == 2
    assert cfg.max_steps == 8 and cfg.seed == 3
    assert cfg.hook.name == "resid_post" and cfg.sae.architecture == "relu"
    topk = _compose("experiment=quickstart", "sae=topk", "sae.k=64")  # the README's command
    assert type(topk.sae).__name__ == "TopKConfig" and topk.sae.k == 64 and topk.sae.dict_mult == 2


@pytest.mark.parametrize(("arch", "foreign", "config_class"), [
    ("relu", "sae.k=3", "ReLUConfig"), ("relu_dn", "sae.bandwidth=0.1", "ReLUDecoderNormConfig"),
    ("topk", "sae.bandwidth=0.1", "TopKConfig"), ("topk", "sae.ghost_grads=true", "TopKConfig"),
    ("jumprelu", "sae.k=3", "JumpReLUConfig"), ("jumprelu", "sae.aux_coeff=0.1", "JumpReLUConfig"),
    ("topk", "sae.target_l0=10", "TopKConfig"), ("gated", "sae.ghost_grads=true", "GatedConfig"),
    ("jumprelu", "sae.p_end=0.5", "JumpReLUConfig")])
def test_a_key_of_another_architecture_fails_naming_it(arch: str, foreign: str, config_class: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        _compose(f"sae={arch}", foreign)
    key = foreign.split("=")[0].split(".")[1]
    assert f"Key '{key}' not in '{config_class}'" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(("arch", "hint"), [("topk", "sae.k"), ("jumprelu", "sae.l0_coeff"),
                                            ("batchtopk", "sae.k"), ("matryoshka", "sae.k")])
def test_typed_l1_for_an_architecture_without_l1_is_an_error(arch: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=rf"l1=5.0 has no effect on sae={arch}.*set {hint} instead"):
        _compose(f"sae={arch}", "l1=5")
    assert _compose(f"sae={arch}").sae.architecture == arch  # the root default alone is no error
    assert _compose("sae=relu_dn", "l1=5").l1 == 5


def test_gated_p_annealing_and_target_l0_from_the_command_line() -> None:
    """``l1`` typed with ``sae.target_l0`` is the start value (no error); p-annealing keys are relu's."""
    gated = _compose("sae=gated", "l1=2", "sae.target_l0=40")
    assert type(gated.sae).__name__ == "GatedConfig" and gated.l1 == 2 and gated.sae.target_l0 == 40
    relu = _compose("sae.p_end=0.2", "sae.p_anneal_start=0.3", "sae.target_l0=20")
    assert (relu.sae.p_start, relu.sae.p_end, relu.sae.p_anneal_start) == (1.0, 0.2, 0.3)
    assert _compose("sae=jumprelu", "sae.target_l0=20").sae.target_l0 == 20
    with pytest.raises(ConfigError, match=r"sae\.p_end=0\.0"):
        _compose("sae.p_end=0")


def test_d_sae_wins_over_dict_mult() -> None:
    assert _compose("sae.dict_mult=8", "sae.d_sae=100").sae.resolve_d_sae(64) == 100
    assert _compose("sae.dict_mult=8").sae.resolve_d_sae(64) == 512


def test_quickstart_preset_is_offline() -> None:
    cfg = _compose("experiment=quickstart")
    assert cfg.model.source == "pypi_gguf" and cfg.data.source == "files"
    assert cfg.data.path.endswith("shared/data/tinystories-train-head.txt")


def test_clt_preset_is_the_decided_cross_layer_transcoder() -> None:
    """experiment=clt: the offline default's MLPs of layers 0-3 as one JumpReLU CLT at total L0 128."""
    cfg = _compose("experiment=clt")
    assert cfg.clt and cfg.layers == [0, 1, 2, 3] and cfg.model.source == "pypi_gguf"
    assert (cfg.hook.name, cfg.target.name) == ("mlp_in", "mlp_out")
    assert cfg.sae.architecture == "jumprelu" and cfg.sae.target_l0 == 128
    assert _compose("experiment=clt", "sae.target_l0=64").sae.target_l0 == 64


def test_relu_dn_preset_builds_the_april_2024_init() -> None:
    """``sae=relu_dn``: decoder rows at norm 0.1, ``W_enc = W_dec^T`` and both biases at zero, also after
    the decoder-bias init that training runs on a data sample whose centre is far from zero."""
    torch.manual_seed(0)
    sae = build_sae(_compose("sae=relu_dn", "sae.d_sae=32").sae, 16)
    sae.init_from_data(torch.randn(256, 16) + 5.0)
    assert isinstance(sae, ReLUDecoderNormSAE) and not sae.unit_norm_decoder
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((32,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert not sae.b_dec.any() and not sae.b_enc.any()
    plain = build_sae(_compose("sae=relu", "sae.d_sae=32").sae, 16)  # the default keeps a centred b_dec
    plain.init_from_data(torch.randn(256, 16) + 5.0)
    assert plain.b_dec.mean() > 4.0


def test_activations_file_needs_a_path() -> None:
    with pytest.raises(Exception, match=r"activations\.path"):
        _compose("activations=file")
    assert _compose("activations=file", "activations.path=x.npy").activations.path == "x.npy"


def test_local_text_preset_needs_a_path_and_takes_an_optional_separator() -> None:
    with pytest.raises(Exception, match=r"data\.path"):
        _compose("data=text")
    data = _compose("data=text", "data.path=corpus/*.txt").data
    assert (data.source, data.path, data.separator) == ("files", "corpus/*.txt", None)
    with_separator = _compose("data=text", "data.path=a.txt", "data.separator='<|endoftext|>'").data
    assert with_separator.separator == "<|endoftext|>"


@pytest.mark.parametrize(("override", "message"), [
    ("sae.dcit_mult=3", "sae.dcit_mult"),
    ("sae.dict_mult=abc", "sae.dict_mult"),
    ("l1=minus", "l1"),
])
def test_typos_and_types_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        _compose(override)
    assert message in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(("override", "key"), [
    ("sae.dict_mult=0", "sae.dict_mult"),
    ("l1=-0.1", "l1"),
    ("lr=0", "lr"),
    ("train_tokens=10", "train_tokens"),
    ("hook.name=attn_z", "hook.name"),
    ("sae.architecture=relu", None),
    ("sae.architecture=topk", "sae.architecture"),
    ("sae.b_dec_init=median", "sae.b_dec_init"),
    ("latents.dead_window_tokens=0", "latents.dead_window_tokens"),
    ("optim.grad_clip_scope=global", None),
    ("optim.grad_clip_scope=layer", "optim.grad_clip_scope"),
])
def test_range_checks_name_the_key(override: str, key: str | None) -> None:
    if key is None:
        _compose(override)
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _compose(override)


@pytest.mark.parametrize(("override", "key"), [
    ("sae.sparsity_loss=tanh", None),
    ("sae.sparsity_loss=l1", "sae.sparsity_loss"),
    ("sae.tanh_scale=0", "sae.tanh_scale"),
    ("sae.pre_act_coeff=-1e-6", "sae.pre_act_coeff"),
])
def test_jumprelu_options_are_checked_when_composed(override: str, key: str | None) -> None:
    """Anthropic's JumpReLU options (``saes/jumprelu.py``) come through Hydra, range-checked by name."""
    if key is None:
        assert _compose("sae=jumprelu", override).sae.sparsity_loss == "tanh"
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _compose("sae=jumprelu", override)
