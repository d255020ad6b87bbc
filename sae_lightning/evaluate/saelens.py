"""SAELens on-disk format (v6) in and out: ``cfg.json`` + ``sae_weights.safetensors`` in one folder.

The format, as read by ``sae_lens.SAE.load_from_disk`` (sae-lens 6.x): ``cfg.json`` holds the inference
config (``architecture`` in standard | topk | jumprelu | gated, ``d_in``, ``d_sae``, ``dtype``, ``device``,
``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``k`` for topk, and a free
``metadata`` dict: ``model_name``, ``hook_name``, ``context_size``, ``prepend_bos``, ``sae_lens_version``...);
the safetensors file holds ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec`` and, for
jumprelu, ``threshold``. SAELens computes ``z = act((x - b_dec) W_enc + b_enc)``, ``x̂ = z W_dec + b_dec``.
Gated: no ``b_enc`` but ``b_gate``, ``r_mag``, ``b_mag``, and ``z = 1[(x - b_dec) W_enc + b_gate > 0] *
relu((x - b_dec) (W_enc exp(r_mag)) + b_mag)``; our gated SAE stores ``b_gate`` as ``b_enc``.

Our SAEs' weights act on normalized activations ``u = x s`` (``s = sae.input_scale``); ``encode``/``decode``
apply ``s`` around them. Folding ``s`` into the weights makes the exported SAE work on raw ``x`` with the
same latents:
``(x s - b_dec) W_enc = (x - b_dec/s)(s W_enc)`` and ``(z W_dec + b_dec)/s = z (W_dec/s) + b_dec/s``, so
``W_enc' = s W_enc``, ``b_dec' = b_dec / s``, ``W_dec' = W_dec / s``; ``b_enc``, the JumpReLU threshold and
the top-k selection act on unchanged pre-activations and stay as they are (so do gated's ``r_mag`` and
``b_mag``: its magnitude path is ``exp(r_mag)`` times the same projection). (Decoder rows are then no longer
unit-norm: they have norm ``1/s``.)

Transcoders (sae-lens 6.34+: ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``,
``jumprelu_skip_transcoder``) read one hook and write another: ``cfg.json`` adds ``d_out`` and
``apply_b_dec_to_input=false`` (SAELens refuses true: ``b_dec`` lives in the output space), ``metadata`` adds
``hook_name_out``/``hook_layer_out``; SAELens computes ``z = act(x W_enc + b_enc)``,
``ŷ = z W_dec + b_dec (+ x W_skip^T)``, ``W_skip [d_out, d_in]``. Ours compute ``ŷ = (z W_dec + b_dec +
x s W_skip) / t`` with the target's scale ``t``, so ``W_enc' = s W_enc``, ``W_dec' = W_dec / t``,
``b_dec' = b_dec / t``, ``W_skip' = (s / t) W_skip`` (transposed). SAELens has no TopK or gated
transcoder: those are refused.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from sae_lightning.checks import UnsupportedFormatError
from sae_lightning.config import TrainConfig, parse_module_hook
from sae_lightning.io import atomic_write, atomic_write_json
from sae_lightning.saes import SAE, build_sae, config_from_dict

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"  # the format version we write; SAELens treats < 6.0 as the legacy layout
# our registry name -> SAELens architecture (inference forms that are exactly the same function); BatchTopK
# and Matryoshka infer as a JumpReLU with one global threshold, written per latent (as SAELens saves them)
TO_SAELENS = {"relu": "standard", "relu_dn": "standard", "topk": "topk", "jumprelu": "jumprelu",
              "batchtopk": "jumprelu", "matryoshka": "jumprelu", "gated": "gated"}
# our registry name -> SAELens transcoder architecture (``skip_`` inserted before ``transcoder`` with a skip)
TO_SAELENS_TRANSCODER = {"relu": "transcoder", "relu_dn": "transcoder", "jumprelu": "jumprelu_transcoder",
                         "batchtopk": "jumprelu_transcoder", "matryoshka": "jumprelu_transcoder"}
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
# our parameter names -> SAELens's, where they differ, per SAELens architecture
RENAMED = {"gated": {"b_enc": "b_gate"}}
# our hook names -> TransformerLens hook names, which SAELens and Neuronpedia key SAEs by
TL_HOOK_NAMES = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_in": "blocks.{layer}.ln2.hook_normalized",  # what the MLP reads (TL's hook_mlp_in is before ln2)
    "mlp_post": "blocks.{layer}.mlp.hook_post",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}


def transformer_lens_hook_name(layer: int, name: str) -> str:
    """``(6, "mlp_post")`` -> ``"blocks.6.mlp.hook_post"``. A ``hook=module`` name has no TransformerLens
    name: its module path is written instead (what SAELens hooks on a Hugging Face model, for an output),
    with ``:input`` appended for a module's input."""
    module = parse_module_hook(name)
    if module is not None:
        path, side = module
        return path if side == "output" else f"{path}:input"
    return TL_HOOK_NAMES[name].format(layer=layer)


