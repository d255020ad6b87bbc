"""Resume after pre-emption: SIGTERM/SIGUSR1 save a checkpoint, SIGKILL loses at most the steps since the
last one, and ``ckpt_path=last`` continues with the same weights, optimizer, schedules and data stream.

The helpers at the top are shared with test_faults.py and test_bad_input.py.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sae_lightning.cache.reader import ActivationCache
from sae_lightning.config import register_configs, to_config
from sae_lightning.train.checkpoints import CheckpointError
from sae_lightning.train.run import TrainingPreempted, run_training

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "train.py"
BATCH = 32


def write_acts(path: Path, n: int = 2048, d: int = 16, seed: int = 0) -> Path:
    """Sparse codes over a random dictionary: a small [n, d] float32 array an SAE can learn."""
    g = np.random.default_rng(seed)
    codes = g.random((n, 3 * d)) * (g.random((n, 3 * d)) < 0.06)
    np.save(path, (codes @ g.normal(size=(3 * d, d))).astype(np.float32))
    return path


def overrides(acts: Path, steps: int, **extra: object) -> list[str]:
    """train.py overrides for a tiny CPU run of ``steps`` steps with a warm-up and a decaying lr, so a resume
    that got the schedule or the stream wrong would show in the weights."""
    base: dict[str, object] = {
        "activations": "file", "activations.path": acts, "activations.shuffle_buffer": 256,
        "logger": "csv", "trainer": "cpu", "trainer.progress_bar": "false", "batch_size": BATCH,
        "train_tokens": BATCH * steps, "sae.dict_mult": 2, "optim.lr_warmup_steps": 10,
        "optim.lr_decay": "linear", "trainer.checkpoint_every_n_steps": 10, "trainer.val_every_n_steps": 25,
        "trainer.limit_val_batches": 2, "trainer.log_every_n_steps": 5,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def lm_overrides(tmp_path: Path, model_dir: Path, text: Path | str, **extra: object) -> list[str]:
    """A tiny activations=lm run: the tiny GPT-2 (3 layers, 64 positions) on a local text file."""
    over = {"activations": "lm", "activations.cache_dir": tmp_path / "cache", "activations.shard_rows": 256,
            "model.name": model_dir, "model.device": "cpu", "data": "tinystories_local", "data.path": text,
            "data.context_size": 32, "data.n_tokens": 2048, "data.lm_batch_size": 8, "layer": 1,
            "hook": "mlp_post", "batch_size": 64, "train_tokens": 640, "logger": "csv", "trainer": "cpu",
            "trainer.progress_bar": "false"}
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def configure(over: list[str]):
    """(TrainConfig, plain dict) exactly as train.py builds them from these overrides."""
    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        dict_cfg = compose("train", overrides=over)
    return to_config(dict_cfg), OmegaConf.to_container(dict_cfg, resolve=True)


def train_in_process(over: list[str], run_dir: Path) -> dict:
    cfg, config_dict = configure(over)
    return run_training(cfg, run_dir, config_dict)


def run_train_py(over: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN), *over], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def record_env() -> dict[str, str]:
    return dict(os.environ, SAE_LIGHTNING_RECORD_BATCHES="1")


def batch_log(run_dir: Path) -> list[str]:
    path = run_dir / "batches.tsv"
    return path.read_text().splitlines() if path.exists() else []


def last_step(lines: list[str]) -> int:
    return int(lines[-1].split("\t")[0]) if lines else -1


def batches_trained(lines: list[str]) -> list[str]:
    """The batch log of a run resumed in its own folder, as the batches its final weights saw: where a
    resumed invocation starts again at an earlier step, what came after that step before is dropped."""
    kept: list[str] = []
    for line in lines:
        step = int(line.split("\t")[0])
        kept = [k for k in kept if int(k.split("\t")[0]) < step] + [line]
    return kept


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _wait_for_step(run_dirs, step: int, proc: subprocess.Popen | None = None, timeout: float = 300) -> Path:
    """Poll the batch records of the run dirs (a callable giving them) until one reaches ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in run_dirs():
            if last_step(batch_log(d)) >= step:
                return d
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before step {step}: "
                                 f"{proc.stdout.read()[-2000:] if proc.stdout else ''}")
        time.sleep(0.01)
    raise AssertionError(f"no run reached step {step} in {timeout} s")


