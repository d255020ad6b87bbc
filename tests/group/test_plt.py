"""Per-layer transcoders (PLTs) for a list of layers, or all, in one pass: ``layers=all hook=mlp_in
target.name=mlp_out`` live and ``layers=[...] sae.skip=true`` from the cache, each member's target at its own
layer, then ``python evaluate.py ckpt_path=<group>``: each member's evaluation and the replacement model's
table and numbers; a group that is not a set of MLP transcoders is refused by ``PLTSet.from_group``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_lightning.checks import ConfigError, MissingFileError
from sae_lightning.config import EvalConfig
from sae_lightning.evaluate.replacement import NotMLPTranscoders, PLTSet
from sae_lightning.evaluate.run import run_evaluation
from sae_lightning.group.members import members_of_lists
from sae_lightning.group.run import GROUP_FILE, run_group
from sae_lightning.saes import SAE, build_sae, config_from_dict
from sae_lightning.train.run import run_training
from tests.live.test_live import BATCH, live_overrides, text  # noqa: F401  (the module-scoped text fixture)
from tests.train.test_resume import ckpt, configure, lm_overrides, run_train_py

EVALUATE = Path(__file__).resolve().parents[2] / "evaluate.py"
PLT = ["hook=mlp_in", "target.name=mlp_out"]


def evaluate_py(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EVALUATE), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_layers_all_trains_a_transcoder_per_block_live_and_evaluates_the_replacement(
        tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    run = tmp_path / "run"
    over = [*live_overrides(tiny_gpt2_dir, text, train_tokens=6 * BATCH), *PLT, "layers=all",
            f"hydra.run.dir={run}"]
    out = run_train_py(over, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    names = [m["name"] for m in json.loads((run / GROUP_FILE).read_text())["members"]]
    assert names == ["layer0_mlp_in", "layer1_mlp_in", "layer2_mlp_in"]   # every block of the 3-layer model
    for layer, name in enumerate(names):
        summary = json.loads((run / name / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["steps"] == 6
        train = SAE.load(run / name / "sae").metadata["train_config"]
        assert (train["layer"], train["hook"]["name"], train["target"]) == (layer, "mlp_in",
                                                                           {"name": "mlp_out", "layer": None})
        assert SAE.load(run / name / "sae").transcoder
    ev = evaluate_py([f"ckpt_path={run}", "downstream_contexts=4", "monosemanticity=false",
                      "report_latents=2", "report_neurons=2"], tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert ev.stdout.strip().splitlines()[-1] == str(run / "eval" / "metrics.json")
    assert metrics["layers"] == [0, 1, 2] and metrics["n_tokens_downstream"] > 0
    assert metrics["replacement/l0_total"] == pytest.approx(sum(metrics[f"replacement/layer{i}/l0"]
                                                                for i in range(3)))
    for name in names:   # each member's own evaluation, and its numbers alone equal the replacement's
        own = json.loads(Path(metrics["members"][name]).read_text())
        assert (run / name / "eval" / "report.html").exists()
        layer = int(name[5])
        assert metrics[f"alone/layer{layer}/ce_loss_recovered"] == pytest.approx(own["ce_loss_recovered"])
        assert metrics[f"alone/layer{layer}/kl_div"] == pytest.approx(own["kl_div"])
    report = (run / "eval" / "report.html").read_text()
    assert "all at once" in report and "alone" in report and "layer0_mlp_in: report" in report


def test_each_transcoder_of_the_group_trains_exactly_as_alone(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    """One live forward feeds layer 1's and layer 2's (input, target) pairs: each member's weights equal
    those of the same transcoder trained alone."""
    base = live_overrides(tiny_gpt2_dir, text, train_tokens=6 * BATCH)
    _, config = configure([*base, *PLT, "sae.skip=true", "layers=[1,2]"])
    members = members_of_lists(config, tmp_path / "group")
    assert [s.status for s in run_group(members, tmp_path / "group")] == ["finished", "finished"]
    for m in members:
        alone = run_training(m.cfg, tmp_path / f"alone_{m.name}", m.config)
        want = ckpt(Path(alone.checkpoint))["state_dict"]
        got = ckpt(m.run_dir / "checkpoints" / "final.ckpt")["state_dict"]
        assert want.keys() == got.keys() and "sae.W_skip" in want
        for k, v in want.items():
            assert torch.equal(got[k], v), (m.name, k)


def test_skip_transcoders_for_a_layer_list_from_the_cache(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    run = tmp_path / "run"
    over = [*lm_overrides(tmp_path, tiny_gpt2_dir, text), *PLT, "sae.skip=true", "layers=[0,2]",
            f"hydra.run.dir={run}"]
    out = run_train_py(over, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    caches = sorted(p.name.split("-")[1] for p in (tmp_path / "cache").iterdir() if p.name[0] != ".")
    assert caches == ["L0.mlp_in", "L0.mlp_out", "L2.mlp_in", "L2.mlp_out"]   # one LM pass built all four
    for name in ("layer0_mlp_in", "layer2_mlp_in"):
        assert SAE.load(run / name / "sae").W_skip.shape == (32, 32)
    ev = evaluate_py([f"ckpt_path={run}", "downstream_contexts=4", "group_members=false"], tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["layers"] == [0, 2] and metrics["members"] == {}
    assert {k for k in metrics if k.startswith("alone/")} >= {"alone/layer0/nmse", "alone/layer2/nmse"}
    assert not (run / "layer0_mlp_in" / "eval").exists()


def test_layer_lists_of_transcoders_are_checked(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    base = [*live_overrides(tiny_gpt2_dir, text), *PLT]
    for extra, message in ((["layers=[1,2]", "target.layer=2"], "target.layer=2: with layers"),
                           (["layers=[a]"], "layers must be integers"),
                           (["layers=5"], "give a list of layers")):
        with pytest.raises(ConfigError, match=message):
            configure([*base, *extra])
    _, config = configure([*base, "layers=all"])
    members = members_of_lists(config, tmp_path)
    assert [(m.cfg.layer, m.cfg.target_hook) for m in members] == [(i, (i, "mlp_out")) for i in range(3)]


def fake_group(tmp_path: Path, members: dict[str, list[str]], model_dir: Path, text_path: Path) -> Path:
    """A group folder whose members are SAE folders saved with these configs (no training)."""
    entries = []
    for name, over in members.items():
        cfg, config = configure([*live_overrides(model_dir, text_path), *over])
        sae = build_sae(config_from_dict({"architecture": "relu", "d_sae": 8, "skip": cfg.sae.skip}), 32,
                        d_out=None if cfg.target_hook is None else 32)
        sae.metadata = {"train_config": config}
        if name != "unfinished":
            sae.save(tmp_path / name / "sae")
        entries.append({"name": name, "run_dir": str(tmp_path / "elsewhere" / name)})  # moved: found beside
    (tmp_path / GROUP_FILE).write_text(json.dumps({"members": entries}))
    return tmp_path


def test_only_a_set_of_mlp_transcoders_is_a_plt_set(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    good = fake_group(tmp_path / "good", {"a": [*PLT, "layer=2"], "b": [*PLT, "layer=0"]}, tiny_gpt2_dir,
                      text)
    plts, cfg = PLTSet.from_group(good)
    assert plts.layers == [0, 2] and cfg.layer == 2
    not_mlp = NotMLPTranscoders
    cases = [({"a": ["layer=1", "hook=mlp_in"]}, not_mlp, "a .* is not a transcoder of its layer's MLP"),
             ({"a": ["hook=mlp_post", "target.name=mlp_out"]}, not_mlp, "reads mlp_post -> mlp_out"),
             ({"a": [*PLT, "target.layer=2"]}, not_mlp, "not a transcoder of its layer's MLP"),
             ({"a": PLT, "b": [*PLT, "sae_seed=3"]}, ConfigError, "two members .* replace layer 1's MLP"),
             ({"a": PLT, "unfinished": [*PLT, "layer=2"]}, MissingFileError, "unfinished .* no trained")]
    for i, (members, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            PLTSet.from_group(fake_group(tmp_path / str(i), members, tiny_gpt2_dir, text))
    # a group of SAEs: evaluate.py evaluates the members only (here none: group_members=false)
    path = run_evaluation(EvalConfig(ckpt_path=str(tmp_path / "0"), group_members=False))
    assert json.loads(path.read_text()) == {"ckpt_path": str((tmp_path / "0").resolve()), "members": {}}
    assert not (tmp_path / "0" / "eval" / "report.html").exists()