def jumprelu_threshold(sae: nn.Module) -> Tensor | None:
    """The module's JumpReLU ``threshold`` tensor; None when it has none."""
    threshold = getattr(sae, "threshold", None)
    return threshold if isinstance(threshold, Tensor) else None


def saelens_metadata(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg.json`` metadata from a training config: what SAELens/Neuronpedia use to run the SAE in place
    (a transcoder's target hook as ``hook_name_out``/``hook_layer_out``, as SAELens's transcoders name it)."""
    meta = {
        "model_name": cfg.model.name,
        "hook_name": transformer_lens_hook_name(cfg.layer, cfg.hook.name),
        "hook_layer": cfg.layer,
        "context_size": cfg.data.context_size,
        "prepend_bos": _prepend_bos(cfg),
        "exclude_special_tokens": cfg.data.exclude_special,
        "dataset_path": cfg.data.name if cfg.data.source == "hub" else cfg.data.path,
        "sae_lightning_architecture": cfg.sae.architecture,
    }
    if cfg.target_hook is not None:
        layer, name = cfg.target_hook
        meta |= {"hook_name_out": transformer_lens_hook_name(layer, name), "hook_layer_out": layer}
    return meta


def _prepend_bos(cfg: TrainConfig) -> bool | None:
    """``data.prepend_bos`` as the bool SAELens runs the model with: ``auto`` asks the model's tokenizer if
    this machine has it (it does after training or evaluating on it), else ``None`` (unknown)."""
    if isinstance(cfg.data.prepend_bos, bool):
        return cfg.data.prepend_bos
    from sae_lightning.lm import local_tokenizer
    from sae_lightning.lm.text import resolve_prepend_bos

    tokenizer = local_tokenizer(cfg.model)
    return None if tokenizer is None else resolve_prepend_bos(cfg.data.prepend_bos, tokenizer)


def export_trained(sae: SAE, cfg: TrainConfig, path: str | Path) -> Path:
    """:func:`export_saelens` for an SAE or transcoder trained with ``cfg`` (its metadata from it)."""
    return export_saelens(sae, path, metadata=saelens_metadata(cfg))


@torch.no_grad()
def raw_weights(sae: SAE) -> dict[str, Tensor]:
    """The weights of ``sae`` acting on raw activations, in our names and orientations (``W_enc [d_in,
    d_sae]``, ``W_dec [d_sae, d_out]``, ``W_skip [d_in, d_out]``): ``input_scale`` ``s`` and the output's
    scale ``t`` (``target_scale``, or ``s`` for an SAE) folded in (module docstring), a rescaled decoder's
    rows as used, a global JumpReLU threshold repeated per latent. float32 on the CPU."""
    s, t = float(sae.input_scale), float(sae.output_scale)
    for name, value in (("input_scale", s), ("output scale", t)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    used = sae.weights()
    weights = {"W_enc": used.W_enc * s, "b_enc": used.b_enc.clone(), "W_dec": used.W_dec / t,
               "b_dec": sae.b_dec / t}
    if getattr(sae.cfg, "skip", False):
        weights["W_skip"] = sae.W_skip * (s / t)
    threshold = jumprelu_threshold(sae)
    if threshold is not None:
        weights["threshold"] = threshold.expand(sae.d_sae).clone()
    for name in ("r_mag", "b_mag"):  # gated's magnitude path
        if hasattr(sae, name):
            weights[name] = getattr(sae, name).clone()
    return {name: w.detach().float().cpu().contiguous() for name, w in weights.items()}


def saelens_name(architecture: str, transcoder: bool = False, skip: bool = False) -> str:
    """The SAELens architecture that computes what our ``architecture`` computes (as a transcoder, with or
    without the skip); ``UnsupportedFormatError`` naming the architecture when SAELens has none (a TopK or
    gated transcoder, an architecture it lacks)."""
    if not transcoder:
        if architecture not in TO_SAELENS:
            raise UnsupportedFormatError(f"the SAELens format has no {architecture!r} SAE: export supports "
                                         f"sae.architecture in {sorted(TO_SAELENS)}")
        return TO_SAELENS[architecture]
    if architecture not in TO_SAELENS_TRANSCODER:
        raise UnsupportedFormatError(
            f"the SAELens format has no {architecture!r} transcoder (its transcoders are ReLU and JumpReLU): "
            f"transcoders export with sae.architecture in {sorted(TO_SAELENS_TRANSCODER)}")
    theirs = TO_SAELENS_TRANSCODER[architecture]
    return theirs.replace("transcoder", "skip_transcoder") if skip else theirs


def saelens_architecture(sae: SAE) -> str:
    """:func:`saelens_name` of ``sae``."""
    return saelens_name(sae.cfg.architecture, sae.transcoder, bool(getattr(sae.cfg, "skip", False)))


@torch.no_grad()
def folded_weights(sae: SAE) -> dict[str, Tensor]:
    """SAELens-named weights of ``sae`` with its scales folded in (see the module docstring)."""
    weights = raw_weights(sae)
    if "W_skip" in weights:
        weights["W_skip"] = weights["W_skip"].T.contiguous()  # SAELens: [d_out, d_in]
    renamed = RENAMED.get(TO_SAELENS.get(sae.cfg.architecture, ""), {})
    return {renamed.get(name, name): w for name, w in weights.items()}


def saelens_config(
    architecture: str,
    d_in: int,
    d_sae: int,
    *,
    k: int | None = None,
    d_out: int | None = None,
    skip: bool = False,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``cfg.json`` dict for one of our architectures (a transcoder when ``d_out`` is given; raises for
    ones SAELens cannot run as-is, :func:`saelens_name`)."""
    transcoder = d_out is not None
    cfg: dict[str, Any] = {
        "architecture": saelens_name(architecture, transcoder, skip),
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_VERSION, "exported_by": "sae_lightning", **(metadata or {})},
    }
    if transcoder:
        cfg["d_out"] = int(d_out)
    if architecture == "topk":
        if k is None:
            raise ValueError("a topk export needs k")
        cfg.update(k=int(k), rescale_acts_by_decoder_norm=False)
    return cfg


