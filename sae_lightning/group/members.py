"""The members of a group: each one SAE with its own run folder and its own single-run config.

A member's config is exactly what ``python train.py`` would train alone (``layers``/``hooks`` cleared), so
its folder is an ordinary run folder: ``evaluate.py``, ``compare`` and the SAELens export read it as one.
What members must share is the stream: every key outside :data:`PER_SAE_KEYS` (model, text, activation
source, batch size, token budget, seed, trainer, resume). The hooks (``layer``, ``hook``, ``target``) may
differ: one LM forward, or one cache build, reads them all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sae_lightning.checks import ConfigError
from sae_lightning.config import ALL_LAYERS, TrainConfig, train_config_from_dict

PER_SAE_KEYS = frozenset({"sae", "l1", "lr", "optim", "latents", "callbacks", "objective", "evaluate",
                          "logger", "run_name", "sae_seed", "layer", "hook", "target", "layers", "hooks"})
"""Root keys that may differ between the members of a group; every other key defines the stream."""


@dataclass
class Member:
    """One SAE of a group: ``name`` prefixes its log lines and metric keys, ``run_dir`` is its own run
    folder, ``config`` its resolved single-run config, ``overrides`` the job's command-line overrides."""

    name: str
    run_dir: Path
    config: dict[str, Any]
    overrides: list[str] = field(default_factory=list)

    @cached_property
    def cfg(self) -> TrainConfig:
        return train_config_from_dict(self.config)

    @property
    def hooks(self) -> list[tuple[int, str]]:
        """(layer, name) of the hooks this member reads: its input, then a transcoder's target."""
        cfg = self.cfg
        return [(cfg.layer, cfg.hook.name), *([] if cfg.target_hook is None else [cfg.target_hook])]


def stream_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that defines the activation stream."""
    return {k: v for k, v in config.items() if k not in PER_SAE_KEYS}


def stream_key(config: dict[str, Any]) -> str:
    """Equal for two configs exactly when their SAEs can train from one stream."""
    return json.dumps(stream_config(config), sort_keys=True, default=str)


def stream_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two stream configs."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += stream_differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def folder_name(layer: int, hook: str) -> str:
    """``layer6_mlp_post``; a module hook's dotted path made safe for a folder name."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", f"layer{layer}_{hook}").strip("-")


def resolve_layers(config: dict[str, Any]) -> list[int]:
    """The layers of a ``layers``/``hooks`` run: its list, every block of the model for ``layers=all`` (read
    from the model's config, no weights), or the root ``layer``."""
    layers = config.get("layers")
    if layers == ALL_LAYERS:
        from sae_lightning.lm import model_depth

        return list(range(model_depth(train_config_from_dict(config).model)))
    return list(layers or [config["layer"]])


def members_of_lists(config: dict[str, Any], run_dir: Path) -> list[Member]:
    """The members of a ``layers=[...]``/``layers=all``/``hooks=[...]`` run: one SAE per (layer, hook), in
    that order, each in ``run_dir/<layer><L>_<hook>``."""
    layers = resolve_layers(config)
    hooks = config.get("hooks") or [None]   # None: the config's own hook (a module hook stays one)
    members = []
    for layer in layers:
        for hook in hooks:
            own_hook = config["hook"] if hook is None else {**config["hook"], "name": hook, "module": None}
            own = {**config, "layer": layer, "layers": None, "hooks": None, "hook": own_hook}
            name = folder_name(layer, hook or train_config_from_dict(own).hook.name)
            members.append(Member(name, run_dir / name, own))
    return members


def check_members(members: list[Member]) -> None:
    """Refuse a group before any work: no members, two with the same name or folder, or a member whose
    stream differs from the first's (naming the keys)."""
    if not members:
        raise ConfigError("a group needs at least one SAE")
    for what, values in (("name", [m.name for m in members]),
                         ("folder", [str(Path(m.run_dir).resolve()) for m in members])):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"two SAEs of the group have the same {what} ({', '.join(repeated)}): each "
                              "needs its own; remove the repeated entry of layers/hooks or give each job its "
                              "own hydra.sweep.subdir")
    first = stream_config(members[0].config)
    for m in members[1:]:
        differ = stream_differences(first, stream_config(m.config))
        if differ:
            raise ConfigError(f"{m.name} cannot share the activation stream of {members[0].name}: "
                              f"{', '.join(differ)} differ(s), and these keys define the stream (model, "
                              "text, activations, batch_size, train_tokens, seed, trainer, ckpt_path). Sweep "
                              "them in separate groups (hydra/launcher=grouped splits them) or fix them")
    for m in members:
        _ = m.cfg  # every member's own range checks, before any work
