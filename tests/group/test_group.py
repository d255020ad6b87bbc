"""Several SAEs from one stream (``sae_lightning/group/``): ``layers=[...]``/``hooks=[...]`` runs and
``run_group``. Each member ends in an ordinary run folder and trains exactly as a run of its own config
would; a diverged member fails alone; a SIGKILLed group resumes bit-identical; DDP; bad groups refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_lightning.checks import ConfigError
from sae_lightning.group.members import Member, check_members, members_of_lists
from sae_lightning.group.run import run_group
from sae_lightning.saes import SAE
from sae_lightning.sweep.compare import compare_sweep
from sae_lightning.train.checkpoints import load_sae_checkpoint
from sae_lightning.train.run import run_training
from tests.live.test_live import BATCH, live_overrides, text  # noqa: F401  (the module-scoped text fixture)
from tests.train.test_resume import (
    _wait_for_step,
    batch_log,
    ckpt,
    configure,
    lm_overrides,
    record_env,
    run_train_py,
)

TRAIN = Path(__file__).resolve().parents[2] / "train.py"


def member(tmp_path: Path, name: str, over: list[str]) -> Member:
    _, config = configure(over)
    return Member(name, tmp_path / name, config)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt(path)["state_dict"]


def test_a_member_trains_exactly_as_its_own_run(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    """Two SAEs on different layers with different coefficients and sizes, from one live forward: each
    member's weights, statistics and Adam state equal those of the same config trained alone."""
    base = live_overrides(tiny_gpt2_dir, text, train_tokens=12 * BATCH, **{"trainer.val_every_n_steps": 5})
    a = member(tmp_path / "group", "a", [*base, "layer=1", "l1=2"])
    b = member(tmp_path / "group", "b",
               [*base, "layer=2", "l1=8", "sae.dict_mult=4", "lr=1e-3", "sae_seed=5"])
    summaries = run_group([a, b], tmp_path / "group")
    assert [s.status for s in summaries] == ["finished", "finished"]
    for m in (a, b):
        alone = run_training(m.cfg, tmp_path / f"alone_{m.name}", m.config)
        want, got = ckpt(Path(alone.checkpoint)), ckpt(m.run_dir / "checkpoints" / "final.ckpt")
        assert want["state_dict"].keys() == got["state_dict"].keys()
        for k, v in want["state_dict"].items():
            assert torch.equal(got["state_dict"][k], v), (m.name, k)
        for p, state in want["optimizer_states"][0]["state"].items():
            for k, v in state.items():
                assert torch.equal(got["optimizer_states"][0]["state"][p][k], v), (m.name, p, k)
        assert want["lr_schedulers"][0]["last_epoch"] == got["lr_schedulers"][0]["last_epoch"]
        run = json.loads((m.run_dir / "summary.json").read_text())
        assert run["steps"] == alone.steps == 12 and run["tokens"] == alone.tokens
        assert run["metrics"]["val/nmse"] == pytest.approx(alone.metrics["val/nmse"], rel=1e-6)
        loaded = load_sae_checkpoint(m.run_dir / "checkpoints/final.ckpt").sae
        assert torch.equal(SAE.load(m.run_dir / "sae").W_dec, loaded.W_dec)


