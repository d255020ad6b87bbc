"""What a run prints: every log message once, none of the library notices a user did not ask for, and a
user's mistake as a message, not a traceback.

- Lightning's ``import lightning`` gives the ``lightning`` logger a console handler of its own while the
  logger still propagates to the root, where Hydra's handler prints it again (``INFO: ...`` and
  ``[time][lightning...][INFO] - ...``); submitit's logger (a job under ``hydra/launcher=slurm``) does the
  same. Under Hydra (the root logger has handlers) their own handlers are removed, so their messages go
  through Hydra's console and ``train.log`` only.
- Lightning's advertising tips (``litlogger``/``litmodels``) are dropped.
- torch 2.13 deprecates ``isinstance(treespec, LeafSpec)``, which Lightning 2.6's ``_pytree`` still uses:
  that one warning is ignored; it says nothing about this project's code.

- A ``UserError`` (``sae_lightning.checks``: a bad config value, a missing file, an unusable checkpoint or
  cache, an unavailable model) ends ``train.py``, ``evaluate.py`` or ``python -m sae_lightning.cache`` with
  ``Error: <message>`` on stderr and exit status 1, instead of Hydra's traceback ending in that message; the
  line also goes to the run's log file. ``HYDRA_FULL_ERROR=1`` shows the traceback, as for any Hydra error.
  In a multirun the error is left to the sweep (``sae_lightning.sweep.multirun`` records the failed job).

Our own notices are fixed where they arise instead: checkpoints are saved with an explicit
``weights_only=False`` (full training state, still loadable with ``torch.load(weights_only=True)``) and the
W&B logger does not pass wandb's deprecated ``anonymous`` setting (``sae_lightning.train.loggers``).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sae_lightning.checks import UserError

T = TypeVar("T")

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


@contextmanager
def user_errors_as_messages(*also: type[Exception]) -> Iterator[None]:
    """Turn a ``UserError`` (or one of ``also``) raised inside into ``Error: <message>`` on stderr and
    ``SystemExit(1)``, unless ``HYDRA_FULL_ERROR=1`` asks for the traceback. For one of ``also`` (e.g.
    Hydra's override errors) the message of its cause follows, as Hydra prints it."""
    try:
        yield
    except (UserError, *also) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = f"Error: {err}"
        if not isinstance(err, UserError) and err.__cause__ is not None:
            message += f"\n{err.__cause__}"
        _to_log_files(message)
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def report_user_errors(task: Callable[..., T]) -> Callable[..., T]:
    """Decorate a ``@hydra.main`` task function (below ``@hydra.main``) so that a single run ends on a
    ``UserError`` with its message alone (``user_errors_as_messages``); a multirun job's error goes on to
    Hydra and the sweep unchanged, so the other jobs still run."""
    from sae_lightning.sweep.multirun import is_multirun

    @functools.wraps(task)
    def run(*args: object, **kwargs: object) -> T:
        if is_multirun():
            return task(*args, **kwargs)
        with user_errors_as_messages():
            return task(*args, **kwargs)

    return run


def _to_log_files(message: str) -> None:
    """Write ``message`` (as an ERROR record) to the root logger's file handlers: the run's ``train.log``
    under Hydra, so the log of a failed run says why it stopped; the console gets it from the caller."""
    record = logging.LogRecord("sae_lightning", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
