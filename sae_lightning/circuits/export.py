"""A CLT in circuit-tracer's cross-layer-transcoder layout (``circuit_tracer.transcoder.cross_layer_transcoder
.load_clt``): one ``W_enc_<i>.safetensors`` (``W_enc_<i>`` [d_sae, d_model], ``b_enc_<i>``, ``b_dec_<i>``,
``threshold_<i>``) and one ``W_dec_<i>.safetensors`` (``W_dec_<i>`` [d_sae, n_layers - i, d_model]) per
layer ``i``, where ``i`` is the model layer: circuit-tracer counts a CLT's layers from 0 and reads raw
activations with no normalization.

The normalization is folded into the weights (``s_in``, ``s_out``: each layer's input and target scales):
``W_enc' = (s_in[i] W_enc[i])^T``, thresholds and ``b_enc`` unchanged, ``W_dec'[i][:, j - i] =
W_dec[i][:, j - i] / s_out[j]``, ``b_dec'[j] = b_dec[j] / s_out[j]``. JumpReLU exports its thresholds,
BatchTopK its inference threshold (one per layer, repeated over its latents): both are circuit-tracer's
``jump_relu``. Refused before writing anything: TopK (a per-token top-k is no activation circuit-tracer
has), a skip connection (circuit-tracer's loader reads no ``W_skip``), layers that are not ``0..n-1``
and input and output widths that differ.

``python -m sae_lightning.circuits.export <run>/clt <out dir>`` writes the folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save

from sae_lightning.checks import UserError
from sae_lightning.circuits.clt import CrossLayerTranscoder, load_clt
from sae_lightning.io import atomic_write


class ExportError(UserError):
    """The CLT cannot be written in the requested format; the message says why and what would work."""


def check_exportable(clt: CrossLayerTranscoder) -> None:
    """ExportError naming what circuit-tracer's CLT layout cannot hold (module docstring)."""
    if clt.cfg.architecture == "topk":
        raise ExportError("circuit-tracer's CLTs use ReLU or JumpReLU; a TopK CLT (per-token top-k) has no "
                          "equivalent there. Train it with sae=batchtopk (exported as a JumpReLU at its "
                          "inference threshold) or sae=jumprelu")
    if clt.cfg.skip:
        raise ExportError("circuit-tracer's load_clt reads no skip connection (W_skip); train the CLT "
                          "without sae.skip to export it")
    if clt.layers != list(range(clt.n_layers)):
        raise ExportError(f"circuit-tracer numbers a CLT's layers 0..n-1 as the model's first n layers; "
                          f"this CLT's layers are {clt.layers}. Train it on layers=[0,...,n-1]")
    if clt.d_in != clt.d_out:
        raise ExportError(f"circuit-tracer's CLT reads and writes d_model-wide activations; this one reads "
                          f"{clt.d_in} and writes {clt.d_out}")


@torch.no_grad()
def circuit_tracer_tensors(clt: CrossLayerTranscoder, i: int) -> tuple[dict[str, torch.Tensor],
                                                                        dict[str, torch.Tensor]]:
    """The two files' tensors of layer ``i`` (float32, raw-activation scale: module docstring)."""
    s_in, s_out = clt.input_scale.float(), clt.target_scale.float()
    enc = {f"W_enc_{i}": (clt.W_enc[i].float() * s_in[i]).t().contiguous(),
           f"b_enc_{i}": clt.b_enc[i].float().clone(),
           f"b_dec_{i}": (clt.b_dec[i].float() / s_out[i]).contiguous()}
    if clt.cfg.architecture == "jumprelu":
        enc[f"threshold_{i}"] = clt.threshold[i].float().clone()
    else:
        enc[f"threshold_{i}"] = torch.full((clt.d_sae,), float(clt.threshold[i]))
    dec = {f"W_dec_{i}": (clt.W_dec[i].float() / s_out[i:, None]).contiguous()}
    return enc, dec


def export_circuit_tracer(clt: CrossLayerTranscoder, out: str | Path) -> Path:
    """Write ``clt`` into folder ``out`` in circuit-tracer's CLT layout (module docstring); returns it."""
    check_exportable(clt)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(clt.n_layers):
        enc, dec = circuit_tracer_tensors(clt, i)
        atomic_write(folder / f"W_enc_{i}.safetensors", lambda f, t=enc: f.write(save(t)))
        atomic_write(folder / f"W_dec_{i}.safetensors", lambda f, t=dec: f.write(save(t)))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a CLT folder to circuit-tracer's CLT layout")
    parser.add_argument("clt", help="the <run>/clt folder of a clt=true run")
    parser.add_argument("out", help="the folder to write (load it with circuit_tracer's load_clt)")
    args = parser.parse_args(argv)
    from sae_lightning.console import user_errors_as_messages

    with user_errors_as_messages():
        print(export_circuit_tracer(load_clt(args.clt), args.out))


if __name__ == "__main__":
    main()
