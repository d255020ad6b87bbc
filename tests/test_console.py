"""What a user sees on the console: each log message printed once, and no library notice they did not ask
for (Lightning's tips, wandb's `anonymous` deprecation, torch's LeafSpec deprecation, Lightning's
`weights_only` default)."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest

from tests.sweep.test_sweep import SMALL, _array, train_py

HYDRA_LINE = re.compile(r"^\[[\d\- :,]+\]\[([\w.]+)\]\[(\w+)\] - (.*)$")  # [time][logger][LEVEL] - message
BARE_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL): (.*)$")  # Lightning's own handler's format
NOTICES = ("litlogger", "litmodels", "Tip:", "anonymous", "LeafSpec", "weights_only")


def log_messages(text: str) -> list[str]:
    """The message of every line a logging handler printed, whichever handler's format it has."""
    messages = []
    for line in text.splitlines():
        if m := HYDRA_LINE.match(line):
            messages.append(m.group(3))
        elif m := BARE_LINE.match(line):
            messages.append(m.group(2))
    return messages


def test_log_messages_are_parsed_from_both_formats():
    text = ("[2026-12-02 05:10:47,882][lightning.fabric.utilities.seed][INFO] - Seed set to 0\n"
            "INFO: Seed set to 0\nwandb: Tracking run\n")
    assert log_messages(text) == ["Seed set to 0", "Seed set to 0"]


@pytest.mark.slow
def test_a_run_prints_each_message_once_and_no_library_notices(tmp_path: Path):
    """A W&B (offline) run on a tiny array: Lightning's, Hydra's and our messages each appear once, in
    Hydra's format, and also in the run's train.log."""
    x = _array(tmp_path / "x.npy")
    run = tmp_path / "run"
    over = [o for o in SMALL if o != "logger=csv"]
    proc = train_py("activations=file", f"activations.path={x}", *over, "logger=wandb",
                    f"hydra.run.dir={run}", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    output = proc.stdout + proc.stderr
    messages = log_messages(output)
    assert "Seed set to 0" in messages and any(m.startswith("Run finished") for m in messages)
    twice = [m for m, n in collections.Counter(messages).items() if n > 1]
    assert not twice, f"printed more than once: {twice}"
    bare = [line for line in output.splitlines() if BARE_LINE.match(line)]
    assert not bare, f"printed past Hydra's log format: {bare}"
    found = [n for n in NOTICES if n in output]
    assert not found, f"library notices in the output: {found}\n{output[-3000:]}"
    log_file = (run / "train.log").read_text()
    assert log_file.count("Seed set to 0") == 1 and "Trainer.fit` stopped" in log_file
