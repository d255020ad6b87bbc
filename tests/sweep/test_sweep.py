"""Hydra multirun: job folder names, presets, failure capture, the end-of-sweep comparison, and one cache
shared by every job of a sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from sae_lightning.config import register_configs
from sae_lightning.sweep.multirun import SWEPT_KEYS_FILE, short_names, sweep_group, sweep_subdir, swept_keys

REPO = Path(__file__).resolve().parents[2]


def test_swept_keys_are_those_with_several_values():
    overrides = ["sae.dict_mult=4,8,16", "l1=1", "lr=range(1,3)", "seed=choice(0,1)", "+tag=a", "logger=csv"]
    assert swept_keys(overrides) == ["sae.dict_mult", "lr", "seed"]
    # a preset's params come first; a plain command-line value for the same key fixes it
    assert swept_keys(["l1=1,2,5", "sae.dict_mult=4,8", "l1=3"]) == ["sae.dict_mult"]


def test_job_folder_has_number_and_only_swept_values(tmp_path):
    """The swept keys come from the sweep folder (written before any job starts), not the environment."""
    (tmp_path / SWEPT_KEYS_FILE).write_text(json.dumps(["sae.dict_mult", "l1"]))
    task = ["activations=file", "activations.path=/data/x.npy", "sae.dict_mult=8", "l1=0.0003", "seed=1"]
    assert sweep_subdir(3, task, str(tmp_path)) == "003_dict_mult=8_l1=0.0003"
    assert sweep_subdir(4, ["l1=1", "sae.dict_mult=0.0022881136684755237"], str(tmp_path)) == \
        "004_dict_mult=0.002288_l1=1"
    (tmp_path / SWEPT_KEYS_FILE).write_text(json.dumps(["model.name"]))
    assert sweep_subdir(12, ["model.name=org/some model"], str(tmp_path)) == "012_name=org-some-model"
    assert sweep_subdir(5, task, str(tmp_path / "elsewhere")) == "005"


def test_short_names_keep_full_keys_when_ambiguous():
    assert short_names(["sae.k", "optim.k", "l1"]) == {"sae.k": "sae.k", "optim.k": "optim.k", "l1": "l1"}


def test_group_names_the_preset_and_the_sweep_folder():
    assert sweep_group("multirun/2026-11-25/07-50-00", None) == "sweep-2026-11-25-07-50-00"
    group = sweep_group("multirun/l1_x_dict/2026-11-25_07-50-00", "l1_x_dict")
    assert group == "l1_x_dict-2026-11-25_07-50-00"


def test_preset_is_a_multirun_without_dash_m():
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["sweep=l1_x_dict"], return_hydra_config=True)
        # what a DDP job of that sweep re-runs as its own process: a single run
        job = compose("train", overrides=["sweep=l1_x_dict", "l1=5", "hydra.mode=RUN"],
                      return_hydra_config=True)
    assert str(job.hydra.mode) == "RunMode.RUN" and job.l1 == 5
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == {"sae.dict_mult": "4,8,16", "l1": "2,5,10"}
    assert cfg.hydra.callbacks.sweep._target_ == "sae_lightning.sweep.multirun.SweepCallback"


def _array(path: Path, n: int = 2048, d: int = 16) -> Path:
    g = np.random.default_rng(0)
    codes = g.random((n, 48)) * (g.random((n, 48)) < 0.1)
    np.save(path, (codes @ g.normal(size=(48, d))).astype(np.float32))
    return path


def train_py(*overrides: str, cwd: Path, env: dict | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """``python train.py <overrides>`` as a user runs it (DDP and Hydra's multirun need a real process); on a
    timeout its whole process group goes, DDP children included."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1", **(env or {})}
    cmd = [sys.executable, str(REPO / "train.py"), *overrides]
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


SMALL = ["logger=csv", "trainer=cpu", "trainer.progress_bar=false", "batch_size=128", "train_tokens=1024",
         "trainer.val_every_n_steps=8", "trainer.limit_val_batches=1", "activations.val_fraction=0.1"]


@pytest.mark.slow
def test_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    x = _array(tmp_path / "x.npy")
    sweep = tmp_path / "sweep"
    proc = train_py("-m", "activations=file", f"activations.path={x}", *SMALL, "sae.dict_mult=2,4",
                    "l1=-1,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["000_dict_mult=2_l1=-1", "001_dict_mult=2_l1=1", "002_dict_mult=4_l1=-1",
                    "003_dict_mult=4_l1=1"]
    failed = json.loads((sweep / jobs[2] / "summary.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith("ConfigError: Invalid config value l1")
    assert "Traceback" in failed["traceback"] and "l1=-1" in failed["overrides"]
    for job in (jobs[1], jobs[3]):  # the jobs after a failure ran to the end
        done = json.loads((sweep / job / "summary.json").read_text())
        assert done["status"] == "finished" and done["steps"] == 8
        assert (sweep / job / "checkpoints" / "final.ckpt").is_file()
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["swept"] == ["sae.dict_mult", "l1"]
    assert summary["ok"] == [jobs[1], jobs[3]]
    assert [f["run"] for f in summary["failed"]] == [jobs[0], jobs[2]]
    assert (sweep / "comparison.html").is_file() and (sweep / "frontier.png").is_file()
    assert "2 finished, 2 failed/unfinished" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_one_activation_cache_for_the_whole_sweep(tmp_path, tiny_gpt2_dir, tinystories_path):
    """Jobs of an LM sweep build the cache once and the later jobs reuse it; two processes started together
    (as parallel jobs of a sweep) build it once too: one waits on the other's file lock, then reuses."""
    cache = tmp_path / "cache"
    lm = [f"model.name={tiny_gpt2_dir}", "data=tinystories_local", f"data.path={tinystories_path}",
          "data.context_size=32", "data.n_tokens=4096", "data.lm_batch_size=16", "layer=1",
          f"activations.cache_dir={cache}", "activations.shard_rows=256", *SMALL]
    proc = train_py("-m", *lm, "l1=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    built = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(built) == 1, built
    assert (proc.stdout + proc.stderr).count("reusing activation cache") == 1  # job 1 reused job 0's

    cmd = [sys.executable, "-m", "sae_lightning.cache", "build", *lm, "data.n_tokens=6144"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2  # one more key, built once
    assert sum("reusing activation cache" in out for out in outs) == 1
