"""What a run prints: every log message once, and none of the library notices a user did not ask for.

- Lightning's ``import lightning`` gives the ``lightning`` logger a console handler of its own while the
  logger still propagates to the root, where Hydra's handler prints it again (``INFO: ...`` and
  ``[time][lightning...][INFO] - ...``); submitit's logger (a job under ``hydra/launcher=slurm``) does the
  same. Under Hydra (the root logger has handlers) their own handlers are removed, so their messages go
  through Hydra's console and ``train.log`` only.
- Lightning's advertising tips (``litlogger``/``litmodels``) are dropped.
- torch 2.13 deprecates ``isinstance(treespec, LeafSpec)``, which Lightning 2.6's ``_pytree`` still uses:
  that one warning is ignored; it says nothing about this project's code.

Our own notices are fixed where they arise instead: checkpoints are saved with an explicit
``weights_only=False`` (full training state, still loadable with ``torch.load(weights_only=True)``) and the
W&B logger does not pass wandb's deprecated ``anonymous`` setting (``sae_lightning.loggers``).
"""

from __future__ import annotations

import logging
import warnings

OWN_HANDLER_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "submitit")
TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
TIP_PREFIX = "💡 Tip:"
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(TIP_PREFIX)


def quiet_console() -> None:
    """Print each Lightning message once and drop the library notices above; call it once Hydra has set up
    logging and before training or evaluating (it imports Lightning). Safe to call more than once."""
    warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
    for name in TIP_LOGGERS:
        logger = logging.getLogger(name)
        if _not_a_tip not in logger.filters:
            logger.addFilter(_not_a_tip)
    import lightning  # noqa: F401  (its import attaches the handler removed below)

    if not logging.getLogger().handlers:
        return  # no Hydra (e.g. a library user's script): Lightning's handler is the only one, keep it
    for name in OWN_HANDLER_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True