def export_saelens(sae: SAE, path: str | Path, *, metadata: dict[str, Any] | None = None,
                   verify: bool = True) -> Path:
    """Write ``sae`` as a SAELens folder that runs on raw activations.

    ``metadata`` goes into ``cfg.json`` (use ``model_name``, ``hook_name`` from
    :func:`transformer_lens_hook_name`, ``context_size``, ``prepend_bos``, ``dataset_path``).
    With ``verify`` SAELens's formulas on the exported weights are checked against ``sae`` on a random
    probe (:func:`check_export`), so a module computing something else fails here, not in a user's
    notebook. Returns the folder.
    """
    saelens_architecture(sae)  # refused before any work
    weights = folded_weights(sae)
    d_in, d_sae = weights["W_enc"].shape
    cfg = saelens_config(sae.cfg.architecture, d_in, d_sae, k=getattr(sae, "k", None),
                         d_out=sae.d_out if sae.transcoder else None,
                         skip=bool(getattr(sae.cfg, "skip", False)), metadata=metadata)
    if verify:
        check_export(sae, cfg, weights)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_FILENAME, lambda f: f.write(save(weights)))
    atomic_write_json(out / CFG_FILENAME, cfg)
    return out


def saelens_encode(cfg: dict[str, Any], weights: dict[str, Tensor], x: Tensor) -> Tensor:
    """What SAELens computes for the latents of ``x`` (``apply_b_dec_to_input=True``; a transcoder subtracts
    nothing): the reference the export is checked against."""
    if cfg["architecture"].endswith("transcoder"):
        pre = x @ weights["W_enc"] + weights["b_enc"]
        return pre.relu() * (pre > weights["threshold"]) if "threshold" in weights else pre.relu()
    if cfg["architecture"] == "gated":
        centred = x - weights["b_dec"]
        gate = centred @ weights["W_enc"] + weights["b_gate"] > 0
        return gate * (centred @ (weights["W_enc"] * weights["r_mag"].exp()) + weights["b_mag"]).relu()
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    if cfg["architecture"] == "topk":
        top = pre.topk(cfg["k"], dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    if cfg["architecture"] == "jumprelu":
        return pre.relu() * (pre > weights["threshold"])
    return pre.relu()


@torch.no_grad()
def check_export(sae: SAE, cfg: dict[str, Any], weights: dict[str, Tensor], n_probe: int = 64) -> None:
    """Raise unless SAELens's formulas on the exported weights give what ``sae`` gives on raw ``x``
    (latents and reconstructions, a transcoder's skip included)."""
    ref = copy.deepcopy(sae).float().cpu()
    x = torch.randn(n_probe, cfg["d_in"], generator=torch.Generator().manual_seed(0))
    x = (x + ref.input_center().detach()) / float(ref.input_scale)  # a typical activation: latents fire
    z_ref = ref.encode(x)
    z_exp = saelens_encode(cfg, weights, x)
    x_hat_ref = ref.decode(z_ref, x)
    x_hat_exp = z_exp @ weights["W_dec"] + weights["b_dec"]
    if "W_skip" in weights:
        x_hat_exp = x_hat_exp + x @ weights["W_skip"].T
    for name, a, b in (("latents", z_ref, z_exp), ("reconstructions", x_hat_ref, x_hat_exp)):
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max().clamp(min=1))):
            raise RuntimeError(f"the SAELens export would give other {name} than {type(sae).__name__}: "
                               "its encode/decode are not act((x - b_dec) W_enc + b_enc), z W_dec + b_dec")


