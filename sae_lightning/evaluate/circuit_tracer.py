"""circuit-tracer's per-layer transcoder set (PLT set) on disk: ``config.yaml`` + ``layer_<i>.safetensors``.

The layout circuit-tracer 0.5.0 reads, both from a hub repo (``ReplacementModel.from_pretrained(model,
"<user>/<repo>")``, through ``load_transcoder_from_hub``) and from its local cache (a folder holding
``config.yaml``; ``load_transcoders_from_cache``): ``config.yaml`` says ``model_kind: transcoder_set``, the
model, and the hooks the features read and write (TransformerLens hook names relative to ``blocks.<L>``);
``layer_<i>.safetensors`` holds, for layer ``i``, what ``load_relu_transcoder`` reads: ``W_enc [d_sae,
d_model]``, ``b_enc``, ``W_dec [d_sae, d_model]``, ``b_dec``, optionally ``W_skip [d_model, d_model]``
(applied as ``x @ W_skip.T``) and ``activation_function.threshold [d_sae]`` (JumpReLU ``z = pre *
(pre > threshold)``; without it ReLU). circuit-tracer computes ``z = act(x W_enc^T + b_enc)``, ``ŷ = z W_dec
+ b_dec (+ x W_skip^T)`` on raw activations, so the weights are
:func:`sae_lightning.evaluate.saelens.raw_weights` (both scales folded in), transposed where its orientation
differs.

What the format cannot hold is refused before anything is written (:func:`check_plt_set`): its loader
knows ReLU and JumpReLU only (no TopK, no gated), its ``TranscoderSet`` needs one transcoder for every layer
``0..n-1`` with one width, and its replacement model replaces MLPs: the input hook must be ``mlp_in``
(``mlp.hook_in``) or ``resid_mid`` (``hook_resid_mid``) and the target ``mlp_out`` of the same layer
(``hook_mlp_out``: what the MLP adds to the residual stream, after Gemma-2's post-MLP norm as ours is).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save
from torch import Tensor

from sae_lightning.checks import UnsupportedFormatError
from sae_lightning.config import TrainConfig
from sae_lightning.evaluate.saelens import raw_weights
from sae_lightning.io import atomic_write, atomic_write_text
from sae_lightning.saes import SAE

FORMAT = "circuit_tracer"
CONFIG_FILE = "config.yaml"
# our hook name -> circuit-tracer's feature_input_hook / feature_output_hook (relative to blocks.<L>)
INPUT_HOOKS = {"mlp_in": "mlp.hook_in", "resid_mid": "hook_resid_mid"}
OUTPUT_HOOKS = {"mlp_out": "hook_mlp_out"}
ACTIVATIONS = {"relu": "relu", "relu_dn": "relu", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
               "matryoshka": "jumprelu"}  # BatchTopK and Matryoshka infer as a JumpReLU


def layer_file(layer: int) -> str:
    """The weights file of ``layer``'s transcoder."""
    return f"layer_{layer}.safetensors"


def check_plt_set(members: Sequence[tuple[SAE, TrainConfig]]) -> None:
    """Raise ``UnsupportedFormatError`` naming the format and what it lacks unless ``members`` (each a
    trained transcoder and its config) make a transcoder set circuit-tracer can load and splice in."""
    if not members:
        raise UnsupportedFormatError(f"export={FORMAT}: no transcoders to export")
    for sae, cfg in members:
        where = f"layer {cfg.layer} {cfg.hook.name}"
        if not sae.transcoder or cfg.target_hook is None:
            raise UnsupportedFormatError(
                f"export={FORMAT} writes per-layer transcoders (mlp_in -> mlp_out), but the run at {where} "
                "is an SAE (no target.name): train with target.name=mlp_out, or use export=saelens")
        architecture = cfg.sae.architecture
        if architecture not in ACTIVATIONS:
            raise UnsupportedFormatError(
                f"export={FORMAT}: circuit-tracer's transcoder loader knows ReLU and JumpReLU activations, "
                f"not a {architecture!r} transcoder; train with sae.architecture in {sorted(ACTIVATIONS)}")
        target_layer, target = cfg.target_hook
        if cfg.hook.name not in INPUT_HOOKS or target not in OUTPUT_HOOKS or target_layer != cfg.layer:
            raise UnsupportedFormatError(
                f"export={FORMAT}: circuit-tracer replaces each layer's MLP, so a transcoder must read "
                f"{' or '.join(INPUT_HOOKS)} and write mlp_out of the same layer, not {where} -> layer "
                f"{target_layer} {target}")
    layers = sorted(cfg.layer for _, cfg in members)
    if layers != list(range(len(layers))):
        raise UnsupportedFormatError(
            f"export={FORMAT}: circuit-tracer's TranscoderSet needs one transcoder for every layer 0..n-1, "
            f"this set has layers {layers}: train layers=[0,...,{max(layers)}] (or all of them)")
    for name, values in (("input hook", {cfg.hook.name for _, cfg in members}),
                         ("model", {cfg.model.name for _, cfg in members}),
                         ("width (d_sae)", {sae.d_sae for sae, _ in members}),
                         ("activation", {ACTIVATIONS[cfg.sae.architecture] for _, cfg in members}),
                         ("skip connection", {bool(sae.cfg.skip) for sae, _ in members})):
        if len(values) > 1:
            raise UnsupportedFormatError(f"export={FORMAT}: a transcoder set has one {name} for every "
                                         f"layer, these transcoders have {sorted(map(str, values))}")


def circuit_tracer_weights(sae: SAE) -> dict[str, Tensor]:
    """``layer_<i>.safetensors``'s tensors for one transcoder (module docstring)."""
    ours = raw_weights(sae)
    weights = {"W_enc": ours["W_enc"].T.contiguous(), "b_enc": ours["b_enc"], "W_dec": ours["W_dec"],
               "b_dec": ours["b_dec"]}
    if "W_skip" in ours:
        weights["W_skip"] = ours["W_skip"].T.contiguous()
    if "threshold" in ours:
        weights["activation_function.threshold"] = ours["threshold"]
    return weights


def plt_config(cfg: TrainConfig, n_layers: int) -> dict[str, Any]:
    """``config.yaml``'s content for a set of ``n_layers`` transcoders trained like ``cfg``."""
    return {"model_kind": "transcoder_set", "model_name": cfg.model.name,
            "feature_input_hook": INPUT_HOOKS[cfg.hook.name], "feature_output_hook": OUTPUT_HOOKS["mlp_out"],
            "n_layers": n_layers, "exported_by": "sae_lightning"}


def export_circuit_tracer(members: Sequence[tuple[SAE, TrainConfig]], path: str | Path) -> Path:
    """Write ``members`` (each a transcoder and its training config, one per layer ``0..n-1``) as a
    circuit-tracer transcoder set in folder ``path``; checks first (:func:`check_plt_set`), ``config.yaml``
    written last, so a folder holding it is complete. Returns the folder."""
    check_plt_set(members)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for sae, cfg in members:
        tensors = circuit_tracer_weights(sae)
        atomic_write(out / layer_file(cfg.layer), lambda f, t=tensors: f.write(save(t)))
    text = yaml.safe_dump(plt_config(members[0][1], len(members)), sort_keys=False)
    atomic_write_text(out / CONFIG_FILE, text)
    return out
