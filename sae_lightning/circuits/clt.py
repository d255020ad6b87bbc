"""Cross-layer transcoder (CLT): an encoder per layer reads that layer's MLP input; the latents of layer
``l`` decode into the MLP output of every layer ``l' >= l``.

For the CLT's layers ``L_0 < ... < L_{n-1}`` (index ``i`` among them), with ``u_i = x_i * s_in[i]`` the
normalized input (``mlp_in``) and ``t_j = y_j * s_out[j]`` the normalized target (``mlp_out``)::

    pre_i = u_i @ W_enc[i] + b_enc[i]                       W_enc[i] [d_in, d_sae]
    z_i   = act(pre_i)                                      JumpReLU, TopK or BatchTopK (sae=...)
    t̂_j  = sum_{i <= j} z_i @ W_dec[i][:, j - i] + b_dec[j] (+ u_j @ W_skip[j])
                                                            W_dec[i] [d_sae, n - i, d_out]
    loss  = sum_j mean_tokens ||t̂_j - t_j||^2 + coeff * sum_i sparsity_i

Each layer's reconstruction error is measured on its own normalized scale (``E||t_j|| = sqrt(d_out)``), so
every layer counts alike whatever the size of its MLP output. The decoders are stored per source layer
(the layout circuit-tracer uses), so the decoder parameters number ``d_sae * d_out * n (n + 1) / 2``:
docs/cross-layer-transcoders.md gives the memory formula.

Sparsity reuses the SAE architectures' own pieces (``saes/``): JumpReLU's straight-through functions,
its sparse start and its L0 term (``sae.l0_coeff``, ``sae.target_l0``, ``sae.sparsity_loss=tanh`` with the
decoder norm taken over every layer a latent writes to, as Anthropic's CLTs); TopK's per-token selection;
BatchTopK's batch selection and its inference threshold, one per source layer. ``sae.target_l0`` and the
logged ``l0`` are the TOTAL L0 (summed over source layers); the two-sided JumpReLU term aims each layer
at ``target_l0 / n``. Decoders are free parameters (no norm constraint; ``sae.decoder_norm`` is not
used), started at row norm ``FREE_INIT_NORM``; encoders start from unit-norm random columns. TopK's AuxK
is not applied (``sae.aux_k``/``aux_coeff`` are not used).

Raw in, raw out (the replacement-model contract): ``encode(layer, mlp_in)`` and ``decode(layer, latents,
mlp_in)`` take and give model-scale activations; ``layers`` is the model layers, ascending.

On disk (:meth:`CrossLayerTranscoder.save`, :func:`load_clt`): a folder with ``clt.json`` (written last)
and one ``layer_<L>.safetensors`` per source layer ``L`` holding ``W_enc``, ``b_enc``, ``W_dec``, the bias
``b_dec`` of target layer ``L``, and ``threshold`` / ``W_skip`` when the CLT has them.

This module imports only torch, safetensors and ``sae_lightning.saes`` (no Lightning, no Hydra).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from sae_lightning.checks import ConfigError
from sae_lightning.io import atomic_write, atomic_write_json
from sae_lightning.saes.base import FREE_INIT_NORM, SAEConfig, SAEOutput, _random_rows
from sae_lightning.saes.batchtopk import HINT_FRACTION, BatchTopKSAE, batch_top, update_threshold
from sae_lightning.saes.init import decoder_bias_init
from sae_lightning.saes.jumprelu import SPARSE_START_Z, heaviside, jumprelu, l0_term, sparse_start_thresholds
from sae_lightning.saes.registry import config_from_dict
from sae_lightning.saes.sparse_ops import layout, row_pointers, sparse_decode, uniform_rows
from sae_lightning.saes.topk import SPARSE_MAX_DENSITY

ARCHITECTURES = ("jumprelu", "topk", "batchtopk")
FORMAT = "sae_lightning_clt"
FORMAT_VERSION = 1
CONFIG_FILE = "clt.json"


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def check_clt_config(sae_cfg: SAEConfig, layers: list[int]) -> None:
    """ConfigError for a CLT this module cannot build: another architecture, no or repeated layers."""
    if sae_cfg.architecture not in ARCHITECTURES:
        raise ConfigError(f"clt=true: sae={sae_cfg.architecture} has no cross-layer transcoder; choose "
                          f"one of {', '.join(ARCHITECTURES)}")
    if not layers:
        raise ConfigError("clt=true needs the list of its layers: layers=[0,1,2,...]")
    if sorted(set(layers)) != list(layers):
        raise ConfigError(f"clt=true: layers={list(layers)} must be ascending without repeats (latents of "
                          "a layer write to the layers after it)")


class CrossLayerTranscoder(nn.Module):
    """A CLT over the model layers ``layers`` (module docstring); ``cfg`` is the sparsity's SAE config
    (``sae=jumprelu|topk|batchtopk``), one dictionary of ``cfg.resolve_d_sae(d_in)`` latents per layer."""

    transcoder: ClassVar[bool] = True

    def __init__(self, cfg: SAEConfig, layers: list[int], d_in: int, d_out: int) -> None:
        super().__init__()
        check_clt_config(cfg, layers)
        self.cfg = cfg
        self.layers = [int(layer) for layer in layers]
        self.n_layers = n = len(self.layers)
        self.d_in, self.d_out = d_in, d_out
        self.d_sae = d_sae = cfg.resolve_d_sae(d_in)
        self.metadata: dict[str, Any] = {}
        arch = cfg.architecture
        if arch in ("topk", "batchtopk") and cfg.k > d_sae:
            raise ConfigError(f"sae.k={cfg.k} exceeds the dictionary size d_sae={d_sae}")
        self.W_enc = nn.ParameterList(_random_rows(d_sae, d_in, 1.0).t().contiguous() for _ in range(n))
        self.b_enc = nn.ParameterList(torch.zeros(d_sae) for _ in range(n))
        self.W_dec = nn.ParameterList(
            _random_rows(d_sae * (n - i), d_out, FREE_INIT_NORM).view(d_sae, n - i, d_out) for i in range(n))
        self.b_dec = nn.ParameterList(torch.zeros(d_out) for _ in range(n))
        if cfg.skip:
            self.W_skip = nn.ParameterList(torch.zeros(d_in, d_out) for _ in range(n))
        if arch == "jumprelu":
            # before data: pre-activations start with std about 1 (unit encoder columns, E||u||^2 = d_in)
            start = cfg.init_threshold if cfg.init_threshold is not None else SPARSE_START_Z
            self.threshold = nn.ParameterList(torch.full((d_sae,), float(start)) for _ in range(n))
        elif arch == "batchtopk":
            self.register_buffer("threshold", torch.zeros(n, dtype=torch.float64))
            self.register_buffer("threshold_batches", torch.zeros(n, dtype=torch.long))
        self.register_buffer("input_scale", torch.ones(n))
        self.register_buffer("target_scale", torch.ones(n))

    # ----- scales -----------------------------------------------------------------------------------
    def index(self, layer: int) -> int:
        """The position of model layer ``layer`` among ``layers``."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(f"layer {layer} is not one of this CLT's layers {self.layers}") from None

    @torch.no_grad()
    def set_scales(self, input_scales: list[float], target_scales: list[float]) -> None:
        """Each layer's input and target normalization constants (the hooks' activation statistics)."""
        self.input_scale.copy_(torch.tensor(input_scales, dtype=self.input_scale.dtype))
        self.target_scale.copy_(torch.tensor(target_scales, dtype=self.target_scale.dtype))

    @property
    def n_latents(self) -> int:
        """Every layer's latents, source layer by source layer (``fire_counts``' length)."""
        return self.n_layers * self.d_sae

    @property
    def output_scale(self) -> Tensor:
        """[n, 1]: divides a stacked normalized reconstruction [B, n, d_out] back to raw."""
        return self.target_scale[:, None]

    def normalize(self, x: Tensor) -> Tensor:
        """Stacked raw inputs [B, n, d_in] -> normalized."""
        return x * self.input_scale[:, None].to(x.dtype)

    def normalize_target(self, y: Tensor) -> Tensor:
        """Stacked raw targets [B, n, d_out] -> normalized."""
        return y * self.target_scale[:, None].to(y.dtype)

    # ----- the sparsity -----------------------------------------------------------------------------
    def pre_acts(self, i: int, u: Tensor) -> Tensor:
        """Pre-activations [B, d_sae] of source layer ``i`` from its normalized input ``u`` [B, d_in]."""
        return torch.addmm(self.b_enc[i], u, self.W_enc[i])

    def activate(self, i: int, pre: Tensor) -> Tensor:
        """Inference latents of source layer ``i`` (per token: BatchTopK is a JumpReLU at its threshold)."""
        arch = self.cfg.architecture
        if arch == "jumprelu":
            return pre * (pre > self.threshold[i])
        if arch == "batchtopk":
            return pre * (pre > self.threshold[i].to(pre.dtype))
        top, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(top))

    def _source(self, i: int, u: Tensor, sparsity_coeff: float) -> tuple[Tensor, Tensor, Tensor | None]:
        """Training pass of source layer ``i`` on its normalized input ``u`` [B, d_in]: its decoded output
        into every layer from ``i`` on [B, (n - i) * d_out] (no bias), its fire counts [d_sae] and its
        sparsity term (None for TopK/BatchTopK).

        The architectures' own kernels (``saes/sparse_ops.py``, ``sae.sparse_kernel``): TopK/BatchTopK decode
        only the kept entries when ``k <= d_sae / 8`` (TopK's rule), JumpReLU only the entries in play when
        few are (its rule); otherwise, and always with bf16 weights (torch's sampled matmul, which the sparse
        backward uses, has no bf16), the dense matrices. The same function either way."""
        cfg, arch = self.cfg, self.cfg.architecture
        w_dec, B = self.W_dec[i].flatten(1), u.shape[0]
        center = u.new_zeros(self.d_in)  # a transcoder's encoder subtracts nothing
        kernel = cfg.sparse_kernel if w_dec.dtype in (torch.float32, torch.float64) else "dense"
        if arch == "jumprelu":
            dense_pre = self.pre_acts(i, u)
            with torch.no_grad():  # in play: active or in the straight-through band
                lat = layout(dense_pre - self.threshold[i] > -cfg.bandwidth / 2, kernel)
            pre = lat.encode(u, self.W_enc[i], self.b_enc[i], center, dense_pre)
            theta = lat.per_entry(self.threshold[i])
            z = jumprelu(pre, theta, cfg.bandwidth, cfg.ste_to_input)
            if cfg.sparsity_loss == "tanh":
                scale = lat.per_entry(cfg.tanh_scale * w_dec.norm(dim=1))
                term = torch.tanh(z * scale).sum() / B
            else:
                l0 = heaviside(pre, theta, cfg.bandwidth, cfg.ste_to_input).sum() / B
                term = l0_term(l0, None if cfg.target_l0 is None else cfg.target_l0 / self.n_layers)
            return lat.decode(z, w_dec), lat.fire_counts(z), sparsity_coeff * term
        sparse = kernel == "sparse" or (kernel == "auto" and cfg.k <= SPARSE_MAX_DENSITY * self.d_sae)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse):  # sparse_decode: own backward
            pre = self.pre_acts(i, u)
        if arch == "topk":
            top, idx = pre.topk(cfg.k, dim=-1, sorted=False)
            crow, index, kept = uniform_rows(B, cfg.k, u.device), idx.reshape(-1), top.reshape(-1)
            flat = None
        else:
            flat, values = batch_top(pre, cfg.k, hint=HINT_FRACTION * float(self.threshold[i]))
            if self.training:
                update_threshold(self.threshold[i], self.threshold_batches[i], values.detach(),
                                 cfg.threshold_lr)
            rows = torch.div(flat, self.d_sae, rounding_mode="floor")
            crow, index = row_pointers(torch.bincount(rows, minlength=B)), flat - rows * self.d_sae
            kept = pre.reshape(-1)[flat]
        fire_counts = torch.bincount(index[kept.detach() > 0], minlength=self.d_sae)
        if sparse:
            return sparse_decode(u, self.W_enc[i], self.b_enc[i], center, w_dec, crow, index, kept), \
                fire_counts, None
        if flat is None:
            z = torch.zeros_like(pre).scatter(1, idx, torch.relu(top))
        else:
            z = BatchTopKSAE.dense_latents(pre, flat, torch.relu(kept))
        return z @ w_dec, fire_counts, None

    # ----- the replacement-model contract (raw in, raw out) -----------------------------------------
    def encode(self, layer: int, mlp_in: Tensor) -> Tensor:
        """Latents [N, d_sae] of model layer ``layer`` from its raw input ``mlp_in`` [N, d_in]."""
        i = self.index(layer)
        u = mlp_in.to(self.W_enc[i].dtype) * self.input_scale[i].to(self.W_enc[i].dtype)
        return self.activate(i, self.pre_acts(i, u))

    def decode(self, layer: int, latents: dict[int, Tensor], mlp_in: Tensor | None = None) -> Tensor:
        """Raw prediction [N, d_out] of model layer ``layer``'s target from the latents of every source
        layer ``<= layer`` in ``latents`` (model layer -> [N, d_sae]); ``mlp_in`` is ``layer``'s raw input,
        needed with a skip connection."""
        j = self.index(layer)
        out = self.b_dec[j]
        for src, z in latents.items():
            i = self.index(src)
            if i <= j:
                out = out + z.to(self.W_dec[i].dtype) @ self.W_dec[i][:, j - i]
        if self.cfg.skip:
            if mlp_in is None:
                raise ValueError("this CLT has a skip connection: decode(layer, latents, mlp_in) needs "
                                 "mlp_in")
            u = mlp_in.to(self.W_skip[j].dtype) * self.input_scale[j].to(self.W_skip[j].dtype)
            out = out + u @ self.W_skip[j]
        return out / self.target_scale[j].to(out.dtype)

    # ----- training ---------------------------------------------------------------------------------
    def forward(self, u: Tensor, *, target: Tensor | None = None, sparsity_coeff: float,
                dead_mask: Tensor | None = None) -> SAEOutput:
        """Training forward on stacked normalized inputs ``u`` [B, n, d_in] against the stacked normalized
        targets ``target`` [B, n, d_out] (module docstring); ``fire_counts`` is [n * d_sae], source layer
        by source layer, and ``l0`` the total over source layers."""
        if target is None:
            raise ValueError("a cross-layer transcoder trains against its targets: forward(u, target=t)")
        n, B = self.n_layers, u.shape[0]
        x_hat = target.new_zeros(B, n, self.d_out) + torch.stack(list(self.b_dec))
        counts, sparsity = [], []
        for i in range(n):
            decoded, fire_counts, term = self._source(i, u[:, i], sparsity_coeff)
            x_hat[:, i:] += decoded.view(B, n - i, self.d_out)
            counts.append(fire_counts)
            if term is not None:
                sparsity.append(term)
        if self.cfg.skip:
            x_hat = x_hat + torch.einsum("bnd,nde->bne", u, torch.stack(list(self.W_skip)))
        recon = (x_hat - target).pow(2).sum(-1).mean(0)  # [n]: each layer's mean_tokens ||t̂_j - t_j||^2
        parts = {"reconstruction": recon.sum()}
        if sparsity:
            name = "l0_penalty" if self.cfg.sparsity_loss == "l0" else "tanh_penalty"
            parts[name] = torch.stack(sparsity).sum()
        fire_counts = torch.cat(counts)
        l0 = fire_counts.sum() / B
        logged = {k: v.detach() for k, v in parts.items()} | {"l0": l0}
        logged |= {f"reconstruction_layer{layer}": recon[j].detach() for j, layer in enumerate(self.layers)}
        return SAEOutput(x_hat=x_hat, loss=torch.stack(list(parts.values())).sum(), terms=logged,
                         fire_counts=fire_counts, l0=l0)

    def base_coeff(self, l1: float) -> float:
        """JumpReLU's ``sae.l0_coeff``; 0 for TopK/BatchTopK (sparsity by k)."""
        return self.cfg.l0_coeff if self.cfg.architecture == "jumprelu" else 0.0

    @property
    def two_sided_target(self) -> bool:
        return self.cfg.architecture == "jumprelu" and self.cfg.sparsity_loss == "l0"

    def set_progress(self, fraction: float) -> None:
        """No schedule follows training progress."""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """JumpReLU's thresholds at ``lr * sae.threshold_lr_mult`` (as the SAE), the rest at ``lr``."""
        if self.cfg.architecture != "jumprelu":
            return [{"params": list(self.parameters()), "lr": lr}]
        thresholds = {id(p) for p in self.threshold}
        rest = [p for p in self.parameters() if id(p) not in thresholds]
        return [{"params": rest, "lr": lr},
                {"params": list(self.threshold), "lr": lr * self.cfg.threshold_lr_mult}]

    def training_logs(self) -> dict[str, Tensor]:
        if self.cfg.architecture == "batchtopk":
            return {f"threshold_layer{layer}": self.threshold[i].detach().float()
                    for i, layer in enumerate(self.layers)}
        return {}

    def before_optimizer_step(self) -> None:
        """No decoder constraint (free decoders)."""

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """JumpReLU's ``theta >= 0``."""
        if self.cfg.architecture == "jumprelu":
            for t in self.threshold:
                t.clamp_(min=0.0)

    @torch.no_grad()
    def init_from_data(self, inputs: Tensor, targets: Tensor | None = None) -> None:
        """A fresh run's start from raw samples [N, n, d_in] / [N, n, d_out]: each ``b_dec[j]`` by
        ``sae.b_dec_init`` from layer j's normalized targets; JumpReLU's thresholds at the sparse start
        (``sae.init_threshold`` unset: each latent fires on 7 % of the sample, as the SAE)."""
        if targets is None:
            raise ValueError("a cross-layer transcoder starts from its inputs and targets")
        t = self.normalize_target(targets.to(self.b_dec[0]))
        for j in range(self.n_layers):
            self.b_dec[j].copy_(decoder_bias_init(t[:, j], self.cfg.b_dec_init))
        if self.cfg.architecture == "jumprelu" and self.cfg.init_threshold is None:
            u = self.normalize(inputs.to(self.b_dec[0]))
            for i in range(self.n_layers):
                self.threshold[i].copy_(sparse_start_thresholds(
                    lambda cols, i=i: torch.addmm(self.b_enc[i][cols], u[:, i], self.W_enc[i][:, cols]),
                    self.d_sae, u.shape[0], u.device))

    # ----- on-disk format ---------------------------------------------------------------------------
    def layer_tensors(self, i: int) -> dict[str, Tensor]:
        """Source layer ``i``'s file: its encoder and decoders, target layer ``i``'s ``b_dec`` and skip."""
        out = {"W_enc": self.W_enc[i], "b_enc": self.b_enc[i], "W_dec": self.W_dec[i], "b_dec": self.b_dec[i]}
        if self.cfg.architecture == "jumprelu":
            out["threshold"] = self.threshold[i]
        elif self.cfg.architecture == "batchtopk":
            out["threshold"] = self.threshold[i].reshape(1)
            out["threshold_batches"] = self.threshold_batches[i].reshape(1)
        if self.cfg.skip:
            out["W_skip"] = self.W_skip[i]
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save(self, path: str | Path) -> Path:
        """Write the CLT folder (module docstring): every layer file, then ``clt.json`` last, atomically, so
        a folder with a ``clt.json`` is complete. Weights keep their dtype (bf16 when trained in bf16)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        for i, layer in enumerate(self.layers):
            tensors = self.layer_tensors(i)
            atomic_write(out / layer_file(layer), lambda f, t=tensors: f.write(save(t)))
        atomic_write_json(out / CONFIG_FILE, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "architecture": self.cfg.architecture,
            "layers": self.layers, "d_in": self.d_in, "d_out": self.d_out, "d_sae": self.d_sae,
            "input_scale": [float(s) for s in self.input_scale], "target_scale": [float(s) for s in
                                                                                 self.target_scale],
            "config": asdict(self.cfg), "metadata": self.metadata})
        return out


def load_clt(path: str | Path, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """The CLT saved in folder ``path`` by :meth:`CrossLayerTranscoder.save`, in eval mode, float32."""
    folder = Path(path)
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} is not a CLT folder: it has no {CONFIG_FILE}. Give the <run>/clt "
                                "folder a clt=true training run writes")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{cfg_file} is not a {FORMAT} folder of format version <= {FORMAT_VERSION}")
    clt = CrossLayerTranscoder(config_from_dict(meta["config"]), meta["layers"], int(meta["d_in"]),
                               int(meta["d_out"]))
    state: dict[str, Tensor] = {}
    for i, layer in enumerate(clt.layers):
        tensors = load_file(folder / layer_file(layer))
        for name, value in tensors.items():
            if name in ("threshold", "threshold_batches") and clt.cfg.architecture == "batchtopk":
                state.setdefault(name, getattr(clt, name).clone())[i] = value[0]
            else:
                state[f"{name}.{i}"] = value.float()
    state["input_scale"] = torch.tensor(meta["input_scale"])
    state["target_scale"] = torch.tensor(meta["target_scale"])
    clt.load_state_dict(state)
    clt.metadata = meta.get("metadata", {})
    return clt.to(device).eval()
