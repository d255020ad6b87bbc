"""The optional sweep back-ends docs/sweeps.md documents, run for real on a tiny array (dev extra: optuna,
submitit and their Hydra plugins):

- Optuna: ``sweep=optuna_lr`` with two trials, the objective being each job's final validation NMSE.
- SLURM's path through submitit's local executor (``hydra/launcher=local_parallel``): the sweep is one
  job-array submission, each job a local process with its logs under ``<sweep dir>/.submitit/``; a job sent
  submitit's pre-emption signal (SIGUSR2, what ``hydra/launcher=slurm`` asks SLURM to send before the time
  limit) saves a checkpoint at the step boundary, submitit requeues it, and the requeued job resumes from
  that checkpoint with ``ckpt_path=auto``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sae_lightning.train.callbacks.preemption import pass_on_signal
from tests.sweep.test_sweep import REPO, SMALL, _array, train_py
from tests.train.test_resume import _wait_for_step, batch_log


def _summary(job_dir: Path) -> dict:
    return json.loads((job_dir / "summary.json").read_text())


@pytest.mark.slow
def test_optuna_sweep_runs_two_trials_and_reports_the_best_lr(tmp_path: Path):
    x = _array(tmp_path / "x.npy")
    sweep = tmp_path / "optuna"
    proc = train_py("sweep=optuna_lr", "hydra.sweeper.n_trials=2", "activations=file",
                    f"activations.path={x}", *SMALL, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name[:7] for j in jobs] == ["000_lr=", "001_lr="]
    summaries = [_summary(j) for j in jobs]
    assert all(s["status"] == "finished" and s["steps"] == 8 for s in summaries)
    lrs = [s["config"]["lr"] for s in summaries]
    assert len(set(lrs)) == 2 and all(1e-4 <= lr <= 3e-2 for lr in lrs)  # the preset's search interval
    nmse = [s["metrics"]["val/nmse"] for s in summaries]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(nmse))
    assert best["best_params"]["lr"] == pytest.approx(lrs[nmse.index(min(nmse))])
    assert "2 finished, 0 failed" in proc.stdout + proc.stderr
    assert json.loads((sweep / "sweep_summary.json").read_text())["swept"] == ["lr"]


def test_stop_signal_is_passed_on_to_the_handler_that_was_there_before_training():
    """After the checkpoint, a launcher's Python handler (submitit's requeues the job) gets the signal; a
    default disposition is not acted on (the run exits with 128 + signal itself)."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        pass_on_signal(signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        pass_on_signal(signal.SIGUSR2)  # would end this process if it raised the signal
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _task_pid(controller_pid: int, timeout: float = 60) -> int:
    """The pid of the task process that submitit's local controller ``controller_pid`` started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
            except OSError:  # the process ended meanwhile
                continue
            if re.search(rf"^PPid:\s+{controller_pid}$", text, re.M):
                return int(status.parent.name)
        time.sleep(0.1)
    raise AssertionError(f"no task process of submitit controller {controller_pid}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="finds the job's process through /proc")
def test_submitit_job_array_preempted_job_is_requeued_and_resumes(tmp_path: Path):
    x = _array(tmp_path / "x.npy")
    sweep = tmp_path / "sweep"
    steps = 40
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=local_parallel", "activations=file",
           f"activations.path={x}", *SMALL, f"train_tokens={128 * steps}", "trainer.val_every_n_steps=20",
           "ckpt_path=auto", "l1=1,2", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1",
           "SAE_LIGHTNING_RECORD_BATCHES": "1"}  # step numbers in <job>/batches.tsv
    with subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as proc:
        try:
            job0 = _wait_for_step(lambda: [sweep / "000_l1=1"], 5, proc)
            controller = yaml.safe_load((job0 / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"]
            os.kill(_task_pid(int(controller)), signal.SIGUSR2)
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]

    # one array submission, one .submitit folder per job with its logs
    logs = {p.name: p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()}  # %j: the pickles
    assert str(controller) in logs and len(logs) == 2
    for folder in logs.values():
        assert (folder / f"{folder.name}_0_log.err").is_file()
        assert "Job completed successfully" in (folder / f"{folder.name}_0_log.out").read_text()
    log0 = (logs[str(controller)] / f"{controller}_0_log.out").read_text()
    assert log0.count("Stopped by SIGUSR2") == 1 and log0.count("Requeued job") == 1

    # the pre-empted job resumed from the checkpoint written at the signal and saw every batch exactly once
    first, second = _summary(job0), _summary(sweep / "001_l1=2")
    assert first["status"] == second["status"] == "finished"
    assert first["steps"] == second["steps"] == steps
    assert first["resumed_from"] == str(job0 / "checkpoints" / "last.ckpt")
    assert second["resumed_from"] is None
    assert [int(line.split("\t")[0]) for line in batch_log(job0)] == list(range(steps))
    assert "2 finished, 0 failed" in out


def test_a_failed_optuna_trial_is_a_failed_trial_and_the_study_goes_on(tmp_path: Path):
    """A job that diverges is recorded failed; Optuna gets a failed trial (a NaN objective would abort the
    study) and reports the trial that finished as the best."""
    x = _array(tmp_path / "x.npy")
    sweep = tmp_path / "optuna"
    proc = train_py("-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler.seed=0", "lr=choice(1e-3,1e30)",
                    "hydra.sweeper.max_failure_rate=1.0",
                    "hydra.sweeper.n_trials=4", "optim.grad_clip=0", "activations=file",
                    f"activations.path={x}", *SMALL, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    jobs = [j for j in sorted(sweep.iterdir()) if j.is_dir() and not j.name.startswith(".")]
    runs = [_summary(j) for j in jobs]
    statuses = {(float(j.name.split("lr=")[1]), s["status"]) for j, s in zip(jobs, runs, strict=True)}
    assert statuses == {(1e-3, "finished"), (1e30, "failed")} and len(runs) == 4   # the seeded draws
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"]["lr"] == pytest.approx(1e-3)
    finished = sum(s["status"] == "finished" for s in runs)
    assert f"{finished} finished, {4 - finished} failed" in proc.stdout + proc.stderr
