"""What every SAE architecture shares: its config base, the training output, the ``SAE`` base class, and
the on-disk format (``save``/``load``).

Weights use SAELens names and shapes: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``
(rows are latent directions), ``b_dec [d_in]``. They act on *normalized* activations ``u = x * input_scale``
(``input_scale`` makes ``E||u|| = sqrt(d_in)``, see docs/architectures.md); the SAE is the one owner of
that scale: ``encode(x)`` and ``decode(z)`` take and give raw activations, and ``forward(u, ...)``
(training) takes normalized ones so that loss coefficients mean the same on every model.

Loss scaling (as SAELens, so its coefficients transfer): the reconstruction loss is
``mean_tokens sum_d (û - u)^2`` and every sparsity term a mean over tokens of a sum over latents,
multiplied by the coefficient the training step passes (see :meth:`SAE.base_coeff`).

Transcoders (``d_out`` given): the same weights read one hook and reconstruct another, so ``W_dec`` is
``[d_sae, d_out]``, ``b_dec [d_out]``, the encoder subtracts nothing (``b_dec`` lives in the target space)
and the target has its own normalization ``target_scale``: ``decode`` gives raw target activations and
``forward(u, target=t)`` measures the reconstruction against the normalized target ``t``. With
``sae.skip`` a linear skip ``W_skip [d_in, d_out]`` (zero at init) is added: ``û = decoded + u @ W_skip``.

This package imports only ``torch``, ``safetensors`` and the standard library (no Lightning, no Hydra).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from sae_lightning.checks import check
from sae_lightning.io import atomic_write, atomic_write_json
from sae_lightning.saes.init import decoder_bias_init

BLOCK_ROWS = 256  # row blocks for passes over [B, d_sae] tensors: a reused buffer stays in cache
FORMAT_VERSION = 1
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
SCALES = ("input_scale", "target_scale")  # buffers saved in cfg.json, not in the weights file
FREE_INIT_NORM = 0.1  # initial row norm of a free or rescaled decoder (Anthropic's April 2024 init; SAELens)


def _random_rows(n: int, d: int, norm: float) -> Tensor:
    """``n`` random directions [n, d] of L2 norm ``norm``."""
    w = torch.randn(n, d)
    return w * (norm / w.norm(dim=1, keepdim=True))


@torch.no_grad()
def column_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-latent sums (float32) and non-zero counts (int64) over the rows of ``z`` [B, d_sae], z >= 0.

    One blockwise pass in float32 (exact counts also when z is bf16/fp16 under autocast): each block is
    copied into a small reused buffer, summed with a ones-vector matmul, replaced by its ``sign`` and
    summed again. ``count_nonzero`` instead converts the whole [B, d_sae] mask to int64 (8 bytes per
    entry), several times slower at training batch sizes.
    """
    n_rows = min(BLOCK_ROWS, z.shape[0])
    buf = z.new_empty(n_rows, z.shape[1], dtype=torch.float32)
    ones = buf.new_ones(1, n_rows)
    sums, counts = buf.new_zeros(1, z.shape[1]), buf.new_zeros(1, z.shape[1])
    with torch.autocast(z.device.type, enabled=False):
        for block in z.split(n_rows):
            n = block.shape[0]
            b = buf[:n].copy_(block)
            sums.addmm_(ones[:, :n], b)
            counts.addmm_(ones[:, :n], b.sign_())
    return sums[0], counts[0].round().long()