@torch.no_grad()
def assign_weights(sae: nn.Module, weights: dict[str, Tensor], architecture: str = "") -> None:
    """Copy SAELens-named ``weights`` of a SAELens ``architecture`` into our module (names in ``RENAMED`` go
    back to ours)."""
    params = dict(sae.named_parameters()) | dict(sae.named_buffers())
    ours = {theirs: our for our, theirs in RENAMED.get(architecture, {}).items()}
    for name, value in weights.items():
        name = ours.get(name, name)
        if name not in params:
            raise KeyError(f"{type(sae).__name__} has no parameter {name!r} to load")
        params[name].copy_(value.to(params[name].dtype).reshape(params[name].shape))


def read_saelens(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``cfg.json`` and the weights of a SAELens folder, normalized to ``apply_b_dec_to_input=True``.

    A folder written with ``apply_b_dec_to_input=False`` (``z = act(x W_enc + b_enc)``) is rewritten
    exactly as ``act((x - b_dec) W_enc + (b_enc + b_dec W_enc))`` (gated: ``b_gate`` likewise and ``b_mag`` by
    ``exp(r_mag) * b_dec W_enc``).
    """
    folder = Path(path)
    cfg = json.loads((folder / CFG_FILENAME).read_text())
    weights = load_file(folder / WEIGHTS_FILENAME)
    unsupported = {key: cfg.get(key) for key in ("normalize_activations", "reshape_activations")
                   if cfg.get(key, "none") != "none"}
    if cfg.get("rescale_acts_by_decoder_norm") and cfg["architecture"] != "topk":
        unsupported["rescale_acts_by_decoder_norm"] = True
    if unsupported:
        raise NotImplementedError(f"cannot load a SAELens SAE with {unsupported} into sae_lightning")
    if not cfg.get("apply_b_dec_to_input", True):
        shift = weights["b_dec"] @ weights["W_enc"]
        if cfg["architecture"] == "gated":  # both paths: the magnitude path's shift is exp(r_mag) times
            weights["b_gate"] = weights["b_gate"] + shift
            weights["b_mag"] = weights["b_mag"] + shift * weights["r_mag"].exp()
        else:
            weights["b_enc"] = weights["b_enc"] + shift
        cfg["apply_b_dec_to_input"] = True
    return cfg, weights


def load_saelens(path: str | Path) -> SAE:
    """Build one of our SAEs from a SAELens folder (standard -> relu, topk, jumprelu, gated);
    ``input_scale`` 1."""
    cfg, weights = read_saelens(path)
    architecture = FROM_SAELENS.get(cfg["architecture"])
    if architecture is None:
        raise NotImplementedError(f"SAELens architecture {cfg['architecture']!r} has no sae_lightning "
                                  f"equivalent; supported: {sorted(FROM_SAELENS)}")
    sae_cfg = config_from_dict({"architecture": architecture, "d_sae": int(cfg["d_sae"]),
                                **_decoder_fields(cfg)})
    sae = build_sae(sae_cfg, int(cfg["d_in"]))
    assign_weights(sae, weights, cfg["architecture"])
    return sae.eval()


def _decoder_fields(cfg: dict[str, Any]) -> dict[str, int | str]:
    """How a SAELens SAE's decoder is read, as our config says it (and a TopK's ``k``). TopK with
    ``rescale_acts_by_decoder_norm`` computes what our ``decoder_norm=rescale`` computes (rows divided by
    their norms, norms into the encoder), without it the rows as they are (``project`` computes with the
    parameters themselves). SAELens trains JumpReLU and gated decoders with free rows:
    ``decoder_norm=free``, so that training on from the loaded SAE does not renormalise them."""
    if cfg["architecture"] in ("jumprelu", "gated"):
        return {"decoder_norm": "free"}
    if cfg["architecture"] != "topk":
        return {}
    return {"k": int(cfg["k"]),
            "decoder_norm": "rescale" if cfg.get("rescale_acts_by_decoder_norm") else "project"}


def push_to_hub(path: str | Path, repo_id: str, *, path_in_repo: str | None = None, private: bool = False,
                token: str | None = None) -> str:
    """Upload an exported folder to the Hugging Face hub (``SAE.from_pretrained``-style layout: the folder
    lands under ``path_in_repo``, default its own name). Needs network and a token with write access;
    returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(path)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                             path_in_repo=path_in_repo if path_in_repo is not None else folder.name,
                             commit_message=f"Add SAE {folder.name} (exported by sae_lightning)")
    return str(info)
