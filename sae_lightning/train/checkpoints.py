"""Checkpoints: written atomically and with a digest, checked before use, and found again for resumes.

Why our own writer: Lightning's ``TorchCheckpointIO`` stages the file with ``tempfile.mkstemp()`` in the
system temp dir and then ``shutil.move``s it; when ``/tmp`` is another filesystem than the run dir (the
usual case on clusters) the move is a copy, so a SIGKILL during it leaves a truncated ``last.ckpt``, and
nothing is fsynced. Here a checkpoint is written beside its final name, fsynced, and renamed over it, so
readers see the old file or the new one, never half of one. Each checkpoint also carries a SHA-256 of its
tensors: torch's zip reader catches truncation but loads flipped bytes inside a tensor silently.

Resuming (``ckpt_path``):
- ``last``: continue the newest checkpoint of a run with the same config (every key but ``ckpt_path``),
  searched in this run's directory first, then in every run directory under the experiment's output root
  (the fixed part of Hydra's ``hydra.run.dir``/``hydra.sweep.dir``, e.g. ``outputs/train``). It is an
  error when there is none.
- ``auto``: the same, but start afresh when there is none (for job scripts that a cluster re-queues).
- a ``.ckpt`` file, or a run directory (its ``checkpoints/last.ckpt``): exactly that checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sae_lightning.checks import UserError
from sae_lightning.io import atomic_write, atomic_write_json
from sae_lightning.train.module import SAEModule
from sae_lightning.train.step import NonFiniteError

log = logging.getLogger(__name__)

RESUME_KEY_FILE = "resume_key.json"
DIGEST_KEY = "sae_lightning_tensor_sha256"
_NOT_IN_FINGERPRINT = ("ckpt_path", "evaluate")  # where to resume from; what runs after
_SKIP_DIRS = {"checkpoints", "wandb", "csv", ".hydra"}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written, found or used; the message names the file and what to do."""


# ----- writing ------------------------------------------------------------------------------------------
def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts/lists, in a deterministic order."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def tensor_digest(checkpoint: dict[str, Any]) -> str:
    """SHA-256 over the bytes of the weights and optimizer state (what silent corruption would change)."""
    h = hashlib.sha256()
    for t in _tensors({k: checkpoint.get(k) for k in ("state_dict", "optimizer_states")}):
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # hashed in place
    return h.hexdigest()


def non_finite_weights(state_dict: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf."""
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    On a write error (disk full, quota, permissions) the temporary file is removed and the previous file at
    ``path`` is untouched.
    """
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except OSError as err:
        kept = f"the previous {path.name} is kept" if path.exists() else "no earlier file was touched"
        raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err} ({kept}). Free disk "
                              "space or make the directory writable, or choose another output directory "
                              "with hydra.run.dir=<dir>") from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that refuses non-finite weights and writes atomically with a tensor digest."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        bad = non_finite_weights(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteError(
                f"Non-finite weights at step {checkpoint.get('global_step')}: {', '.join(bad)} hold NaN/Inf. "
                f"Training stopped without writing {path.name}; the last good checkpoint in {path.parent} is "
                "kept. Lower lr or enable optim.grad_clip, then resume or restart")
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint[DIGEST_KEY] = tensor_digest(checkpoint)
        atomic_torch_save(checkpoint, path)


