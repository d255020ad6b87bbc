"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders").

Two paths share one projection ``h = (u - b_dec) @ W_enc``: gate ``pi_gate = h + b_gate``, magnitude
``pi_mag = exp(r_mag) * h + b_mag`` (the paper's weight sharing ``W_mag = exp(r_mag) * W_gate``, per
latent); ``z = 1[pi_gate > 0] * relu(pi_mag)``, ``û = z @ W_dec + b_dec``.
The gate bias is stored as ``b_enc`` (it is the encoder bias of the shared ``pre_acts``, so resampling and
the other shared code treat it as such); the SAELens export names it ``b_gate``.

Loss = reconstruction + ``l1 * L_sparsity`` + ``L_aux`` with
``L_sparsity = mean_tokens sum_i relu(pi_gate)_i ||W_dec[i]||`` and
``L_aux = mean_tokens ||relu(pi_gate) @ W_dec + b_dec - u||^2``, which trains the gate path, cut off from the
reconstruction by the Heaviside, to reconstruct. The root key ``l1`` is the coefficient. Two choices where the
paper (and dictionary_learning's ``GatedSAETrainer``) and SAELens's gated trainer differ are options:

- ``sae.decoder_norm``: ``project`` keeps the decoder rows at unit norm (gradient projection and
  renormalisation; the decoder-norm weights are then 1 and the penalty is the paper's plain L1), init as
  ``relu``: unit-norm random rows, ``W_enc = min(1, 2 d_in / d_sae) W_dec^T``. ``free`` leaves the rows free
  (SAELens), init as ``relu_dn``: rows of norm 0.1, ``W_enc = W_dec^T``.
- ``sae.aux_decoder``: ``frozen`` computes ``L_aux`` through a detached copy of the decoder (and ``b_dec``),
  so the decoder is trained by the main reconstruction alone (the paper); ``trained`` lets ``L_aux`` train
  them too (SAELens).

``b_gate``, ``r_mag``, ``b_mag`` start at zero (so both paths start equal, as the paper's ``r_mag = 0``).

Kernels (``sae.sparse_kernel``, as ``relu.py``): the sparse kernels run on the open gates (``pi_gate > 0``):
outside them both ``z`` and ``relu(pi_gate)`` are 0 with no gradient.

Defaults are SAELens's choices (``free``, ``trained`` and ``b_dec_init=zeros``); the paper's are options.
The evidence is in ``docs/decisions.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sae_lightning.checks import check
from sae_lightning.saes.base import SAE, DecoderNormConfig, SAEOutput, decoder_init
from sae_lightning.saes.registry import register
from sae_lightning.saes.sparse_ops import Entries, layout


@dataclass
class GatedConfig(DecoderNormConfig):
    """``sae=gated``: the sparsity coefficient of the gate path is the root key ``l1``; ``decoder_norm``:
    free (default) | project; ``aux_decoder``: frozen | trained; ``b_dec_init`` zeros (module docstring)."""

    architecture: str = "gated"  # the registry name, fixed by the class
    decoder_norm: str = "free"  # free (SAELens) | project (the paper)
    aux_decoder: str = "trained"  # trained: L_aux trains the decoder too (SAELens) | frozen (the paper)
    b_dec_init: str = "zeros"  # SAELens's start

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.aux_decoder in ("frozen", "trained"), "sae.aux_decoder", self.aux_decoder,
              "choose frozen or trained")


@register("gated")
class GatedSAE(SAE):
    """Gated SAE: a gate path decides which latents fire, a magnitude path sharing its projection (scaled per
    latent by ``exp(r_mag)``, offset by ``b_mag``; both start at 0) how much (module docstring)."""

    config_class = GatedConfig
    sparsity_key = "l1"

    def __init__(self, cfg: GatedConfig, d_in: int, d_out: int | None = None) -> None:
        super().__init__(cfg, d_in, d_out=d_out, **decoder_init(cfg.decoder_norm, cfg, d_in))
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))

    def base_coeff(self, l1: float) -> float:
        return l1

    def latent_init_values(self) -> dict[str, float]:
        return {"r_mag": 0.0, "b_mag": 0.0}

    def _paths(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(pi_gate, pi_mag)`` from one matmul."""
        h = self.pre_acts(u, bias=0.0)
        return h + self.b_enc, self._magnitude(h, self.b_mag, self.r_mag)

    @staticmethod
    def _magnitude(h: Tensor, b_mag: Tensor, r_mag: Tensor) -> Tensor:
        """``pi_mag = exp(r_mag) * h + b_mag``."""
        return torch.addcmul(b_mag, h, r_mag.exp())

    def encode_normalized(self, u: Tensor) -> Tensor:
        pi_gate, pi_mag = self._paths(u)
        return (pi_gate > 0) * torch.relu(pi_mag)

    def forward(self, u: Tensor, *, target: Tensor | None = None, sparsity_coeff: float,
                dead_mask: Tensor | None = None) -> SAEOutput:
        target = u if target is None else target
        h = self.pre_acts(u, bias=0.0)
        pi_gate = h + self.b_enc
        lat = layout(pi_gate > 0, self.cfg.sparse_kernel)  # latents outside the gate are 0 with no gradient
        if isinstance(lat, Entries):
            h = lat.encode(u, self.W_enc, None, self.input_center(), h)
            pi_gate = h + lat.per_entry(self.b_enc)
        pi_mag = self._magnitude(h, lat.per_entry(self.b_mag), lat.per_entry(self.r_mag))
        z = (pi_gate > 0) * torch.relu(pi_mag)  # the Heaviside passes no gradient to the gate path
        x_hat = self.with_skip(lat.decode(z, self.W_dec, self.b_dec), u)
        gate = torch.relu(pi_gate)
        norms = torch.linalg.vector_norm(self.W_dec, dim=1)
        sparsity = lat.latent_sums(gate, gate.dtype) @ norms / u.shape[0]
        frozen = self.cfg.aux_decoder == "frozen"
        b_dec, w_dec = (self.b_dec.detach(), self.W_dec.detach()) if frozen else (self.b_dec, self.W_dec)
        via_gate = lat.decode(gate, w_dec, b_dec)
        if self.cfg.skip:  # the skip's share of the target, frozen or trained like the decoder
            skip = u @ self.W_skip
            via_gate = via_gate + (skip.detach() if frozen else skip)
        aux = (via_gate - target).pow(2).sum(-1).mean()
        fire_counts = lat.fire_counts(z)
        return self._output(target, x_hat, fire_counts, {"l1": sparsity_coeff * sparsity, "aux": aux})
