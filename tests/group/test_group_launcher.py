"""``hydra/launcher=grouped``: job folders as with Hydra's basic launcher, jobs grouped by activation stream,
strict mode, failed jobs and groups recorded while the sweep goes on, objectives back to the sweeper.

The sweeps run in this process (``train.py``'s Hydra main, as ``python train.py -m`` runs it) with the
group engine replaced by one that writes each member's ``summary.json``: what the launcher does around it
is what is tested here."""

from __future__ import annotations

import json
import math
import runpy
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sae_lightning.checks import ConfigError, UserError
from sae_lightning.group import launcher
from sae_lightning.group.members import Member
from sae_lightning.sweep.multirun import sweep_group
from sae_lightning.train.run import TrainingPreempted
from sae_lightning.train.rundir import RunDir, RunSummary
from tests.sweep.test_sweep import REPO, SMALL, _array, train_py

Engine = Callable[[list[Member], Path], list[RunSummary]]


class TooBig(UserError, MemoryError):
    """What ``run_group`` raises for a group too big for memory: the message and the group's estimate."""

    def __init__(self, message: str, members: list[int]) -> None:
        super().__init__(message)
        self.estimate = SimpleNamespace(members=members, shared=10, available=250)


class FakeEngine:
    """Stands in for ``run_group``: records each group, finishes every member with ``val/nmse = l1 / 10``,
    except those whose ``l1`` is in ``diverge`` (failed, as a NaN member), groups of a ``batch_size`` in
    ``refuse`` (a ``ConfigError`` for the whole group) and groups of more than ``fit`` SAEs (refused for
    memory, with the group's estimate)."""

    def __init__(self, diverge: tuple[float, ...] = (), refuse: tuple[int, ...] = (), fit: int = 99) -> None:
        self.calls: list[tuple[list[Member], Path]] = []
        self.diverge, self.refuse, self.fit = diverge, refuse, fit

    def __call__(self, members: list[Member], group_dir: Path) -> list[RunSummary]:
        self.calls.append((members, group_dir))
        if members[0].config["batch_size"] in self.refuse:
            raise ConfigError("this group cannot run")
        if len(members) > self.fit:
            raise TooBig(f"only {self.fit} of the {len(members)} SAEs fit", [100] * len(members))
        summaries = []
        for m in members:
            l1 = m.config["l1"]
            summary = (RunSummary(status="failed", run_dir=str(m.run_dir), error="loss is NaN")
                       if l1 in self.diverge else
                       RunSummary(status="finished", run_dir=str(m.run_dir), steps=8,
                                  metrics={"val/nmse": l1 / 10, "val/l0": 3.0}, overrides=m.overrides))
            RunDir(m.run_dir).write_summary(summary)
            summaries.append(summary)
        return summaries


@pytest.fixture()
def sweep(tmp_path, monkeypatch):
    """``sweep(*overrides, engine=...)`` runs ``python train.py -m`` in this process with the grouped launcher
    on a small array and returns (sweep dir, what the launcher returned to the sweeper)."""
    x = _array(tmp_path / "x.npy")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)
    returns: list = []
    launch = launcher.GroupedLauncher.launch

    def spy(self, *args, **kwargs):
        out = launch(self, *args, **kwargs)
        returns.extend(r.return_value for r in out)
        return out

    monkeypatch.setattr(launcher.GroupedLauncher, "launch", spy)

    def run(*overrides: str, engine: Engine, name: str = "sweep") -> tuple[Path, list]:
        monkeypatch.setattr(launcher.GroupedLauncher, "_run_group", lambda self, m, d: engine(m, d))
        sweep_dir = tmp_path / name
        argv = ["train.py", "-m", "activations=file", f"activations.path={x}", *SMALL,
                "hydra/launcher=grouped", f"hydra.sweep.dir={sweep_dir}", *overrides]
        monkeypatch.setattr(sys, "argv", argv)
        returns.clear()
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
        return sweep_dir, list(returns)

    return run


