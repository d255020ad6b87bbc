"""Replacement-model evaluation: the LM with its MLPs' outputs written by transcoders.

A set of transcoders (per-layer transcoders, :class:`PLTSet`, or a cross-layer transcoder: anything with
the :class:`Transcoders` interface) replaces the MLP of each of its layers. The replaced forward goes layer
by layer: at each replaced layer it reads ``mlp_in`` (as the forward computes it, after the earlier
replacements), encodes it, keeps the latents, and writes ``decode(layer, latents so far, mlp_in)`` as the
MLP's output (``mlp_out``). Over held-out contexts :func:`replacement_metrics` reports, for every layer
replaced at once (``replacement/``) and for each layer replaced alone (``alone/layer<L>/``):

- ``ce_loss_recovered`` (``metrics.ce_loss_recovered``) with the clean LM loss and the loss with the same
  MLPs' outputs zero-ablated; ``kl_div`` (clean -> replaced) and ``kl_div_score`` against the zero-ablated;
- per replaced layer ``nmse`` and ``l0`` (``metrics.ReconstructionStats``): the transcoder's output against
  the true MLP output *of the same forward* (the MLP applied to the replaced forward's ``mlp_in``), and
  the number of active latents it encoded there; ``l0_total`` sums them over the layers.

Excluded positions (BOS and other special tokens, as in ``downstream.py``) keep the true MLP output, are
not counted in the reconstruction numbers, and the predictions made at them are not counted.
A transcoder of a layer replaced alone still encodes every layer of the set up to it (a cross-layer
transcoder's output at layer ``L`` reads the latents of every layer ``<= L``); only ``L``'s output is written.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from sae_lightning.checks import ConfigError, MissingFileError
from sae_lightning.config import TrainConfig, train_config_from_dict
from sae_lightning.evaluate.downstream import ExcludeMask, HookedLMLike, excluded_positions
from sae_lightning.metrics import (
    ReconstructionStats,
    ce_loss_recovered,
    kl_div_score,
    next_token_kl,
    next_token_loss,
)
from sae_lightning.saes import SAE

REPLACED_INPUT, REPLACED_OUTPUT = "mlp_in", "mlp_out"  # what a transcoder of an MLP reads and writes
SCORES = ("ce_loss_recovered", "kl_div", "kl_div_score")  # the numbers of each replacement, in the table
TABLE_NOTE = (
    "all at once: every listed MLP's output written by its transcoder in one forward (each layer's rows: "
    "its NMSE against the true MLP output of that forward, its L0; the L0 of the first row is their sum). "
    "alone: only that layer's MLP replaced. CE loss recovered = (L_zero - L_replaced) / (L_zero - L_clean), "
    "L_zero with the same MLPs' outputs zero-ablated; KL div = KL(clean || replaced) per predicted token, "
    "in nats; KL div score = 1 - KL div / KL(clean || zero-ablated).")


class NotMLPTranscoders(ConfigError):
    """A group whose members are not transcoders of their own layers' MLPs (``mlp_in -> mlp_out``)."""


@runtime_checkable
class Transcoders(Protocol):
    """What replaces the MLPs of ``layers`` (ascending). ``encode``: raw float32 ``mlp_in [N, d_model]`` of
    ``layer`` -> latents ``[N, d_sae]``. ``decode``: raw ``mlp_out`` prediction ``[N, d_model]`` at ``layer``
    from the latents of the source layers ``<= layer`` (a per-layer transcoder reads only
    ``latents[layer]``, a cross-layer one sums over them); ``mlp_in`` is ``layer``'s raw input (for a skip
    connection)."""

    layers: list[int]

    def encode(self, layer: int, mlp_in: Tensor) -> Tensor: ...

    def decode(self, layer: int, latents: dict[int, Tensor], mlp_in: Tensor) -> Tensor: ...


