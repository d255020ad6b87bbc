"""Load a causal LM (hub id, local dir, GGUF file, GGUF in a PyPI wheel); read or splice its activations.

Any decoder-only ``transformers`` causal LM: hook points are found on the model itself and checked on a
probe forward (``layout.py``), so the rest of the code says ``HookPoint(6, "mlp_post")`` and never a
module path. Hook names (TransformerLens names in brackets, as the SAELens export writes them):

- ``resid_pre`` (``blocks.L.hook_resid_pre``): input of block ``L``, ``[B, T, d_model]``;
- ``resid_mid`` (``hook_resid_mid``): the residual stream between attention and MLP; absent in parallel
  blocks (GPT-NeoX, GPT-J), where both read the block input;
- ``resid_post`` (``hook_resid_post``): output of block ``L``;
- ``attn_out`` / ``mlp_out`` (``hook_attn_out`` / ``hook_mlp_out``): what the attention / MLP adds to the
  residual stream (after Gemma-2's post-norms);
- ``mlp_in`` (``ln2.hook_normalized``): what the MLP reads (the normalised residual; transcoders' input);
- ``mlp_post`` (``mlp.hook_post``): input of the MLP output projection (GPT-2 ``c_proj``, LLaMA
  ``down_proj``, GPT-NeoX ``dense_4h_to_h``), ``[B, T, d_mlp]``;
- ``module:<path>:<side>`` (``hook=module hook.module=<path> hook.side=input|output``): anything else.

``python -m sae_lightning.lm <model dir or hub id>`` prints where each one is in a given model.
"""

from sae_lightning.lm.hooked import HookedLM, HookPoint, ModelShape, Replacement
from sae_lightning.lm.layout import LayoutError
from sae_lightning.lm.loading import (
    ModelUnavailableError,
    gguf_path,
    load_lm,
    load_tokenizer,
    local_tokenizer,
    model_depth,
    model_fingerprint,
    models_dir,
    resolve_device,
)

__all__ = [
    "HookPoint",
    "HookedLM",
    "LayoutError",
    "ModelShape",
    "ModelUnavailableError",
    "Replacement",
    "gguf_path",
    "load_lm",
    "load_tokenizer",
    "local_tokenizer",
    "model_depth",
    "model_fingerprint",
    "models_dir",
    "resolve_device",
]