def _jobs(sweep_dir: Path) -> list[str]:
    return sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_one_stream_is_one_group_in_basic_launcher_folders(sweep, capsys):
    engine = FakeEngine()
    sweep_dir, returns = sweep("l1=1,2", "sae.dict_mult=4,8", engine=engine)
    jobs = _jobs(sweep_dir)
    assert jobs == ["000_l1=1_dict_mult=4", "001_l1=1_dict_mult=8", "002_l1=2_dict_mult=4",
                    "003_l1=2_dict_mult=8"]
    for job in jobs:  # what the basic launcher writes into each job folder
        hydra_dir = sweep_dir / job / ".hydra"
        assert {p.name for p in hydra_dir.iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
        assert yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]["runtime"]["output_dir"] == \
            str(sweep_dir / job)
    assert "l1=2" in yaml.safe_load((sweep_dir / jobs[2] / ".hydra" / "overrides.yaml").read_text())

    [(members, group_dir)] = engine.calls
    assert group_dir == sweep_dir / ".groups" / "000-003"
    assert [m.name for m in members] == jobs and [m.run_dir for m in members] == [sweep_dir / j for j in jobs]
    assert [(m.config["l1"], m.config["sae"]["dict_mult"]) for m in members] == \
        [(1, 4), (1, 8), (2, 4), (2, 8)]
    assert "sae.dict_mult=8" in members[1].overrides
    logger = members[3].config["logger"]  # grouped and tagged for W&B as an ungrouped sweep's job
    assert logger["group"] == sweep_group(sweep_dir, None) and logger["tags"] == ["l1=2", "sae.dict_mult=8"]
    assert "group 1: 4 jobs (000..003) share one stream" in capsys.readouterr().out
    assert returns == pytest.approx([0.1, 0.1, 0.2, 0.2])
    assert json.loads((sweep_dir / "sweep_summary.json").read_text())["ok"] == jobs


def test_jobs_of_different_streams_fall_into_separate_groups(sweep, capsys):
    engine = FakeEngine()
    _, returns = sweep("l1=1,2", "batch_size=64,128", engine=engine)  # Hydra's grid: batch_size outermost
    assert [([m.name[:3] for m in members], d.name) for members, d in engine.calls] == \
        [(["000", "001"], "000-001"), (["002", "003"], "002-003")]
    assert [[m.config["batch_size"] for m in ms] for ms, _ in engine.calls] == [[64, 64], [128, 128]]
    out = capsys.readouterr().out
    assert "group 1: 2 jobs (000..001) share one stream" in out
    assert "group 2: 2 jobs (002..003) share one stream" in out
    assert returns == pytest.approx([0.1, 0.2, 0.1, 0.2])


def test_a_swept_sae_seed_shares_the_stream_and_a_swept_seed_does_not(sweep, capsys):
    engine = FakeEngine()
    sweep("sae_seed=0,1", "seed=0,1", engine=engine)  # Hydra's grid: sae_seed outermost
    assert [[(m.config["sae_seed"], m.config["seed"]) for m in members] for members, _ in engine.calls] == \
        [[(0, 0), (1, 0)], [(0, 1), (1, 1)]]
    assert [d.name for _, d in engine.calls] == ["000-002", "001-003"]
    out = capsys.readouterr().out
    assert "group 1: 2 jobs (000, 002) share one stream" in out
    assert "group 2: 2 jobs (001, 003) share one stream" in out


def test_strict_refuses_several_streams_before_any_work(sweep, capsys):
    engine = FakeEngine()
    with pytest.raises(SystemExit) as stopped:
        sweep("l1=1,2", "batch_size=64,128", "hydra.launcher.strict=true", engine=engine)
    assert stopped.value.code == 1 and engine.calls == []
    err = capsys.readouterr().err
    assert "Error: hydra.launcher.strict=true" in err
    assert "the swept key(s) batch_size change the stream (batch_size differ(s) between job 000_" in err
    # one stream is fine in strict mode
    _, returns = sweep("l1=1,2", "hydra.launcher.strict=true", engine=engine, name="one_stream")
    assert len(engine.calls) == 1 and returns == pytest.approx([0.1, 0.2])


def test_refused_and_diverged_jobs_are_failed_and_the_others_go_on(sweep):
    engine = FakeEngine(diverge=(2,))
    sweep_dir, returns = sweep("l1=-1,1,2", engine=engine)
    jobs = _jobs(sweep_dir)
    refused = _summary(sweep_dir / jobs[0])
    assert refused["status"] == "failed"
    assert refused["error"].startswith("ConfigError: Invalid config value l1")
    assert "Traceback" in refused["traceback"] and "l1=-1" in refused["overrides"]
    [(members, _)] = engine.calls
    assert [m.name for m in members] == jobs[1:]  # the refused job is not trained
    assert _summary(sweep_dir / jobs[2])["error"] == "loss is NaN"
    assert returns[1] == pytest.approx(0.1) and math.isnan(returns[0]) and math.isnan(returns[2])
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert summary["ok"] == [jobs[1]] and [f["run"] for f in summary["failed"]] == [jobs[0], jobs[2]]