class PLTSet:
    """Per-layer transcoders as :class:`Transcoders`: the SAE of each layer, a transcoder from that layer's
    ``mlp_in`` to its ``mlp_out`` (``SAE.encode``/``SAE.decode`` take and give raw activations)."""

    def __init__(self, saes: Mapping[int, SAE]) -> None:
        if not saes:
            raise ConfigError("a set of per-layer transcoders needs at least one layer")
        self.saes = {layer: saes[layer] for layer in sorted(saes)}
        self.layers = list(self.saes)

    def encode(self, layer: int, mlp_in: Tensor) -> Tensor:
        return self.saes[layer].encode(mlp_in)

    def decode(self, layer: int, latents: dict[int, Tensor], mlp_in: Tensor) -> Tensor:
        return self.saes[layer].decode(latents[layer], mlp_in)

    def to(self, device: torch.device | str) -> PLTSet:
        for sae in self.saes.values():
            sae.to(device)
        return self

    @classmethod
    def from_group(cls, group_dir: str | Path) -> tuple[PLTSet, TrainConfig]:
        """The set trained by a ``layers=[...] hook=mlp_in target.name=mlp_out`` run (its folder holds
        ``group.json``), each member's ``sae/`` folder, and the first member's config (the stream they
        share). ConfigError when a member is not an ``mlp_in -> mlp_out`` transcoder at its own layer, two
        members share a layer, the members read different models, or a member has no trained SAE."""
        folders = group_members(group_dir)
        saes: dict[int, SAE] = {}
        configs: list[TrainConfig] = []
        for name, folder in folders:
            if not (folder / "sae" / "cfg.json").is_file():
                raise MissingFileError(f"{name} of the group {group_dir} has no trained transcoder "
                                       f"({folder / 'sae'} is missing: did it fail or not finish?)")
            sae = SAE.load(folder / "sae")
            cfg = train_config_from_dict(sae.metadata["train_config"])
            reads = f"{cfg.hook.name} -> {cfg.target_hook[1] if cfg.target_hook else 'itself'}"
            if not sae.transcoder or cfg.hook.name != REPLACED_INPUT or \
                    cfg.target_hook != (cfg.layer, REPLACED_OUTPUT):
                raise NotMLPTranscoders(f"{name} of the group {group_dir} is not a transcoder of its layer's "
                                        f"MLP (it reads {reads} at layer {cfg.layer}); a replacement model "
                                        "needs hook=mlp_in target.name=mlp_out")
            if cfg.layer in saes:
                raise ConfigError(f"two members of the group {group_dir} replace layer {cfg.layer}'s MLP")
            if configs and cfg.model != configs[0].model:
                raise ConfigError(f"{name} of the group {group_dir} reads another model than {folders[0][0]}")
            saes[cfg.layer] = sae
            configs.append(cfg)
        return cls(saes), configs[0]


def group_members(group_dir: str | Path) -> list[tuple[str, Path]]:
    """(name, run folder) of every member listed in a group folder's ``group.json``; a member folder moved
    together with the group folder is found beside ``group.json``."""
    from sae_lightning.group.run import GROUP_FILE

    path = Path(group_dir) / GROUP_FILE
    if not path.is_file():
        raise MissingFileError(f"{group_dir} is not a group folder (no {GROUP_FILE}): give the folder of a "
                               "layers=[...] run")
    members = []
    for entry in json.loads(path.read_text())["members"]:
        folder = Path(entry["run_dir"])
        if not folder.is_dir() and (Path(group_dir) / entry["name"]).is_dir():
            folder = Path(group_dir) / entry["name"]
        members.append((entry["name"], folder))
    return members


