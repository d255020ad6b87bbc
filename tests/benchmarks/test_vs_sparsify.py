"""``python -m benchmarks.vs_sparsify``: our command composes into the config it promises, sparsify trains
on the contexts that hold our rows with the held-out ones after them, and the report compares the right
numbers.

The full script needs SmolLM2 and minutes per run; these check its parts in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import vs_sparsify as vs

SMALL = ["--tokens", "4096", "--buffer-rows", "2048", "--batch", "512", "--context", "64", "--d-sae", "96",
         "--k", "4", "--lr", "3e-4", "--layers", "1", "2"]


def _compose(overrides: list[str]):
    from hydra import compose, initialize

    from sae_lightning.config import register_configs, to_config
    from sae_lightning.sweep.multirun import register_resolvers

    register_configs()
    register_resolvers()
    with initialize(config_path="../../conf", version_base="1.3"):
        return to_config(compose("train", [o for o in overrides if not o.startswith("hydra.")]))


def test_our_overrides_give_the_promised_runs(tmp_path: Path) -> None:
    """One grouped run over every layer, or one run per layer, each with the shared settings; extra
    overrides come last and win."""
    args = vs.parse_args([*SMALL, "--ours-overrides", "sae.b_dec_init=mean"])
    grouped = vs.ours_commands(args, 7, tmp_path / "run")
    assert len(grouped) == 1 and f"hydra.run.dir={tmp_path / 'run'}" in grouped[0]
    per_layer = vs.ours_commands(vs.parse_args([*SMALL, "--ours-per-layer"]), 7, tmp_path / "run")
    assert [cmd[-1] for cmd in per_layer] == ["layer=1", "layer=2"]
    for n, cmd in zip((1, 2), per_layer, strict=True):
        assert f"hydra.run.dir={tmp_path / 'run' / f'layer{n}'}" in cmd
    for overrides, layers in ((grouped[0][2:], [1, 2]), (per_layer[1][2:], None)):
        cfg = _compose(overrides)
        assert cfg.layers == layers and (layers or cfg.layer == 2)
        assert (cfg.hook.name, cfg.sae.architecture) == ("resid_post", "topk")
        assert (cfg.sae.k, cfg.sae.d_sae) == (4, 96)
        assert (cfg.data.context_size, cfg.data.lm_batch_size) == (64, 8)  # a batch of 512 rows = 8 contexts
        assert (cfg.train_tokens, cfg.batch_size, cfg.lr, cfg.seed) == (4096, 512, 3e-4, 7)
        assert cfg.activations.source == "live" and cfg.activations.buffer_tokens == 2048
        assert cfg.activations.val_fraction == cfg.activations.eval_fraction == 0
        assert cfg.trainer.checkpoint_every_n_steps > 4096 // 512 and not cfg.logger.wandb
    assert _compose(grouped[0][2:]).sae.b_dec_init == "mean"
    for bad in (["--tokens", "3000"], ["--buffer-rows", "1000"], ["--batch", "500", "--buffer-rows", "1000"]):
        with pytest.raises(SystemExit):
            vs.parse_args([*SMALL, *bad])


def test_transcoders_run_our_plt_preset_at_its_rate(tmp_path: Path) -> None:
    """With ``--transcode`` ours is ``experiment=plt`` (mlp_in -> mlp_out, TopK) and ``--lr`` defaults to the
    rate that preset sets (read from its file), which sparsify's Adam run gets too; else quickstart's."""
    import yaml

    own_lr = [a for a in SMALL if a not in ("--lr", "3e-4")]
    args = vs.parse_args([*own_lr, "--transcode"])
    preset = yaml.safe_load((vs.REPO / "conf" / "experiment" / "plt.yaml").read_text())
    assert args.lr == float(preset["lr"]) != vs.parse_args(own_lr).lr
    cfg = _compose(vs.ours_commands(args, 0, tmp_path / "run")[0][2:])
    assert (cfg.hook.name, cfg.target.name, cfg.sae.architecture) == ("mlp_in", "mlp_out", "topk")
    assert cfg.lr == args.lr and cfg.layers == [1, 2] and cfg.sae.k == 4


def test_sparsify_gets_the_contexts_of_our_rows_and_held_out_ones_follow(tiny_tokenizer,
                                                                        tinystories_path: Path) -> None:
    """The training contexts are the first ones of the text, as few as hold ``--tokens`` trained positions;
    the held-out contexts are the next ones."""
    args = vs.parse_args([*SMALL, "--text", str(tinystories_path)])
    train, held_out, rows = vs.split_contexts(args, tiny_tokenizer, 3)
    text = vs.text_contexts(args, tiny_tokenizer)
    first = [c for c, _ in zip(text, range(len(train) + 3), strict=False)]
    np.testing.assert_array_equal(train, np.stack(first[:len(train)]))
    np.testing.assert_array_equal(held_out, np.stack(first[len(train):]))
    assert rows == int(text.kept(train).sum()) >= 4096 > rows - int(text.kept(train[-1]).sum())


def test_report_medians_ratios_and_fvu_verdicts() -> None:
    """tokens/s from each side's own rows; ours over each sparsify run by median (and CPU seconds a
    token); per layer the FVU difference and whether the seed ranges are apart."""
    args = vs.parse_args([*SMALL, "--contenders", "ours", "sparsify adam"])

    def result(wall: float, cpu: float, rows: int, fvus: tuple[float, float]) -> vs.Result:
        return vs.Result(vs.Run(wall, cpu, 1.0), rows, {1: {"fvu": fvus[0], "l0": 4.0},
                                                         2: {"fvu": fvus[1], "l0": 4.0}})

    results = {"ours": [result(10, 20, 4096, (0.30, 0.20)), result(14, 28, 4096, (0.32, 0.25))],
               "sparsify adam": [result(20, 30, 4160, (0.40, 0.21)), result(24, 36, 4160, (0.42, 0.24))]}
    lines = vs.report(args, results)
    # ours 4096/10, 4096/14 (median 351.1); sparsify 4160/20, 4160/24 (median 190.7); pairings 292.6/208
    # and 409.6/173.3; CPU seconds a token: median(30, 36)/4160 over median(20, 28)/4096
    assert "ours / sparsify adam: whole-process tokens/s 1.84x (worst-best pairing 1.41-2.36x" in lines[3]
    assert "by CPU seconds a token 1.35x" in lines[3]
    assert "layer 1: FVU ours - sparsify adam = -0.1000 (-24.4%; ours lower)" in lines[4]
    assert "layer 2: FVU ours - sparsify adam = +0.0000 (+0.0%; ours ranges overlap)" in lines[5]
    keys = dict(item.split("=") for item in lines[-1].split())
    assert keys["ours_vs_sparsify_adam"] == "1.841" and keys["fvu_L1_ours"] == "0.3100"


def test_transcode_runs_transcoders_of_each_mlp_on_both_sides(tmp_path: Path) -> None:
    """``--transcode``: ours a group of mlp_in -> mlp_out transcoders, sparsify ``transcode=True`` on each
    ``layers.N.mlp``; a sparsify transcoder saved where its trainer saves it is scored on the target."""
    import torch
    from sparsify import SaeConfig, SparseCoder

    args = vs.parse_args([*SMALL, "--transcode", "--contenders", "ours", "sparsify adam"])
    cfg = _compose(vs.ours_commands(args, 3, tmp_path / "run")[0][2:])
    assert (cfg.layers, cfg.hook.name, cfg.target.name) == ([1, 2], "mlp_in", "mlp_out")
    assert cfg.target.layer is None   # each member's target at its own layer
    assert (cfg.sae.architecture, cfg.sae.k, cfg.sae.d_sae) == ("topk", 4, 96)
    assert "--transcode" in vs.sparsify_command(args, "sparsify adam", 3, tmp_path / "s")
    assert [vs.sparsify_hookpoint(args, n) for n in (1, 2)] == ["layers.1.mlp", "layers.2.mlp"]
    torch.manual_seed(0)
    acts = {n: (torch.randn(64, 8), torch.randn(64, 8)) for n in (1, 2)}
    for n in (1, 2):
        sae = SparseCoder(8, SaeConfig(k=3, num_latents=16, transcode=True))
        torch.nn.init.normal_(sae.W_dec)
        sae.save_to_disk(tmp_path / "s" / vs.SPARSIFY_RUN / f"layers.{n}.mlp")
    scores = vs.score(args, "sparsify adam", tmp_path / "s", acts)
    for n, (x, y) in acts.items():
        sae = SparseCoder.load_from_disk(tmp_path / "s" / vs.SPARSIFY_RUN / f"layers.{n}.mlp")
        with torch.no_grad():
            y_hat = sae(x).sae_out
        fvu = float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
        assert scores[n]["fvu"] == pytest.approx(fvu, rel=1e-5)
        assert scores[n]["l0"] == pytest.approx(3.0)