def test_a_group_refused_as_a_whole_fails_its_jobs_and_the_next_group_runs(sweep):
    engine = FakeEngine(refuse=(64,))
    sweep_dir, returns = sweep("batch_size=64,128", "l1=1,2", engine=engine)
    jobs = _jobs(sweep_dir)
    assert len(engine.calls) == 2
    for job in jobs[:2]:
        failed = _summary(sweep_dir / job)
        assert failed["status"] == "failed" and failed["error"] == "ConfigError: this group cannot run"
    assert [_summary(sweep_dir / job)["status"] for job in jobs[2:]] == ["finished", "finished"]
    assert all(math.isnan(r) for r in returns[:2]) and returns[2:] == pytest.approx([0.1, 0.2])


def test_a_group_too_big_for_memory_runs_as_consecutive_groups(sweep, monkeypatch, capsys):
    """``run_group`` refuses a group too big for memory before any work, with the group's estimate; the
    launcher cuts it into the consecutive parts ``split_to_fit`` gives for that estimate and trains each."""
    estimates: list = []

    def split_to_fit(self, estimate) -> list[list[int]]:
        estimates.append(estimate)
        return [[0, 1], [2]]

    monkeypatch.setattr(launcher.GroupedLauncher, "_split_to_fit", split_to_fit)
    engine = FakeEngine(fit=2)
    sweep_dir, returns = sweep("l1=1,2,4", engine=engine)
    assert [e.members for e in estimates] == [[100, 100, 100]]
    assert [([m.name[:3] for m in members], d.name) for members, d in engine.calls] == \
        [(["000", "001", "002"], "000-002"), (["000", "001"], "000-001"), (["002"], "002")]
    assert "the 3 SAEs of jobs 000..002 do not fit in memory together: 2 groups (000..001; 002)" in \
        capsys.readouterr().out
    assert returns == pytest.approx([0.1, 0.2, 0.4])
    assert [_summary(sweep_dir / job)["status"] for job in _jobs(sweep_dir)] == ["finished"] * 3

    sweep("l1=1,2,4", "hydra.launcher.split_by_memory=false", engine=engine, name="unsplit")
    assert len(estimates) == 1 and len(engine.calls) == 4  # refused once, not split
    for job in _jobs(sweep_dir.parent / "unsplit"):
        assert _summary(sweep_dir.parent / "unsplit" / job)["error"] == "TooBig: only 2 of the 3 SAEs fit"


def test_an_sae_too_big_even_alone_fails_its_group(sweep, monkeypatch):
    def split_to_fit(self, estimate) -> list[list[int]]:
        raise TooBig("SAE 0 of the group needs more than the memory available even alone", [])

    monkeypatch.setattr(launcher.GroupedLauncher, "_split_to_fit", split_to_fit)
    engine = FakeEngine(fit=1)
    sweep_dir, returns = sweep("l1=1,2", engine=engine)
    assert len(engine.calls) == 1 and all(math.isnan(r) for r in returns)
    for job in _jobs(sweep_dir):
        assert _summary(sweep_dir / job)["error"].startswith("TooBig: SAE 0 of the group needs more")


def test_preemption_stops_the_sweep(sweep, tmp_path):
    groups: list[Path] = []

    def preempted(members: list[Member], group_dir: Path) -> list[RunSummary]:
        groups.append(group_dir)
        raise TrainingPreempted(signal.SIGTERM, 3, group_dir / "checkpoints" / "last.ckpt")

    with pytest.raises(SystemExit) as stopped:
        sweep("l1=1,2", "batch_size=64,128", engine=preempted)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert groups == [tmp_path / "sweep" / ".groups" / "000-001"]  # the next group does not start
    assert not list((tmp_path / "sweep").rglob("summary.json"))  # the jobs are not recorded failed


@pytest.mark.parametrize(("override", "message"), [
    ("layers=[0,1]", "sweep layer=3,6,9 (or hook=...) instead"),
    # Lightning's ddp re-runs sys.argv in each rank: the whole sweep (the basic launcher's jobs avoid it by
    # running as single-run processes, which a group cannot)
    ("trainer=ddp_sim", "trainer.strategy=ddp starts each rank by running this command again"),
])
def test_jobs_a_group_cannot_train_are_refused(sweep, override, message):
    engine = FakeEngine()
    sweep_dir, returns = sweep("l1=1,2", override, engine=engine)
    for job in _jobs(sweep_dir):
        failed = _summary(sweep_dir / job)
        assert failed["status"] == "failed" and message in failed["error"]
    assert engine.calls == [] and all(math.isnan(r) for r in returns)


def test_job_numbers_and_group_folders():
    def jobs(*nums: int) -> list[launcher.Job]:
        return [launcher.Job(n, None, {}, None) for n in nums]  # type: ignore[arg-type]

    assert launcher.job_numbers(jobs(0, 1, 2)) == "000..002"
    assert launcher.job_numbers(jobs(4)) == "004"
    assert launcher.job_numbers(jobs(1, 3, 12)) == "001, 003, 012"
    assert [launcher.group_folder(jobs(*n)) for n in ((0, 1, 2), (4,), (1, 3, 12))] == \
        ["000-002", "004", "001-012"]