def check_replaceable(lm: Any, layers: Sequence[int]) -> None:
    """Before any work: ``layers`` ascending without repeats, each a block of ``lm`` whose MLP has an input
    and an output projection writing ``mlp_out`` (found on the probe forward); ConfigError or LayoutError
    naming the layer otherwise."""
    from sae_lightning.lm import LayoutError

    layers = list(layers)
    if not layers or layers != sorted(set(layers)):
        raise ConfigError(f"replaced layers {layers}: give at least one layer, ascending, without repeats")
    out_of_range = [layer for layer in layers if not 0 <= layer < lm.n_layers]
    if out_of_range:
        raise ConfigError(f"layers {out_of_range} are beyond the model's depth: it has "
                          f"n_layers={lm.n_layers} (valid layers 0..{lm.n_layers - 1})")
    for layer in layers:
        layout = lm.layout(layer)
        missing = [h for h in (REPLACED_INPUT, REPLACED_OUTPUT) if h not in layout.sites]
        if missing or layout.out_proj is None:
            why = "; ".join(layout.missing.get(h, "") for h in missing) or "no output projection was found"
            raise LayoutError(f"layer {layer} of this {lm.family!r} model ({layout.path}) has no MLP with an "
                              f"output projection to replace: {why}. Transcoders replace MLPs "
                              f"({REPLACED_INPUT} -> {REPLACED_OUTPUT}); leave this layer out")


class _ReplacedForward:
    """The splices of one replaced forward: ``encoded`` layers read ``mlp_in`` and keep its latents,
    ``written`` layers have ``mlp_out`` replaced by the decode; ``stats`` (one per written layer) get the
    decode against the true output at the counted positions. ``excluded`` ``[B, T]`` is set per batch."""

    def __init__(self, transcoders: Transcoders, written: Sequence[int],
                 stats: dict[int, ReconstructionStats]) -> None:
        from sae_lightning.lm import HookPoint

        self.transcoders, self.written, self.stats = transcoders, list(written), stats
        encoded = [layer for layer in transcoders.layers if layer <= max(written)]
        self.excluded: Tensor | None = None
        self.latents: dict[int, Tensor] = {}
        self.inputs: dict[int, Tensor] = {}
        self.splices = {HookPoint(layer, REPLACED_INPUT): self._reader(layer) for layer in encoded}
        self.splices |= {HookPoint(layer, REPLACED_OUTPUT): self._writer(layer) for layer in self.written}

    def start(self, excluded: Tensor) -> dict:
        self.excluded, self.latents, self.inputs = excluded, {}, {}
        return self.splices

    def _reader(self, layer: int):
        def read(mlp_in: Tensor) -> Tensor:
            rows = mlp_in.reshape(-1, mlp_in.shape[-1]).float()
            self.inputs[layer] = rows
            self.latents[layer] = self.transcoders.encode(layer, rows)
            return mlp_in
        return read

    def _writer(self, layer: int):
        def write(mlp_out: Tensor) -> Tensor:
            decoded = self.transcoders.decode(layer, self.latents, self.inputs[layer]).reshape(mlp_out.shape)
            kept = ~self.excluded
            self.stats[layer].update(mlp_out[kept], decoded[kept],
                                     self.latents[layer].reshape(*kept.shape, -1)[kept])
            return torch.where(kept[..., None], decoded.to(mlp_out.dtype), mlp_out)
        return write


def _zeroing(layers: Sequence[int], excluded: Tensor) -> dict:
    from sae_lightning.lm import HookPoint

    def zero(x: Tensor) -> Tensor:
        return torch.where(excluded[..., None], x, 0.0)

    return dict.fromkeys((HookPoint(layer, REPLACED_OUTPUT) for layer in layers), zero)