# ----- end to end, killed for real ----------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    """The issue's test: a run stopped by SIGTERM, resumed, SIGKILLed mid-run, resumed again with
    ``ckpt_path=last`` ends with exactly the weights and Adam state of an uninterrupted run with the same
    seed (tolerance: 0, CPU math is deterministic here), after seeing exactly the same batches in the same
    order (no row skipped or repeated)."""
    acts = write_acts(tmp_path / "acts.npy")
    steps = 60
    over = overrides(acts, steps)
    env = record_env()
    ref = run_train_py([*over, f"hydra.run.dir={tmp_path / 'reference'}"], tmp_path, env)
    assert ref.returncode == 0, ref.stderr[-3000:]

    # Hydra's default layout (a new timestamped dir per invocation): ckpt_path=last must find the old run.
    pattern = f"hydra.run.dir={tmp_path}/outputs/train/${{now:%Y-%m-%d}}/${{now:%H-%M-%S-%f}}"
    root = tmp_path / "outputs" / "train"

    def runs() -> list[Path]:
        return sorted(p.parent for p in root.glob("*/*/resume_key.json"))

    first = subprocess.Popen([sys.executable, str(TRAIN), *over, pattern], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(runs, 15, first)
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Stopped by SIGTERM" in out and "ckpt_path=last" in out  # the log says how to resume
    run_a = runs()[0]
    saved = ckpt(run_a / "checkpoints" / "last.ckpt")["global_step"]
    assert 15 <= saved < steps and not (run_a / "checkpoints" / "final.ckpt").exists()

    # B and C continue in A's folder (Hydra still gives each invocation its own folder for its own files)
    second = subprocess.Popen([sys.executable, str(TRAIN), *over, pattern, "ckpt_path=last"], cwd=tmp_path,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(lambda: [run_a], saved + 15, second)
    second.kill()
    second.communicate(timeout=60)
    assert second.returncode == -signal.SIGKILL
    assert not (run_a / "checkpoints" / "final.ckpt").exists(), "the kill came after the run had finished"
    b_last = last_step(batch_log(run_a))

    third = run_train_py([*over, pattern, "ckpt_path=last"], tmp_path, env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert runs() == [run_a], "a resumed run wrote its own run folder"
    invocations = sorted(p.parent.parent for p in root.glob("*/*/.hydra/config.yaml"))
    assert len(invocations) == 3 and not any((d / "checkpoints").exists() for d in invocations if d != run_a)
    restarts = [int(line.split("\t")[0]) for line in batch_log(run_a)]
    resumed_at = next(b for a, b in itertools.pairwise(restarts[restarts.index(b_last):]) if b <= a)
    assert saved < resumed_at <= b_last  # B's newest checkpoint, not A's
    assert f"Resuming run {run_a}" in third.stdout + third.stderr
    assert "Resuming from" in (run_a / "train.log").read_text()  # this invocation's log is there too

    # The batches seen, step by step: A up to its checkpoint, B up to its last checkpoint, then C.
    seen = batches_trained(batch_log(run_a))
    assert seen == batch_log(tmp_path / "reference")
    assert len(seen) == steps
    summary = json.loads((run_a / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == steps
    assert sorted(p.name for p in (run_a / "csv").glob("*.csv")) == ["metrics-1.csv", "metrics-2.csv",
                                                                     "metrics.csv"]  # nothing lost

    want, got = ckpt(tmp_path / "reference/checkpoints/final.ckpt"), ckpt(run_a / "checkpoints/final.ckpt")
    assert got["global_step"] == want["global_step"] == steps
    for name, tensor in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], tensor, rtol=0, atol=0,
                                   msg=lambda m, name=name: f"{name} (A saved {saved}, C resumed at "
                                                            f"{resumed_at}): {m}")
    adam_want, adam_got = (c["optimizer_states"][0]["state"] for c in (want, got))
    for a, b in zip(adam_want.values(), adam_got.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a), "Adam state differs"
    assert want["lr_schedulers"] == got["lr_schedulers"]


# ----- in process ---------------------------------------------------------------------------------------
def _signal_at_step(run_dir: Path, step: int, signum: int) -> threading.Thread:
    """Send ``signum`` to this process once the run in ``run_dir`` has reached ``step``."""
    def send() -> None:
        _wait_for_step(lambda: [run_dir], step, timeout=300)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_sigusr1_saves_checkpoint_and_auto_resume_finishes(tmp_path: Path, monkeypatch) -> None:
    """SLURM's time-limit warning (SIGUSR1) writes last.ckpt at a step boundary and exits with 128+10;
    ``ckpt_path=auto`` then finds it in the previous run dir and trains to the end, in that run's folder."""
    monkeypatch.setenv("SAE_LIGHTNING_RECORD_BATCHES", "1")
    acts = write_acts(tmp_path / "acts.npy")
    over = overrides(acts, 60)
    thread = _signal_at_step(tmp_path / "runs" / "a", 5, signal.SIGUSR1)
    with pytest.raises(TrainingPreempted) as stopped:
        train_in_process(over, tmp_path / "runs" / "a")
    thread.join()
    assert stopped.value.code == 128 + signal.SIGUSR1
    last = ckpt(tmp_path / "runs/a/checkpoints/last.ckpt")
    assert last["global_step"] == stopped.value.step >= 5
    assert '"status": "preempted"' in (tmp_path / "runs/a/summary.json").read_text()

    summary = train_in_process([*over, "ckpt_path=auto"], tmp_path / "runs" / "b")
    assert summary.steps == 60 and summary.resumed_from.endswith("runs/a/checkpoints/last.ckpt")
    assert summary.run_dir == str(tmp_path / "runs" / "a") and not (tmp_path / "runs/b/checkpoints").exists()
    steps = [int(line.split("\t")[0]) for line in batch_log(tmp_path / "runs/a")]
    assert steps == [*range(stopped.value.step), *range(stopped.value.step, 60)]


