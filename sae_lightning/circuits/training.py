"""Training a cross-layer transcoder (``clt=true``) with the run machinery of one SAE.

``python train.py experiment=quickstart hook=mlp_in target.name=mlp_out layers=[0,1,2,3] clt=true
sae=jumprelu`` is one run (``training.run_training``: one run folder, checkpoints, loggers, summary,
``ckpt_path=last``) whose datamodule is the group stream (``group/data.py``: the members a
``layers=[...] target.name=...`` run would have give every layer's (input, target) hook pair, read in one
LM forward or one cache build) and whose module is :class:`CLTModule`: ``module.SAEModule`` with the CLT as
its model, so the training step is ``step.train_step`` on batches stacked to ``[B, n_layers, d]``.

Before any work: the config's checks (``config.TrainConfig._check_clt``), every layer's MLP input and
output and its output projection on the model (:func:`check_clt_model`), and the memory the CLT needs
against what the device has (``group.memory.estimate_clt``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from sae_lightning.checks import ConfigError
from sae_lightning.circuits.clt import CrossLayerTranscoder
from sae_lightning.config import TrainConfig
from sae_lightning.group.data import as_slots, group_datamodule, member_slots
from sae_lightning.group.members import members_of_lists
from sae_lightning.group.memory import LIMIT_ENV, GroupMemoryError, estimate_clt, human
from sae_lightning.metrics import ReconstructionStats
from sae_lightning.train.module import SAEModule, merged_over_ranks, val_logs

log = logging.getLogger(__name__)


def check_clt_model(lm: Any, layers: list[int], hook: str, target: str) -> None:
    """ConfigError before any work unless every layer of ``layers`` is in the model and its block has the
    ``hook`` and ``target`` hook points and an MLP whose output comes from a projection (a Linear): what a
    CLT reads, writes and replaces. ``lm`` is a ``HookedLM``."""
    bad = [layer for layer in layers if not 0 <= layer < lm.n_layers]
    if bad:
        raise ConfigError(f"layers={list(layers)}: {bad} beyond the model's depth (n_layers={lm.n_layers}, "
                          f"valid layers 0..{lm.n_layers - 1})")
    problems = []
    for layer in layers:
        layout = lm.layout(layer)
        for name in (hook, target):
            if name not in layout.sites:
                problems.append(f"layer {layer} has no {name} ({layout.missing.get(name, 'not found')})")
        if layout.out_proj is None:
            problems.append(f"layer {layer}'s MLP has no output projection "
                            f"({layout.missing.get('mlp_post', 'no MLP found in the block')})")
    if problems:
        raise ConfigError("clt=true needs an MLP with an output projection in every block of its layers: "
                          + "; ".join(problems) + ". Choose layers whose blocks all have one")


def check_model_before_work(cfg: TrainConfig) -> None:
    """:func:`check_clt_model` on the config's model (loaded on the CPU) for a cache run, before a cache is
    built; a live run's datamodule loads the model itself and is checked with it."""
    from sae_lightning.lm import load_lm

    lm = load_lm(cfg.model, device="cpu")
    check_clt_model(lm, list(cfg.layers), cfg.hook.name, cfg.target.name)