@torch.inference_mode()
def replacement_metrics(lm: HookedLMLike, token_batches: Sequence[Tensor], transcoders: Transcoders,
                        exclude: ExcludeMask | None = None, alone: bool = True) -> dict[str, float]:
    """Every layer of ``transcoders`` replaced at once (``replacement/<key>``) and, with ``alone``, each
    layer replaced alone (``alone/layer<L>/<key>``), over ``token_batches`` (``[B, T]`` each); module
    docstring. Keys: ``ce_loss_{clean,replaced,zero}``, ``ce_loss_recovered``, ``kl_div``, ``kl_div_zero``,
    ``kl_div_score``; all at once also ``layer<L>/nmse``, ``layer<L>/l0`` and ``l0_total`` (their sum),
    alone ``nmse`` and ``l0``; ``n_tokens_downstream``."""
    layers = list(transcoders.layers)
    runs = {"replacement": layers, **({f"alone/layer{layer}": [layer] for layer in layers} if alone else {})}
    stats = {run: {layer: ReconstructionStats() for layer in written} for run, written in runs.items()}
    forwards = {run: _ReplacedForward(transcoders, written, stats[run]) for run, written in runs.items()}
    sums: dict[str, float] = defaultdict(float)
    count = 0
    for tokens in token_batches:
        tokens = tokens.to(lm.device)
        excluded = excluded_positions(tokens, exclude)
        counted = ~excluded[:, :-1]  # position t predicts token t+1
        clean = lm.logits(tokens)
        sums["clean"] += float(next_token_loss(clean, tokens)[counted].sum())
        for run, written in runs.items():
            for kind, replace in (("replaced", forwards[run].start(excluded)),
                                  ("zero", _zeroing(written, excluded))):
                logits = lm.logits(tokens, replace=replace)
                sums[f"{run}/{kind}/ce"] += float(next_token_loss(logits, tokens)[counted].sum())
                sums[f"{run}/{kind}/kl"] += float(next_token_kl(clean, logits)[counted].sum())
        count += int(counted.sum())
    if count == 0:
        raise ValueError("no counted positions: every position is excluded")
    out: dict[str, float] = {}
    for run in runs:
        m = {"ce_loss_clean": sums["clean"] / count, "ce_loss_replaced": sums[f"{run}/replaced/ce"] / count,
             "ce_loss_zero": sums[f"{run}/zero/ce"] / count, "kl_div": sums[f"{run}/replaced/kl"] / count,
             "kl_div_zero": sums[f"{run}/zero/kl"] / count}
        m["ce_loss_recovered"] = ce_loss_recovered(m["ce_loss_clean"], m["ce_loss_replaced"],
                                                   m["ce_loss_zero"])
        m["kl_div_score"] = kl_div_score(m["kl_div"], m["kl_div_zero"])
        numbers = {layer: s.compute() for layer, s in stats[run].items()}
        if run == "replacement":
            for layer, n in numbers.items():
                m[f"layer{layer}/nmse"], m[f"layer{layer}/l0"] = n["nmse"], n["l0"]
            m["l0_total"] = sum(n["l0"] for n in numbers.values())
        else:
            (n,) = numbers.values()
            m["nmse"], m["l0"] = n["nmse"], n["l0"]
        out |= {f"{run}/{k}": v for k, v in m.items()}
    out["n_tokens_downstream"] = count
    return out


def replacement_table(metrics: Mapping[str, float],
                      layers: Sequence[int]) -> tuple[list[str], list[list[Any]]]:
    """The report's table from :func:`replacement_metrics`' numbers: a row for every layer replaced at once,
    one per layer inside that forward, and one per layer replaced alone (when measured)."""
    columns = ["replaced", "layer", "CE loss recovered", "KL div", "KL div score", "L0", "NMSE"]
    nothing = ""
    rows: list[list[Any]] = [["all at once", ", ".join(map(str, layers)),
                              *(metrics[f"replacement/{k}"] for k in SCORES),
                              metrics["replacement/l0_total"], nothing]]
    rows += [["all at once", layer, nothing, nothing, nothing, metrics[f"replacement/layer{layer}/l0"],
              metrics[f"replacement/layer{layer}/nmse"]] for layer in layers]
    rows += [["alone", layer, *(metrics[f"alone/layer{layer}/{k}"] for k in (*SCORES, "l0", "nmse"))]
             for layer in layers if f"alone/layer{layer}/kl_div" in metrics]
    return columns, rows