def test_optuna_batches_are_grouped_and_get_their_objectives(sweep):
    """Optuna's sweeper calls the launcher once per batch of ``n_jobs`` trials: each batch is a group, and
    each trial's objective is what Optuna records."""
    engine = FakeEngine()
    sweep_dir, returns = sweep("hydra/sweeper=optuna", "hydra/sweeper/sampler=grid",
                               "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "l1=choice(1,2,4,8)",
                               engine=engine)
    assert [[m.name[:3] for m in members] for members, _ in engine.calls] == [["000", "001"], ["002", "003"]]
    assert [d.name for _, d in engine.calls] == ["000-001", "002-003"]
    l1s = [m.config["l1"] for members, _ in engine.calls for m in members]
    assert sorted(l1s) == [1, 2, 4, 8] and returns == pytest.approx([l1 / 10 for l1 in l1s])
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"l1": 1} and results["best_value"] == pytest.approx(0.1)


def _comparison(sweep_dir: Path) -> dict:
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    return {"swept": summary["swept"], "ok": summary["ok"], "failed": [f["run"] for f in summary["failed"]],
            "runs": [{k: v for k, v in r.items() if k in ("run", "status", *summary["swept"])}
                     for r in summary["runs"]]}


@pytest.mark.slow
def test_grouped_sweep_end_to_end(tmp_path, tiny_gpt2_dir, tinystories_path):
    """``python train.py -m ... hydra/launcher=grouped`` on an LM: one group trains the four jobs, each job
    folder is a run, the two whose SAE diverges (lr 1e30) recorded failed while the others finish, and the
    comparison lists the same jobs, finished and failed, as the ungrouped sweep's."""
    lm = [f"model.name={tiny_gpt2_dir}", "data=tinystories_local", f"data.path={tinystories_path}",
          "data.context_size=32", "data.n_tokens=4096", "data.lm_batch_size=16", "layer=1",
          f"activations.cache_dir={tmp_path / 'cache'}", "activations.shard_rows=256", *SMALL]
    swept = ["lr=1e-3,1e30", "sae.dict_mult=2,4"]
    grouped = tmp_path / "grouped"
    proc = train_py("-m", *lm, *swept, "hydra/launcher=grouped", f"hydra.sweep.dir={grouped}", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "group 1: 4 jobs (000..003) share one stream" in out and out.count("Training 4 SAEs") == 1
    jobs = _jobs(grouped)
    ok, bad = jobs[:2], jobs[2:]  # lr=1e-3 (both sizes), then lr=1e30
    assert len(jobs) == 4 and all("lr=1e+30" in job for job in bad)
    for job in ok:
        summary = _summary(grouped / job)
        assert summary["status"] == "finished" and summary["steps"] == 8, summary
        assert math.isfinite(summary["metrics"]["val/nmse"])
        assert (grouped / job / "sae" / "cfg.json").is_file()
        assert (grouped / job / "checkpoints" / "final.ckpt").is_file()
    for job in bad:
        failed = _summary(grouped / job)
        assert failed["status"] == "failed" and failed["error"].startswith("NonFiniteError"), failed
    assert all((grouped / job / ".hydra" / "overrides.yaml").is_file() for job in jobs)
    group = json.loads((grouped / ".groups" / "000-003" / "group.json").read_text())
    assert [m["status"] for m in group["members"]] == ["finished"] * 2 + ["failed"] * 2
    assert (grouped / "comparison.html").is_file()

    plain = tmp_path / "plain"
    train_py("-m", *lm, *swept, f"hydra.sweep.dir={plain}", cwd=tmp_path)
    assert _comparison(grouped) == _comparison(plain)
    assert _comparison(grouped)["ok"] == ok and _comparison(grouped)["failed"] == bad


def test_a_clt_job_is_refused_by_the_grouped_launcher(sweep):
    """A CLT is one model over its layers, not a member of a shared stream."""
    engine = FakeEngine()
    sweep_dir, returns = sweep("lr=1e-3,2e-3", "clt=true", "layers=[0,1]", "target.name=mlp_out",
                               "hook=mlp_in", "sae=jumprelu", "activations=lm", engine=engine)
    for job in _jobs(sweep_dir):
        failed = _summary(sweep_dir / job)
        assert failed["status"] == "failed" and "drop hydra/launcher=grouped" in failed["error"]
    assert engine.calls == [] and all(math.isnan(r) for r in returns)