class CLTModule(SAEModule):
    """``SAEModule`` training a cross-layer transcoder: batches of the group stream (``slots``: each
    layer's (input, target) position in the batch tuple) stacked into ``[B, n_layers, d]``, per-layer
    validation numbers."""

    def __init__(self, config: dict[str, Any], d_in: int, d_out: int, slots: list[list[int]]) -> None:
        self.x_slots = [int(x) for x, _ in slots]
        self.y_slots = [int(y) for _, y in slots]
        super().__init__(config, d_in, d_out)

    def build_model(self, cfg: TrainConfig, d_in: int, d_out: int | None) -> CrossLayerTranscoder:
        assert d_out is not None
        return CrossLayerTranscoder(cfg.sae, list(cfg.layers), d_in, d_out)

    def split(self, batch: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        rows = as_slots(batch)
        return (torch.stack([rows[s] for s in self.x_slots], 1),
                torch.stack([rows[s] for s in self.y_slots], 1))

    def sample_rows(self, dm: Any, n: int) -> tuple[Tensor, Tensor]:
        return self.split(dm.sample_slots(n))

    def new_val_stats(self) -> list[ReconstructionStats]:  # type: ignore[override]
        return [ReconstructionStats(self.cfg.latents.dense_threshold) for _ in self.sae.layers]

    @torch.no_grad()
    def update_val_stats(self, stats: list[ReconstructionStats], x: Tensor,  # type: ignore[override]
                         target: Tensor | None) -> None:
        """Each layer's reconstruction (from the latents of every layer up to it) against its target; the
        latent numbers (L0, dead) of a layer are those of its own dictionary."""
        clt, latents = self.sae, {}
        for j, layer in enumerate(clt.layers):
            latents[layer] = clt.encode(layer, x[:, j])
            stats[j].update(target[:, j], clt.decode(layer, latents, x[:, j]), latents[layer])

    def on_validation_epoch_end(self) -> None:
        """``val/layer<L>/<key>`` per layer; ``val/nmse``, ``val/explained_variance``, ``val/mse`` and
        ``val/cosine_sim`` their means over layers; ``val/l0`` the total over layers; ``val/dead_fraction``
        over every latent."""
        per_layer = []
        for layer, stats in zip(self.sae.layers, self._val_stats, strict=True):
            merged = merged_over_ranks(stats, self.trainer.world_size, self.cfg.latents.dense_threshold)
            per_layer.append((layer, val_logs(merged)))
        if not per_layer or not per_layer[0][1]:
            return
        logs = {f"val/layer{layer}/{k[4:]}": v for layer, values in per_layer for k, v in values.items()}
        n = len(per_layer)
        for key in ("nmse", "explained_variance", "mse", "cosine_sim"):
            logs[f"val/{key}"] = sum(values[f"val/{key}"] for _, values in per_layer) / n
        logs["val/l0"] = sum(values["val/l0"] for _, values in per_layer)
        logs["val/dead_fraction"] = sum(values["val/dead_fraction"] for _, values in per_layer) / n
        self.log_dict(logs)


def build_clt_module(cfg: TrainConfig, config: dict[str, Any]) -> tuple[L.LightningDataModule, CLTModule]:
    """The group stream of every layer's (input, target) pair and the CLT module, scales set, after the
    checks before work (module docstring)."""
    members = members_of_lists({**config, "clt": False}, Path())  # their hooks only: no folder is written
    if cfg.activations.source == "lm":
        check_model_before_work(cfg)
    dm, hooks = group_datamodule(members)
    if getattr(dm, "lm", None) is not None:
        check_clt_model(dm.lm, list(cfg.layers), cfg.hook.name, cfg.target.name)
    slots = member_slots(members, hooks)
    d_in, d_out = dm.slot_dims[slots[0][0]], dm.slot_dims[slots[0][1]]
    widths = {(dm.slot_dims[x], dm.slot_dims[y]) for x, y in slots}
    if len(widths) > 1:
        raise ConfigError(f"clt=true: the layers' hooks have different widths {sorted(widths)}; a CLT needs "
                          "one input and one target width")
    check_clt_memory(cfg, d_in, d_out, list(dm.slot_dims), getattr(dm, "lm", None))
    module = CLTModule(config, d_in, d_out, [[x, y] for x, y in slots])
    scales = dm.slot_norm_scales
    module.sae.set_scales([scales[x] for x, _ in slots], [scales[y] for _, y in slots])
    return dm, module


def check_clt_memory(cfg: TrainConfig, d_in: int, d_out: int, dims: list[int], lm: Any) -> None:
    """Refuse a CLT whose training does not fit the device's available memory (``GroupMemoryError``)."""
    from sae_lightning.group.run import training_device

    estimate = estimate_clt(cfg, d_in, d_out, dims, training_device(cfg), None if lm is None else lm.model)
    log.info("Memory: the CLT needs about %s of %s available on %s", human(estimate.total),
             human(estimate.available), estimate.device)
    if estimate.total > estimate.available:
        raise GroupMemoryError(
            f"the CLT over {len(cfg.layers)} layers needs about {human(estimate.total)} on {estimate.device} "
            f"but {human(estimate.available)} is available ({human(estimate.members[0])} for the CLT: its "
            "decoders grow with the square of the number of layers, docs/cross-layer-transcoders.md; "
            f"{human(estimate.shared)} for the stream and the LM). Train its weights in bf16 "
            "(trainer.precision=bf16-true halves its state), or lower sae.dict_mult / sae.d_sae, batch_size "
            f"or the number of layers (set {LIMIT_ENV}=<bytes> if the available memory is misread)")
