"""``hydra/launcher=grouped`` (sae_lightning/group/launcher.py). Hydra instantiates a plugin only from a class
defined in the ``hydra_plugins`` namespace package, so the class it builds is defined here."""

from sae_lightning.group import launcher


class GroupedLauncher(launcher.GroupedLauncher):
    """The jobs of a sweep that share an activation stream trained in one process."""