@dataclass
class SAEConfig:
    """Knobs every architecture has; each architecture file subclasses it with its own (an unknown key,
    e.g. ``sae.k`` on ``sae=relu``, then fails naming the key and the architecture's config class).

    ``architecture`` is the registry name, fixed by each subclass. ``d_sae`` wins over ``dict_mult``.
    ``b_dec_init``: ``geometric_median`` | ``mean`` | ``zeros`` of a training sample (fresh runs only).
    ``skip``: a linear skip connection ``W_skip`` from input to output (transcoders only).
    """

    architecture: str = ""  # the registry name, fixed by each subclass
    dict_mult: float = 8.0  # d_sae = round(dict_mult * d_in) unless d_sae is set
    d_sae: int | None = None  # the dictionary size; wins over dict_mult
    b_dec_init: str = "geometric_median"
    """geometric_median | mean | zeros of a training sample (fresh runs only)"""
    skip: bool = False  # a linear skip W_skip from input to output (transcoders only)

    def __post_init__(self) -> None:
        own = next(f.default for f in fields(self) if f.name == "architecture")
        check(self.architecture == own, "sae.architecture", self.architecture,
              f"{type(self).__name__} is sae={own}; choose the architecture with sae=<name>")
        check(self.dict_mult > 0, "sae.dict_mult", self.dict_mult, "must be > 0")
        check(self.d_sae is None or self.d_sae > 0, "sae.d_sae", self.d_sae, "must be > 0")
        check(self.b_dec_init in ("geometric_median", "mean", "zeros"), "sae.b_dec_init", self.b_dec_init,
              "choose geometric_median, mean or zeros")

    def resolve_d_sae(self, d_in: int) -> int:
        """``d_sae`` when set, else ``round(dict_mult * d_in)``."""
        return self.d_sae if self.d_sae is not None else round(self.dict_mult * d_in)