# ----- reading and validating ---------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint on the CPU, checking it is complete, untampered and finite.

    Raises ``CheckpointError`` naming the file and what to do instead.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist. Give an existing .ckpt file "
                              "(runs keep theirs in <run dir>/checkpoints/)")
    what_to_do = (f"Delete it and resume from an earlier checkpoint of that run (ls {path.parent}/*.ckpt), "
                  "or train afresh without ckpt_path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise CheckpointError(f"checkpoint {path} is corrupted ({err}). {what_to_do}") from None
        raise CheckpointError(f"{path} holds Python objects beyond plain tensors and values, so it was not "
                              "written by sae-lightning's train.py and is not loaded (weights_only=True). "
                              "Give a .ckpt written by train.py") from None
    except PermissionError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror}. Make it readable") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({path.stat().st_size} bytes; "
                              f"{first_line}). {what_to_do}") from None
    if not isinstance(ckpt, dict) or not {"state_dict", "hyper_parameters"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not an sae-lightning training checkpoint (no state_dict/"
                              "hyper_parameters). Give a .ckpt written by train.py")
    if DIGEST_KEY in ckpt and ckpt[DIGEST_KEY] != tensor_digest(ckpt):
        raise CheckpointError(f"checkpoint {path} is corrupted: its tensors fail their SHA-256 digest. "
                              f"{what_to_do}")
    bad = non_finite_weights(ckpt["state_dict"])
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights ({', '.join(bad)}). {what_to_do}")
    return ckpt


def shape_mismatches(ckpt_state: dict[str, Any], model_state: dict[str, Any]) -> list[str]:
    """``name: checkpoint shape vs expected shape`` for every tensor that differs or is missing."""
    out = []
    for name, t in model_state.items():
        got = ckpt_state.get(name)
        if got is None:
            out.append(f"{name}: missing (expected {tuple(t.shape)})")
        elif tuple(got.shape) != tuple(t.shape):
            out.append(f"{name}: {tuple(got.shape)} in the checkpoint, {tuple(t.shape)} expected")
    return out


def check_resumable(path: Path, module: SAEModule) -> None:
    """Refuse to resume a checkpoint whose SAE has another shape than the one this config builds
    (memory-mapped: only the shapes are read)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    bad = shape_mismatches(ckpt["state_dict"], module.state_dict())
    if bad:
        old = ckpt["hyper_parameters"]
        raise CheckpointError(
            f"checkpoint {path} holds an SAE of another shape than this config builds (checkpoint d_in="
            f"{old.get('d_in')}, architecture={old.get('config', {}).get('sae', {}).get('architecture')}; "
            f"this run d_in={module.sae.d_in}, d_sae={module.sae.d_sae}): {'; '.join(bad[:4])}. Resume with "
            "the config that checkpoint was trained with, or train afresh without ckpt_path")


def load_sae_checkpoint(path: str | Path, expected_d_in: int | None = None) -> SAEModule:
    """Load a trained ``SAEModule`` (CPU, eval mode) from a checkpoint, validated first.

    ``expected_d_in`` is the width of the activations it will be applied to; a mismatch (a checkpoint of
    another hook, layer or model) raises ``CheckpointError`` naming both widths.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    if hp.get("config", {}).get("clt"):
        raise CheckpointError(f"checkpoint {path} is a cross-layer transcoder's (clt=true), not one SAE's: "
                              "load it with sae_lightning.circuits.clt.load_clt(<run>/clt) "
                              "(docs/cross-layer-transcoders.md)")
    d_in = int(hp["d_in"])
    if expected_d_in is not None and d_in != expected_d_in:
        cfg = hp.get("config", {})
        raise CheckpointError(
            f"checkpoint {path} holds an SAE for d_in={d_in} activations (model "
            f"{cfg.get('model', {}).get('name')}, hook {cfg.get('hook', {}).get('name')}, layer "
            f"{cfg.get('layer')}), but the activations to evaluate have d={expected_d_in}. Evaluate it on "
            "the activations it was trained on, or give the checkpoint trained for these")
    module = SAEModule(hp["config"], d_in=d_in, d_out=hp.get("d_out"))
    bad = shape_mismatches(ckpt["state_dict"], module.state_dict())
    if bad:
        raise CheckpointError(f"checkpoint {path} does not match the SAE its own config describes: "
                              f"{'; '.join(bad[:4])}. It was edited or written by another version")
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


# ----- finding the checkpoint to resume -----------------------------------------------------------------
def config_fingerprint(config: dict[str, Any]) -> str:
    """Hash of the resolved config minus the keys that do not change what is trained (where to resume from,
    the evaluation after training)."""
    kept = {k: v for k, v in config.items() if k not in _NOT_IN_FINGERPRINT}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def mark_run_dir(resume_key: Path, fingerprint: str) -> None:
    """Record the config fingerprint in the run's ``resume_key.json`` so ``ckpt_path=last`` can find it."""
    atomic_write_json(resume_key, {"config_fingerprint": fingerprint})


def _fingerprint_of(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / RESUME_KEY_FILE).read_text()).get("config_fingerprint")
    except (OSError, ValueError):
        return None


def _runs_with(root: Path, fingerprint: str) -> Iterator[Path]:
    """Run directories under ``root`` whose recorded fingerprint is ``fingerprint``."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        if RESUME_KEY_FILE in filenames and _fingerprint_of(Path(dirpath)) == fingerprint:
            yield Path(dirpath)


def _checkpoints_newest_first(run_dirs: list[Path]) -> list[Path]:
    files = [f for d in run_dirs for f in (d / "checkpoints").glob("*.ckpt") if f.is_file()]
    return sorted(files, key=lambda f: (f.stat().st_mtime_ns, f.name == "last.ckpt"), reverse=True)


def find_resume_checkpoint(run_dir: Path, search_root: Path, fingerprint: str) -> Path | None:
    """Newest valid checkpoint of this run dir, else of the runs with this fingerprint under ``search_root``.

    A checkpoint that fails validation (corrupted on disk) is skipped with a warning, so the run falls
    back to the previous one.
    """
    for group in ([run_dir], [d for d in _runs_with(search_root, fingerprint) if d != run_dir]):
        for path in _checkpoints_newest_first(group):
            try:
                read_checkpoint(path)
            except CheckpointError as err:
                log.warning("Skipping unusable checkpoint: %s", err)
                continue
            return path
    return None


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path, search_root: Path,
                      fingerprint: str) -> Path | None:
    """The checkpoint file to resume from (validated), or None to train afresh. See the module docstring."""
    if ckpt_path is None:
        return None
    if ckpt_path in ("last", "auto"):
        found = find_resume_checkpoint(run_dir, search_root, fingerprint)
        if found is None and ckpt_path == "last":
            raise CheckpointError(
                f"ckpt_path=last: no checkpoint of a run with this config under {search_root} (config "
                f"fingerprint {fingerprint}; a run matches only when every other key is the same). Pass "
                "ckpt_path=<file.ckpt or run dir>, or ckpt_path=auto to start afresh when there is none")
        return found
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path / "last.ckpt"
    read_checkpoint(path)
    return path