@pytest.mark.parametrize(("extra", "own_state"), [
    ({"sae": "batchtopk", "sae.k": 4}, "sae.threshold"), ({"sae": "matryoshka", "sae.k": 4}, "sae.threshold"),
    ({"sae": "gated", "l1": 2.0}, "sae.r_mag"), ({"sae": "jumprelu", "sae.l0_coeff": 0.1}, "sae.threshold"),
    ({"sae": "jumprelu", "sae.l0_coeff": 0.1, "sae.sparsity_loss": "tanh", "sae.ste_to_input": "true",
      "sae.pre_act_coeff": 0.01, "sae.init_threshold": 2.0, "latents.dead_window_tokens": 64},
     "sae.threshold"),  # thresholds at 2 leave latents dead, so the pre-activation loss is active
    ({"sae.target_l0": 6}, "target_l0.log_scale")],
    ids=["batchtopk", "matryoshka", "gated", "jumprelu", "jumprelu_anthropic", "target_l0"])
def test_preempted_and_resumed_run_is_bit_identical(tmp_path: Path, monkeypatch, extra: dict,
                                                    own_state: str) -> None:
    """Stopped by SIGUSR1 after step 8 and resumed with ``ckpt_path=auto``, a 20-step run ends with exactly
    the uninterrupted run's weights, Adam state and training state (BatchTopK's threshold estimate, gated's
    extra parameters, JumpReLU's threshold (also with Anthropic's options, whose pre-activation loss reads the
    dead-latent window), the target-L0 controller's coefficient and L0 average)."""
    monkeypatch.setenv("SAE_LIGHTNING_RECORD_BATCHES", "1")
    acts = write_acts(tmp_path / "acts.npy")
    over = overrides(acts, 20, **extra)
    train_in_process(over, tmp_path / "reference")
    thread = _signal_at_step(tmp_path / "runs" / "a", 8, signal.SIGUSR1)
    with pytest.raises(TrainingPreempted) as stopped:
        train_in_process(over, tmp_path / "runs" / "a")
    thread.join()
    stopped_at = ckpt(tmp_path / "runs/a/checkpoints/last.ckpt")
    assert 8 <= stopped.value.step < 20
    summary = train_in_process([*over, "ckpt_path=auto"], tmp_path / "runs" / "b")
    assert summary.steps == 20 and summary.resumed_from.endswith("runs/a/checkpoints/last.ckpt")

    want, got = (ckpt(tmp_path / d / "checkpoints" / "final.ckpt") for d in ("reference", "runs/a"))
    assert want["state_dict"].keys() == got["state_dict"].keys() and own_state in want["state_dict"]
    assert not torch.equal(want["state_dict"][own_state], stopped_at["state_dict"][own_state])  # it moved
    for name, tensor in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name
    adam_want, adam_got = (c["optimizer_states"][0]["state"] for c in (want, got))
    for a, b in zip(adam_want.values(), adam_got.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a), "Adam state differs"