@dataclass
class PenalisedConfig(SAEConfig):
    """Base of the configs of architectures with a sparsity coefficient (relu, relu_dn, jumprelu, gated).

    ``target_l0``: when set, the training step steers the coefficient so that the run ends near this L0
    (``sae_lightning/train/sparsity.py``); the configured coefficient (``l1`` or the architecture's own key)
    is then only its start value. ``sparse_kernel``: how the training forward and backward compute everything
    after the encoder's dense matmul, chosen each step from the batch's measured share of active entries
    under ``auto`` (``sparse_ops.layout``); the same function either way.
    """

    target_l0: float | None = None
    """steer the coefficient so the run ends near this L0; None: fixed coefficient"""
    sparse_kernel: str = "auto"
    """auto (sparse when few entries fire in the batch) | sparse | dense (saes/sparse_ops.py)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.target_l0 is None or self.target_l0 > 0, "sae.target_l0", self.target_l0, "must be > 0")
        check(self.sparse_kernel in ("auto", "sparse", "dense"), "sae.sparse_kernel", self.sparse_kernel,
              "choose auto, sparse or dense")


@dataclass
class DecoderNormConfig(PenalisedConfig):
    """Base of the penalised architectures whose decoder rows are either kept at unit norm or left free
    (``sae.decoder_norm``: ``project`` | ``free``; :func:`decoder_init` says what each means)."""

    decoder_norm: str = "project"  # project: rows kept at unit norm | free: rows unconstrained (decoder_init)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.decoder_norm in ("project", "free"), "sae.decoder_norm", self.decoder_norm,
              "choose project or free")


def decoder_init(decoder_norm: str, cfg: SAEConfig, d_in: int) -> dict[str, Any]:
    """``SAE.__init__`` keywords of a decoder kept at unit norm or left free, for ``cfg``'s dictionary size.

    ``project``: unit-norm random rows, kept there (gradient projection and renormalisation), encoder
    ``min(1, 2 d_in / d_sae) W_dec^T`` (at ``W_dec^T`` alone a wide dictionary's first reconstruction is
    ``d_sae / (2 d_in)`` times too large). ``free``: rows of norm ``FREE_INIT_NORM``, unconstrained,
    encoder ``W_dec^T`` (Anthropic's April 2024 init, SAELens's for every architecture).
    """
    if decoder_norm == "free":
        return {"decoder_init_norm": FREE_INIT_NORM, "unit_norm_decoder": False, "encoder_gain": 1.0}
    return {"encoder_gain": min(1.0, 2 * d_in / cfg.resolve_d_sae(d_in))}


class Weights(NamedTuple):
    """The encoder and decoder an SAE computes with (``SAE.weights``)."""

    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_out]


class _Rescaled(torch.autograd.Function):
    """``(W_enc * n, b_enc * n, W_dec / n)`` with ``n_i = |W_dec[i]|`` (``SAE.weights``), and its backward
    written out: with ``g`` the outputs' gradients, ``grad n = <g_E[:, i], W_enc[:, i]> + g_b b_enc -
    <g_D[i], W_dec[i]> / n^2``, ``grad W_enc = g_E n``, ``grad b_enc = g_b n`` and ``grad W_dec = g_D / n +
    W_dec grad n / n``: five passes over the weights where autograd's chain of elementwise ops makes about
    ten (each a full pass over a weight matrix, a tenth of a TopK step on the CPU)."""

    @staticmethod
    def forward(ctx: Any, w_enc: Tensor, b_enc: Tensor, w_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = torch.linalg.vector_norm(w_dec, dim=1)
        ctx.save_for_backward(w_enc, b_enc, w_dec, n)
        return w_enc * n, b_enc * n, w_dec / n[:, None]

    @staticmethod
    def backward(ctx: Any, g_enc: Tensor | None, g_b: Tensor | None,
                 g_dec: Tensor | None) -> tuple[Tensor | None, ...]:
        w_enc, b_enc, w_dec, n = ctx.saved_tensors
        grad_n = torch.zeros_like(n)
        grad_enc = grad_b = None
        if g_enc is not None:
            grad_n += torch.linalg.vecdot(g_enc.t(), w_enc.t())
            grad_enc = g_enc * n
        if g_b is not None:
            grad_n += g_b * b_enc
            grad_b = g_b * n
        direct = None
        if g_dec is not None:
            grad_n -= torch.linalg.vecdot(g_dec, w_dec) / n.square()
            direct = g_dec / n[:, None]
        via_norm = (grad_n / n)[:, None]
        grad_dec = w_dec * via_norm if direct is None else direct.addcmul_(w_dec, via_norm)
        return grad_enc, grad_b, grad_dec


@dataclass
class SAEOutput:
    """What one training forward returns (normalized space)."""

    x_hat: Tensor  # [B, d_out] reconstruction of the normalized target (the input for an SAE)
    loss: Tensor  # scalar, what the optimizer minimises
    terms: dict[str, Tensor]  # detached scalars for logging: the loss terms (after coefficients) and "l0"
    fire_counts: Tensor  # [d_sae] rows of the batch where each latent was non-zero (int64)
    l0: Tensor  # scalar, mean number of non-zero latents per row


class SAE(nn.Module):
    """Base class: parameters, the input scale, the pre-encoder bias, the decoder-norm constraint, output
    assembly and the on-disk format.

    Subclasses set ``config_class``, implement ``encode_normalized``, ``forward`` and, when they have a
    sparsity penalty, ``base_coeff``. With ``unit_norm_decoder`` the decoder rows stay at unit norm:
    ``before_optimizer_step`` removes the gradient component along each row, ``after_optimizer_step``
    renormalises them. With ``rescaled_decoder`` instead, the rows are free parameters and the model uses
    them at unit norm, their norms moved into the encoder (:meth:`weights`). ``encoder_gain`` scales the
    initial ``W_enc = W_dec^T`` (a transcoder's encoder directions are drawn independently: its decoder
    rows live in another space). ``d_out`` makes it a transcoder (module docstring), even when
    ``d_out == d_in``.
    """

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    sparsity_key: ClassVar[str] = ""  # the key that sets its sparsity: "l1" (the root key) or "sae.<key>"

    def __init__(self, cfg: SAEConfig, d_in: int, *, d_out: int | None = None, decoder_init_norm: float = 1.0,
                 unit_norm_decoder: bool = True, rescaled_decoder: bool = False,
                 encoder_gain: float = 1.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_in = d_in
        self.transcoder = d_out is not None
        self.d_out = d_in if d_out is None else d_out
        self.d_sae = cfg.resolve_d_sae(d_in)
        self.rescaled_decoder = rescaled_decoder
        self.unit_norm_decoder = unit_norm_decoder and not rescaled_decoder
        self.metadata: dict[str, Any] = {}  # provenance saved in cfg.json (model, hook, training config)
        w_dec = _random_rows(self.d_sae, self.d_out, decoder_init_norm)
        self.W_dec = nn.Parameter(w_dec)
        # Encoder initialised as the decoder's transpose and stored latent-major (``W_enc.t()`` is
        # contiguous): each latent's encoder column is contiguous, and sparse kernels that produce the
        # gradient as [d_sae, d_in] hand it over without a transposing copy.
        w_enc = _random_rows(self.d_sae, d_in, decoder_init_norm) if self.transcoder else w_dec
        self.W_enc = nn.Parameter(w_enc.clone().t() * encoder_gain)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_in, self.d_out))
        self.register_buffer("input_scale", torch.ones(()))
        if self.transcoder:
            self.register_buffer("target_scale", torch.ones(()))

    # ----- raw activations in and out ---------------------------------------------------------------
    def normalize(self, x: Tensor) -> Tensor:
        """Raw activations -> what the weights act on (``x * input_scale``)."""
        return x * self.input_scale.to(x.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [B, d_sae] of raw activations ``x`` [B, d_in]."""
        return self.encode_normalized(self.normalize(x))

    def decode(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """Raw-scale reconstruction [B, d_out] of the target (the input for an SAE) from latents ``z``.
        The skip connection (``sae.skip``) needs the raw input ``x`` that ``z`` encodes."""
        u_hat = self.decode_normalized(z)
        if self.cfg.skip:
            if x is None:
                raise ValueError("this SAE has a skip connection: decode(z, x) needs the raw input x")
            u_hat = self.with_skip(u_hat, self.normalize(x).to(u_hat.dtype))
        return u_hat / self.output_scale.to(z.dtype)

    @property
    def n_latents(self) -> int:
        """The latents whose firing ``step.LatentStats`` tracks (``fire_counts``' length): ``d_sae``."""
        return self.d_sae

    @property
    def output_scale(self) -> Tensor:
        """The normalization of what it reconstructs: ``target_scale`` (transcoder) or ``input_scale``."""
        return self.target_scale if self.transcoder else self.input_scale

    def normalize_target(self, y: Tensor) -> Tensor:
        """Raw target activations -> the space of the reconstruction (``y * output_scale``)."""
        return y * self.output_scale.to(y.dtype)

    @torch.no_grad()
    def set_input_scale(self, scale: float) -> None:
        """Set the normalization constant (from the activation statistics, before training)."""
        self.input_scale.fill_(float(scale))

    @torch.no_grad()
    def set_target_scale(self, scale: float) -> None:
        """Set a transcoder's target normalization constant (the target hook's activation statistics)."""
        if not self.transcoder:
            raise ValueError("set_target_scale is for transcoders: an SAE's target is its input")
        self.target_scale.fill_(float(scale))

    # ----- the architecture's contract --------------------------------------------------------------
    def encode_normalized(self, u: Tensor) -> Tensor:
        """Dense latents [B, d_sae] of normalized activations."""
        raise NotImplementedError

    def decode_normalized(self, z: Tensor) -> Tensor:
        """``z @ W_dec + b_dec`` as one fused addmm (``W_dec`` as used: :meth:`weights`)."""
        return torch.addmm(self.b_dec, z, self.weights().W_dec)

    def forward(self, u: Tensor, *, target: Tensor | None = None, sparsity_coeff: float,
                dead_mask: Tensor | None = None) -> SAEOutput:
        """Training forward on normalized activations ``u``, reconstructing the normalized ``target``
        (``u`` when None)."""
        raise NotImplementedError

    def with_skip(self, u_hat: Tensor, u: Tensor) -> Tensor:
        """``u_hat + u @ W_skip`` with the skip connection, ``u_hat`` without."""
        return torch.addmm(u_hat, u, self.W_skip) if self.cfg.skip else u_hat

    def input_center(self) -> Tensor:
        """What the encoder subtracts from its input: ``b_dec`` (SAE), zeros (transcoder)."""
        return self.b_enc.new_zeros(self.d_in) if self.transcoder else self.b_dec

    def base_coeff(self, l1: float) -> float:
        """The sparsity coefficient before schedules: the root key ``l1`` for L1 architectures, the
        architecture's own key otherwise, 0 when sparsity is structural (TopK)."""
        return 0.0

    def set_progress(self, fraction: float) -> None:
        """Told before each training step how far training is (``step / max_steps`` in [0, 1]), for losses
        that follow a schedule (p-annealing in ``relu.py``). The default ignores it."""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimizer's parameter groups at base learning rate ``lr`` (the trainer and the benchmarks build
        Adam from these): one group by default; an architecture whose parameters need another step size
        (JumpReLU's thresholds) returns them in a group of their own."""
        return [{"params": list(self.parameters()), "lr": lr}]

    @property
    def two_sided_target(self) -> bool:
        """Whether the sparsity term itself pushes L0 up when it is under ``sae.target_l0`` (JumpReLU's): the
        controller then never lowers the coefficient below its start (``sparsity.TargetL0``)."""
        return False

    def latent_init_values(self) -> dict[str, float]:
        """Per-latent parameters beyond ``W_enc``/``W_dec``/``b_enc`` (name -> the value they start at), which
        dead-latent resampling puts back at their start for the latents it re-initialises."""
        return {}

    def training_logs(self) -> dict[str, Tensor]:
        """Training state worth a curve, logged as ``train/<name>`` with the loss terms (BatchTopK: its
        inference threshold). The default has none."""
        return {}

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove from each decoder row's gradient its component along that row (unit-norm decoders only)."""
        grad = self.W_dec.grad
        if not self.unit_norm_decoder or grad is None:
            return
        w = self.W_dec
        # row-wise dot products as a batched matmul: linalg.vecdot materialises a [d_sae, d_in] product
        along = torch.bmm(grad.unsqueeze(1), w.unsqueeze(2)).view(-1)
        coef = along / torch.linalg.vector_norm(w, dim=1).square()
        grad.addcmul_(coef[:, None], w, value=-1.0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Renormalise decoder rows to unit norm (unit-norm decoders only)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True))

    def upgrade_weights(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """Weights read from an SAE folder written by an older version -> this version's names (:meth:`load`).
        The default changes nothing."""
        return weights

    @torch.no_grad()
    def init_from_data(self, inputs: Tensor, targets: Tensor | None = None) -> None:
        """The data-dependent start of a fresh run, from raw samples of the inputs [n, d_in] and, for a
        transcoder, of the targets [n, d_out]: ``b_dec`` by ``cfg.b_dec_init`` from the targets (an SAE's
        are its inputs); an architecture with more to start from data extends this (JumpReLU's thresholds)."""
        u = self.normalize_target((inputs if targets is None else targets).to(self.b_dec))
        self.b_dec.copy_(decoder_bias_init(u, self.cfg.b_dec_init))

    # ----- shared pieces --------------------------------------------------------------------------
    def weights(self) -> Weights:
        """The encoder and decoder the model computes with: the parameters themselves, or, with a
        rescaled decoder, ``W_dec[i] / n_i`` and ``W_enc[:, i] * n_i``, ``b_enc[i] * n_i`` where
        ``n_i = |W_dec[i]|``: the same function as a unit-norm decoder, while the optimizer moves the raw
        rows freely (SAELens's ``rescale_acts_by_decoder_norm``). Differentiable; call it once per
        forward and pass it on."""
        if not self.rescaled_decoder:
            return Weights(self.W_enc, self.b_enc, self.W_dec)
        return Weights(*_Rescaled.apply(self.W_enc, self.b_enc, self.W_dec))

    def pre_acts(self, u: Tensor, bias: Tensor | float | None = None, w: Weights | None = None) -> Tensor:
        """Encoder pre-activations ``(u - b_dec) @ W_enc + b_enc`` [B, d_sae] (``bias`` instead of ``b_enc``
        when given).

        Computed as ``u @ W_enc + (b_enc - b_dec @ W_enc)`` in one addmm: the same function, but the
        backward needs no [B, d_sae] x [d_sae, d_in] matmul for the gradient of ``u - b_dec`` (a
        matrix-vector product gives b_dec's share), which saves a sixth of a dense step's FLOPs.
        A transcoder subtracts nothing: ``u @ W_enc + b_enc``, also one addmm (the bias is the GEMM's
        starting value instead of a second pass over the [B, d_sae] result). ``w``: the weights as used
        (default :meth:`weights`).
        """
        w = self.weights() if w is None else w
        bias = w.b_enc if bias is None else bias
        if self.transcoder:
            return torch.addmm(torch.as_tensor(bias, dtype=u.dtype, device=u.device), u, w.W_enc)
        return torch.addmm(bias - self.b_dec @ w.W_enc, u, w.W_enc)

    def _output(self, target: Tensor, x_hat: Tensor, fire_counts: Tensor,
                terms: dict[str, Tensor | None]) -> SAEOutput:
        """Sum the reconstruction loss of ``x_hat`` against ``target`` (the input for an SAE) and the given
        loss ``terms`` (None = absent) into an ``SAEOutput``."""
        recon = torch.nn.functional.mse_loss(x_hat, target, reduction="sum") / target.shape[0]
        parts = {"reconstruction": recon, **{k: t for k, t in terms.items() if t is not None}}
        loss = torch.stack(list(parts.values())).sum()
        l0 = fire_counts.sum() / target.shape[0]
        logged = {name: t.detach() for name, t in parts.items()} | {"l0": l0}
        return SAEOutput(x_hat=x_hat, loss=loss, terms=logged, fire_counts=fire_counts, l0=l0)

    # ----- on-disk format ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` + ``sae.safetensors`` into folder ``path`` (docs/design.md, "SAE folder").

        The weights file is written first and ``cfg.json`` last, each atomically: a folder with a
        ``cfg.json`` is complete. The weights as used (:meth:`weights`) are written, so on disk the rows of
        a rescaled decoder are at unit norm like every other (the same function; readers of the format
        never meet the parametrisation).
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() | self.weights()._asdict()
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items() if k not in SCALES}
        atomic_write(out / WEIGHTS_FILE, lambda f: f.write(save(tensors)))
        atomic_write_json(out / CONFIG_FILE, {
            "format": "sae_lightning", "format_version": FORMAT_VERSION,
            "architecture": self.cfg.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
            "input_scale": float(self.input_scale), "config": asdict(self.cfg), "metadata": self.metadata,
            "d_out": self.d_out if self.transcoder else None,
            "target_scale": float(self.output_scale),
        })
        return out

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu") -> SAE:
        """The SAE saved in folder ``path`` by :meth:`save`, in eval mode, taking raw activations."""
        folder = Path(path)
        cfg_file = folder / CONFIG_FILE
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{folder} is not an SAE folder: it has no {CONFIG_FILE}. Give the "
                                    "<run>/sae folder a training run writes")
        meta = json.loads(cfg_file.read_text())
        if meta.get("format") != "sae_lightning" or meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{cfg_file} is not an sae_lightning SAE of format version <= {FORMAT_VERSION} "
                             f"(format={meta.get('format')!r}, version={meta.get('format_version')!r})")
        from sae_lightning.saes.registry import build_sae, config_from_dict

        d_out = meta.get("d_out")
        sae = build_sae(config_from_dict(meta["config"]), int(meta["d_in"]),
                        None if d_out is None else int(d_out))
        weights = sae.upgrade_weights(load_file(folder / WEIGHTS_FILE))
        missing = sorted(set(sae.state_dict()) - set(SCALES) - set(weights))
        if missing:
            raise ValueError(f"{folder / WEIGHTS_FILE} lacks {missing} for a {meta['architecture']} SAE")
        scales = {"input_scale": meta["input_scale"], "target_scale": meta.get("target_scale")}
        sae.load_state_dict({**weights, **{k: torch.tensor(float(v)) for k, v in scales.items()
                                           if k in sae.state_dict()}})
        sae.metadata = meta.get("metadata", {})
        return sae.to(device).eval()