def test_layers_run_writes_one_run_folder_per_sae(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    """``python train.py layers=[1,2] hooks=[mlp_post,resid_post]``: four SAEs, four ordinary run folders,
    logs that name their SAE, a comparison listing exactly the four, and evaluate.py on one of them."""
    run = tmp_path / "run"
    over = [*live_overrides(tiny_gpt2_dir, text, train_tokens=6 * BATCH), "layers=[1,2]",
            "hooks=[mlp_post,resid_post]", "callbacks=resample", "callbacks.resample_steps=[3]",
            "trainer.log_every_n_steps=2",
            f"hydra.run.dir={run}"]
    out = run_train_py(over, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    names = ["layer1_mlp_post", "layer1_resid_post", "layer2_mlp_post", "layer2_resid_post"]
    assert json.loads((run / "group.json").read_text())["members"][0]["name"] == names[0]
    for name in names:
        folder = run / name
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["steps"] == 6
        assert summary["config"]["layer"] == int(name[5]) and summary["config"]["layers"] is None
        assert (folder / "sae" / "cfg.json").exists() and (folder / "csv" / "metrics.csv").exists()
        log = (folder / "train.log").read_text()
        assert f"[{name}]" in log and not any(f"[{o}]" in log for o in names if o != name)
        assert "train/loss" in (folder / "csv" / "metrics.csv").read_text().splitlines()[0]
    result = compare_sweep(run)
    assert sorted(r.path.name for r in result.runs) == names
    assert {r.status for r in result.runs} == {"finished"}
    widths = {n: SAE.load(run / n / "sae").d_in for n in names}
    assert widths["layer1_mlp_post"] == 4 * widths["layer1_resid_post"]   # each SAE sized for its hook
    ev = subprocess.run([sys.executable, str(TRAIN.parent / "evaluate.py"), f"ckpt_path={run / names[3]}",
                         "downstream_contexts=4", "monosemanticity=false", "report_latents=2",
                         "report_neurons=2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads((run / names[3] / "eval" / "metrics.json").read_text())["n_tokens"] > 0


def test_a_diverging_member_fails_alone(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    base = live_overrides(tiny_gpt2_dir, text, train_tokens=8 * BATCH)
    good = member(tmp_path, "good", base)
    bad = member(tmp_path, "bad", [*base, "lr=1e30", "optim.grad_clip=0"])
    summaries = run_group([good, bad], tmp_path / "group")
    assert [s.status for s in summaries] == ["finished", "failed"]
    failed = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert failed["status"] == "failed" and "Non-finite loss at step" in failed["error"]
    assert not (tmp_path / "bad" / "sae").exists()
    assert json.loads((tmp_path / "good" / "summary.json").read_text())["steps"] == 8
    statuses = {r.path.name: r.status for r in compare_sweep(tmp_path).runs}
    assert statuses["good"] == "finished" and statuses["bad"] == "failed"


def test_layers_from_the_cache_build_every_hook_in_one_pass(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    run = tmp_path / "run"
    over = [*lm_overrides(tmp_path, tiny_gpt2_dir, text), "layers=[0,2]", f"hydra.run.dir={run}"]
    out = run_train_py(over, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    caches = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert len(caches) == 2 and "LM forward" in out.stderr and out.stderr.count("LM forward") >= 1
    for name in ("layer0_mlp_post", "layer2_mlp_post"):
        assert json.loads((run / name / "summary.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_sigkill_then_resume_of_a_group_ends_bit_identical(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    over = [*live_overrides(tiny_gpt2_dir, text), "layers=[1,2]", "l1=3"]
    env = record_env()
    ref = run_train_py([*over, f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path, env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(TRAIN), *over, f"hydra.run.dir={run}"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(lambda: [run], 23, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (run / "checkpoints" / "final.ckpt").exists()
    resumed = run_train_py([*over, f"hydra.run.dir={run}", "ckpt_path=last"], tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(line.split("\t")[0]) for line in batch_log(run)].count(20) == 2
    for name in ("layer1_mlp_post", "layer2_mlp_post"):
        want, got = weights(tmp_path / "ref" / name / "checkpoints/final.ckpt"), weights(run / name /
                                                                                         "checkpoints/final.ckpt")
        assert want.keys() == got.keys()
        for k, v in want.items():
            assert torch.equal(got[k], v), (name, k)
        assert json.loads((run / name / "summary.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_a_group_trains_data_parallel(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    run = tmp_path / "run"
    over = [*live_overrides(tiny_gpt2_dir, text, trainer="ddp_sim", train_tokens=10 * BATCH), "layers=[1,2]",
            f"hydra.run.dir={run}"]
    out = run_train_py(over, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("layer1_mlp_post", "layer2_mlp_post"):
        summary = json.loads((run / name / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["tokens"] == 10 * BATCH * 2
        assert torch.isfinite(weights(run / name / "checkpoints/final.ckpt")["sae.W_dec"]).all()


def test_bad_groups_are_refused_before_any_work(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    base = live_overrides(tiny_gpt2_dir, text)
    for extra, message in ((["layers=[1,1]"], "layers.*repeats 1: two SAEs would share a folder"),
                           (["hooks=[mlp_post,nope]"], "'nope' is not a hook")):
        with pytest.raises(ConfigError, match=message):
            configure([*base, *extra])
    out = run_train_py([*base, "layers=[1,7]", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert out.returncode == 1 and "layer=7 is beyond" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r" / "layer1_mlp_post" / "summary.json").exists()
    a = member(tmp_path, "a", base)
    with pytest.raises(ConfigError, match="same folder"):
        check_members([a, Member("b", a.run_dir, a.config)])
    other = member(tmp_path, "c", [*base, "batch_size=32"])
    with pytest.raises(ConfigError, match="c cannot share the activation stream of a: batch_size"):
        check_members([a, other])
    _, config = configure([*base, "layers=[1,2]", "hooks=[mlp_post]"])
    assert [m.name for m in members_of_lists(config, tmp_path)] == ["layer1_mlp_post", "layer2_mlp_post"]


def test_the_memory_guard_refuses_a_group_before_training(tmp_path, tiny_gpt2_dir, text, monkeypatch) -> None:  # noqa: F811
    """Too little memory for the group: refused before the first step, naming how many SAEs fit, with the
    estimate the grouped launcher splits the group by."""
    from sae_lightning.group.memory import GroupMemoryError

    base = live_overrides(tiny_gpt2_dir, text)
    group = [member(tmp_path, f"s{i}", [*base, f"l1={i + 1}", "sae.dict_mult=64"]) for i in range(3)]
    monkeypatch.setenv("SAE_LIGHTNING_MEMORY_LIMIT", "1")
    with pytest.raises(GroupMemoryError, match="Only the first 0 of 3 fit") as err:
        run_group(group, tmp_path / "group")
    estimate = err.value.estimate
    assert len(estimate.members) == 3 and estimate.available == 1 and estimate.total > 0
    assert estimate.members[0] == estimate.members[2] > 0    # same sizes, same needs
    assert not any((tmp_path / f"s{i}" / "summary.json").exists() for i in range(3))
    monkeypatch.setenv("SAE_LIGHTNING_MEMORY_LIMIT", str(estimate.shared + estimate.members[0] + 1))
    with pytest.raises(GroupMemoryError, match="Only the first 1 of 3 fit"):
        run_group(group, tmp_path / "group2")