def test_ckpt_path_last_without_a_previous_run_is_an_error_but_auto_starts_fresh(tmp_path: Path) -> None:
    acts = write_acts(tmp_path / "acts.npy")
    with pytest.raises(CheckpointError, match=r"ckpt_path=last: no checkpoint of a run with this config.*"
                                              r"ckpt_path=auto"):
        train_in_process([*overrides(acts, 20), "ckpt_path=last"], tmp_path / "runs" / "a")
    summary = train_in_process([*overrides(acts, 20), "ckpt_path=auto"], tmp_path / "runs" / "b")
    assert summary.steps == 20 and summary.resumed_from is None


def _tensor_byte(path: Path) -> int:
    """File offset of a byte in the middle of the largest tensor a torch checkpoint (a zip) stores: the middle
    of the file can fall in a zip header's padding, which nothing reads, depending on the config's size."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with path.open("rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def test_last_ignores_runs_of_another_config_and_skips_a_corrupted_newest_checkpoint(tmp_path: Path) -> None:
    """A run with another l1 is never resumed; a last.ckpt damaged on disk is skipped for the step
    checkpoint before it (with a warning), not trusted."""
    acts = write_acts(tmp_path / "acts.npy")
    train_in_process(overrides(acts, 20, l1=5.0), tmp_path / "runs" / "a")
    other = train_in_process(overrides(acts, 20, l1=1.0), tmp_path / "runs" / "other")
    (tmp_path / "runs/a/checkpoints/final.ckpt").unlink()  # as if killed after its last save
    last = tmp_path / "runs/a/checkpoints/last.ckpt"
    data = bytearray(last.read_bytes())
    data[_tensor_byte(last)] ^= 0xFF
    last.write_bytes(bytes(data))
    os.utime(other.checkpoint)  # the other config's checkpoint is the newest on disk
    resumed = train_in_process([*overrides(acts, 20, l1=5.0), "ckpt_path=last"], tmp_path / "runs" / "b")
    assert resumed.resumed_from == str(tmp_path / "runs/a/checkpoints/step20.ckpt")


@pytest.mark.slow
def test_train_killed_during_the_cache_build_resumes_it(tmp_path: Path, tiny_gpt2_dir: Path,
                                                        tinystories_path: Path) -> None:
    """``python train.py activations=lm`` SIGKILLed while building its activation cache: nothing half-built is
    visible as a cache, and the same command again resumes the build from the stored shards and trains."""
    over = [*lm_overrides(tmp_path, tiny_gpt2_dir, tinystories_path, **{
        "data.n_tokens": 40_000, "activations.shard_rows": 256, "hook": "resid_post"}),
        f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen([sys.executable, str(TRAIN), *over], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(len(json.loads(p.read_text())["shards"]) >= 2
                  for p in (tmp_path / "cache" / ".partial").glob("**/progress.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it was killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not list((tmp_path / "cache").glob("*/meta.json")), "an unfinished cache was published"

    again = run_train_py([*over[:-1], f"hydra.run.dir={tmp_path / 'run2'}"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming activation cache build from shard" in again.stdout + again.stderr
    (cache,) = (tmp_path / "cache").glob("*/meta.json")
    ActivationCache(cache.parent).verify()
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["steps"] == 10
