"""Bad input, met the way a user meets it: ``python train.py``/``python evaluate.py`` (subprocess) or the same
entry function train.py calls (``run_training`` on a config composed from the same overrides). Each case
must fail with a message naming the bad value and what to do, before heavy work where possible, without
losing or overwriting earlier output."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sae_lightning.cache.reader import CacheError
from sae_lightning.train.checkpoints import CheckpointError, load_sae_checkpoint
from tests.train.test_resume import REPO, TRAIN, lm_overrides, overrides, train_in_process, write_acts


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 10-step run on d_in=16 activations: <root>/acts.npy, <root>/run/checkpoints/*.ckpt."""
    root = tmp_path_factory.mktemp("trained")
    train_in_process(overrides(write_acts(root / "acts.npy"), 10), root / "run")
    return root


def _run(script: Path | list[str], args: list[str], cwd: Path, full_error: bool = False,
         message_alone: bool = True) -> str:
    """Run a user command that must fail with exit status 1 (``script``: a file, or the arguments naming a
    module such as ``["-m", "sae_lightning.cache"]``); returns what it printed. ``full_error`` sets
    ``HYDRA_FULL_ERROR=1`` (the full traceback); otherwise it is unset and, with ``message_alone``, the
    output must hold no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    cmd = [sys.executable, *([str(script)] if isinstance(script, Path) else script), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"exit status {proc.returncode}:\n{out[-3000:]}"
    assert full_error or not message_alone or "Traceback" not in out, out[-3000:]
    return out


def _assert_names(out: str, *words: str) -> None:
    for w in words:
        assert w in out, f"{w!r} not in:\n{out[-3000:]}"


# ----- config: rejected by train.py before anything is loaded or written --------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("override", "words"), [
    ("sae.dcit_mult=3", ["dcit_mult", "ReLUConfig"]),
    ("batch_size=abc", ["'abc' of type 'str' could not be converted to Integer", "batch_size"]),
    ("sae.dict_mult=0", ["sae.dict_mult=0.0", "must be > 0"]),
    ("hook.name=attn_z", ["hook.name='attn_z'", "choose one of resid_pre, resid_mid, resid_post, attn_out"]),
])
def test_config_errors_name_the_key_before_any_work(tmp_path: Path, override: str, words: list[str]) -> None:
    acts = write_acts(tmp_path / "acts.npy", n=256)
    out = _run(TRAIN, [*overrides(acts, 4), override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    _assert_names(out, *words)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----- our errors at the command line: the message alone, the traceback only with HYDRA_FULL_ERROR=1 -----
def _assert_message_alone(out: str, message: str) -> None:
    assert f"Error: {message}" in out and "Error executing job" not in out, out[-3000:]


@pytest.mark.slow
def test_evaluate_with_a_missing_checkpoint_prints_the_message_alone(tmp_path: Path) -> None:
    args = [f"ckpt_path={tmp_path / 'nope'}", f"out_dir={tmp_path / 'eval'}"]
    message = f"{tmp_path / 'nope'} is neither an SAE folder"
    _assert_message_alone(_run(REPO / "evaluate.py", args, tmp_path), message)
    full = _run(REPO / "evaluate.py", args, tmp_path, full_error=True)
    _assert_names(full, "Traceback", f"CheckpointError: {message}")


@pytest.mark.slow
def test_train_with_a_bad_value_prints_the_message_alone(tmp_path: Path) -> None:
    acts = write_acts(tmp_path / "acts.npy", n=256)
    args = [*overrides(acts, 4), "l1=-1", f"hydra.run.dir={tmp_path / 'run'}"]
    message = "Invalid config value l1=-1.0: the L1 coefficient must be >= 0"
    _assert_message_alone(_run(TRAIN, args, tmp_path), message)
    assert message in (tmp_path / "run" / "train.log").read_text()  # the run's log says why it stopped
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any work
    _assert_names(_run(TRAIN, args, tmp_path, full_error=True), "Traceback", f"ConfigError: {message}")


@pytest.mark.slow
def test_cache_build_with_bad_overrides_prints_the_message_alone(tmp_path: Path) -> None:
    build = ["-m", "sae_lightning.cache", "build"]
    _assert_message_alone(_run(build, ["layer=-1"], tmp_path), "Invalid config value layer=-1: must be >= 0")
    out = _run(build, ["batch_size=abc"], tmp_path)
    _assert_message_alone(out, "Error merging override batch_size=abc")
    _assert_names(out, "Value 'abc' of type 'str' could not be converted to Integer")


# ----- the LM side, through run_training ----------------------------------------------------------------
@pytest.fixture
def story(tmp_path: Path, tinystories_path: Path) -> Path:
    path = tmp_path / "story.txt"
    path.write_text(tinystories_path.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


@pytest.mark.parametrize(("extra", "error", "words"), [
    ({"layer": 7}, ValueError, ["layer=7 is beyond the model's depth", "valid layers 0..2"]),
    ({"data.context_size": 128}, ValueError, ["data.context_size=128 exceeds the model's max positions"]),
    ({"batch_size": 4096, "train_tokens": 8192}, CacheError, ["fewer than batch_size=4096", "batch_size"]),
])
def test_lm_and_cache_limits(tmp_path: Path, tiny_gpt2_dir: Path, story: Path, extra: dict, error: type,
                             words: list[str]) -> None:
    with pytest.raises(error) as err:
        train_in_process(lm_overrides(tmp_path, tiny_gpt2_dir, story, **extra), tmp_path / "run")
    _assert_names(str(err.value), *words)


def _text_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.txt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "latin1":
        path.write_bytes("Once upon a time, a caf\u00e9.\n".encode("latin-1"))
    return path


@pytest.mark.parametrize(("kind", "error", "words"), [
    ("missing", FileNotFoundError, ["missing.txt", "matches no file"]),
    ("empty", ValueError, ["empty.txt is empty"]),
    ("latin1", ValueError, ["latin1.txt is not valid UTF-8", "0xe9"]),
])
def test_text_file_errors(tmp_path: Path, tiny_gpt2_dir: Path, kind: str, error: type,
                          words: list[str]) -> None:
    over = lm_overrides(tmp_path, tiny_gpt2_dir, _text_file(tmp_path, kind))
    with pytest.raises(error) as err:
        train_in_process(over, tmp_path / "run")
    _assert_names(str(err.value), *words)


def test_unknown_dataset_offline(tmp_path: Path, tiny_gpt2_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    over = lm_overrides(tmp_path, tiny_gpt2_dir, "unused", **{"data": "tinystories",
                                                               "data.name": "no-such-org/no-such-dataset"})
    with pytest.raises(ConnectionError) as err:
        train_in_process([o for o in over if not o.startswith("data.path=")], tmp_path / "run")
    _assert_names(str(err.value), "'no-such-org/no-such-dataset'", "data=text data.path=")


def test_truncated_and_corrupted_cache_shards(tmp_path: Path, tiny_gpt2_dir: Path, story: Path) -> None:
    """A cache damaged after it was built is refused (never read), naming the shard and how to rebuild."""
    over = lm_overrides(tmp_path, tiny_gpt2_dir, story)
    train_in_process(over, tmp_path / "ok")
    shard = sorted((tmp_path / "cache").glob("*/shard_00000.*"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CacheError, match=r"shard_00000.* is missing or truncated.*rebuild"):
        train_in_process(over, tmp_path / "truncated")
    flipped = bytearray(data)
    flipped[-50] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CacheError, match=r"shard_00000.* fails its SHA-256 checksum.*rebuild"):
        train_in_process(over, tmp_path / "corrupted")


# ----- checkpoints --------------------------------------------------------------------------------------
def _damaged(trained: Path, tmp_path: Path, how: str) -> Path:
    data = (trained / "run" / "checkpoints" / "final.ckpt").read_bytes()
    path = tmp_path / f"{how}.ckpt"
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:   # one byte flipped inside the largest tensor's bytes (where the file's middle falls depends on
        # the size of the pickled config; a tensor is what silent corruption must not slip through in)
        with zipfile.ZipFile(trained / "run" / "checkpoints" / "final.ckpt") as z:
            entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.compress_size)
        name_len, extra_len = struct.unpack_from("<HH", data, entry.header_offset + 26)   # local header
        start = entry.header_offset + 30 + name_len + extra_len
        flipped = bytearray(data)
        flipped[start + entry.compress_size // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))
    return path


@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_damaged_checkpoint_is_refused_before_any_work(trained: Path, tmp_path: Path, how: str) -> None:
    """Given to train.py as ckpt_path: refused, naming the file and the fix, before the run dir is used."""
    bad = _damaged(trained, tmp_path, how)
    over = [*overrides(trained / "acts.npy", 20), f"ckpt_path={bad}"]
    with pytest.raises(CheckpointError) as err:
        train_in_process(over, tmp_path / "run")
    _assert_names(str(err.value), str(bad), how, "resume from an earlier checkpoint")
    assert not (tmp_path / "run").exists()
    with pytest.raises(CheckpointError, match=how):  # what evaluate.py loads checkpoints with
        load_sae_checkpoint(bad)


@pytest.mark.slow
def test_truncated_checkpoint_at_the_command_line(trained: Path, tmp_path: Path) -> None:
    bad = _damaged(trained, tmp_path, "truncated")
    out = _run(TRAIN, [*overrides(trained / "acts.npy", 20), f"hydra.run.dir={tmp_path / 'run'}",
                       f"ckpt_path={bad}"], tmp_path)
    _assert_names(out, f"checkpoint {bad} is truncated", "Delete it")


@pytest.mark.slow
def test_checkpoint_of_another_shape_given_to_evaluate(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "run" / "checkpoints" / "final.ckpt"
    wide = write_acts(tmp_path / "wide.npy", d=24)
    out = _run(REPO / "evaluate.py", [f"ckpt_path={ckpt}", "activations=file", f"activations.path={wide}",
                                      f"out_dir={tmp_path / 'eval'}"], tmp_path)
    _assert_names(out, "d_in=16", "d=24")
    with pytest.raises(CheckpointError, match=r"holds an SAE for d_in=16 activations.*have d=24"):
        load_sae_checkpoint(ckpt, expected_d_in=24)


def test_resuming_a_checkpoint_of_another_shape(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "run" / "checkpoints" / "final.ckpt"
    over = [*overrides(trained / "acts.npy", 20, **{"sae.dict_mult": 4}), f"ckpt_path={ckpt}"]
    with pytest.raises(CheckpointError, match=r"another shape.*sae\.W_enc: \(16, 32\) in the checkpoint, "
                                              r"\(16, 64\) expected"):
        train_in_process(over, tmp_path / "run")


# ----- the output directory -----------------------------------------------------------------------------
@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """Make ``path`` read-only for this process: mode 555, plus the immutable flag when running as root
    (root ignores mode bits). Fails, rather than skips, when the directory stays writable."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    as_root = os.geteuid() == 0
    if as_root:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        with pytest.raises(OSError):
            (path / "probe").mkdir()
        yield path
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def test_read_only_output_directory(trained: Path, tmp_path: Path) -> None:
    over = overrides(trained / "acts.npy", 10)
    with read_only(tmp_path / "locked") as locked:
        with pytest.raises(CheckpointError, match=r"cannot write to the output directory .*locked/run.*"
                                                  r"hydra\.run\.dir"):
            train_in_process(over, locked / "run")
        # Hydra creates the run folder before train.py's code runs: its PermissionError, with Hydra's short
        # traceback, names the folder
        out = _run(TRAIN, [*over, f"hydra.run.dir={locked / 'run'}"], tmp_path, message_alone=False)
        _assert_names(out, str(locked / "run"))


def test_fresh_run_never_overwrites_an_earlier_runs_checkpoints(trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)

    def snapshot() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in [*(run / "checkpoints").iterdir(), run / "resume_key.json"]}

    before = snapshot()
    with pytest.raises(CheckpointError, match=r"already holds checkpoints of an earlier run.*ckpt_path=last"):
        train_in_process(overrides(trained / "acts.npy", 10, l1=1.0), run)
    assert snapshot() == before
