"""The one datamodule of a group: every hook its members read, from one LM forward or one cache build.

Batches are tuples of aligned rows, one per hook (a single tensor when there is one hook); a member reads
its input (and a transcoder's target) at its :func:`slots`. The stream itself (order, shuffling, resume,
DDP sharding) is the single-run stream of the first member's config, so a member trained in a group sees
exactly the rows it would see alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import LightningDataModule
from torch import Tensor

from sae_lightning.checks import ConfigError
from sae_lightning.group.members import Member


def group_hooks(members: list[Member]) -> list[tuple[int, str]]:
    """(layer, name) of every hook the members read, each once, in first-use order."""
    return list(dict.fromkeys(h for m in members for h in m.hooks))


def slots(member: Member, hooks: list[tuple[int, str]]) -> tuple[int, int | None]:
    """Where a member's input (and a transcoder's target) are in a batch of the group's ``hooks``."""
    own = member.hooks
    return hooks.index(own[0]), (hooks.index(own[1]) if len(own) > 1 else None)


def as_slots(batch: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A batch as the list of its hooks' rows."""
    return [batch] if isinstance(batch, Tensor) else list(batch)


def group_datamodule(members: list[Member]) -> tuple[LightningDataModule, list[tuple[int, str]]]:
    """The datamodule serving every member's hooks, and those hooks in batch order.

    ``activations=live`` reads them all in one truncated forward; the cache (``activations=lm``) opens one
    cache per hook, building the missing ones in one LM pass; an imported array or synthetic rows are one
    stream, which every member reads whatever its hook.
    """
    cfg = members[0].cfg
    source = cfg.activations.source
    if source == "live":
        from sae_lightning.live import LiveDataModule

        hooks = group_hooks(members)
        return LiveDataModule(cfg, hooks=hooks), hooks
    from sae_lightning.cache.datamodule import ActivationDataModule

    if source != "lm":
        if any(m.cfg.target_hook is not None for m in members):
            raise ConfigError(f"activations.source={source}: transcoders need activations=lm or live")
        return ActivationDataModule.from_config(cfg), [members[0].hooks[0]]
    from sae_lightning.cache import ensure_cache

    hooks = group_hooks(members)
    caches = ensure_cache(cfg, hooks)
    dm = ActivationDataModule(caches[0], cfg.activations, cfg.batch_size, cfg.seed, extra=caches[1:])
    return dm, hooks


def member_slots(members: list[Member], hooks: list[tuple[int, str]]) -> list[tuple[int, int | None]]:
    """Each member's (input slot, target slot); every member reads slot 0 of a one-hook array source."""
    if len(hooks) == 1:
        return [(0, None)] * len(members)
    return [slots(m, hooks) for m in members]
