"""The quality benchmark trains every curve it offers (ours and SAELens's) and reports every pair.

A benchmark that breaks silently is found only when someone reruns it hours later; this runs each curve
for a few steps on tiny synthetic data, as the script is run from the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sae_lens")

from benchmarks import common
from benchmarks import live_vs_saelens as live
from benchmarks import quality_vs_saelens as q

REPO = Path(__file__).resolve().parents[2]


def test_quality_benchmark_trains_every_curve_and_reports_every_pair(tmp_path: Path) -> None:
    results = tmp_path / "runs.jsonl"
    cmd = [sys.executable, "-m", "benchmarks.quality_vs_saelens", "--d-in", "16", "--features", "64",
           "--mean-active", "4", "--d-sae", "32", "--train-rows", "4000", "--eval-rows", "500",
           "--batch", "128", "--steps", "8", "--b-dec-sample", "512", "--l1", "3", "--k", "4",
           "--l0-coeff", "1", "--target-l0", "8", "--results", str(results),
           "--plot", str(tmp_path / "frontiers.png"), "--curves", *q.CURVES]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert (tmp_path / "frontiers.png").stat().st_size > 10_000  # one panel per pair, three a row
    assert sorted(r["curve"] for r in rows) == sorted(q.CURVES)
    for r in rows:
        assert math.isfinite(r["l0"]) and 0 <= r["l0"] <= 32, r
        assert math.isfinite(r["nmse"]) and r["nmse"] > 0, r
    for ours, theirs in q.PAIRS:
        assert f"{ours} vs {theirs}: ours dominated" in out.stdout
    # the TopK family's held-out L0 is k (TopK exactly; the batch variants through their threshold)
    assert next(r["l0"] for r in rows if r["curve"] == "ours topk") == 4


def _row(curve: str, value: float, seed: int, l0: float, nmse: float) -> dict:
    return {"curve": curve, "value": value, "seed": seed, "l0": l0, "nmse": nmse,
            "curve_points": [[1, 2 * l0, nmse + 0.01], [2, l0, nmse]]}


def test_noise_band_is_the_l1_and_topk_spread_not_the_judged_architectures(capsys) -> None:
    """A noisy architecture's own seed spread (0.02 here) must not widen the band (0.001, the TopK
    curve's) its 0.005 gap is judged against."""
    rows = [_row("ours topk", 32, s, 32, 0.200 + 0.001 * s) for s in (0, 1)]
    rows += [_row("saelens topk", 32, 0, 32, 0.2005)]
    for l0, nmse in ((50, 0.150), (200, 0.050)):  # ours 0.005 worse at both L0s, seeds 0.02 apart
        rows += [_row("ours jumprelu target", l0, s, l0, nmse + 0.005 + 0.02 * (s - 0.5)) for s in (0, 1)]
        rows += [_row("saelens jumprelu target", l0, 0, l0, nmse)]
    q.report(rows)
    out = capsys.readouterr().out
    band = "noise band (largest seed spread of a point of ours topk, saelens topk, over its nmse): 0.50%"
    assert band in out  # 0.001 over the point's mean nmse 0.2005
    pair = "ours jumprelu target vs saelens jumprelu target:"
    line = next(x for x in out.splitlines() if x.startswith(pair))
    assert "worst ours-minus-theirs +0.0050" in line and "WORSE beyond the band" in line


def test_noise_band_is_relative_to_the_nmse_it_was_measured_at(capsys) -> None:
    """Seeds 0.003 apart at nmse 0.30 (1 %) must not pass a gap of 0.002 at nmse 0.04 (5 %), which an
    absolute band would; a gap of 0.0003 there (0.75 %) is within it."""
    rows = [_row("ours relu", 6, s, 6, 0.2985 + 0.003 * s) for s in (0, 1)]
    for gap, curve in ((0.002, "jumprelu target"), (0.0003, "topk")):
        for l0, nmse in ((1000, 0.050), (1400, 0.040)):
            rows += [_row(f"ours {curve}", l0, 0, l0, nmse + gap), _row(f"saelens {curve}", l0, 0, l0, nmse)]
    q.report(rows)
    out = capsys.readouterr().out
    assert "over its nmse): 1.00%" in out  # 0.003 / 0.300
    lines = {x.split(":")[0]: x for x in out.splitlines() if " vs saelens " in x}
    jump, topk = lines["ours jumprelu target vs saelens jumprelu target"], lines["ours topk vs saelens topk"]
    assert "worst gap +5.00% of their nmse: WORSE beyond the band" in jump
    assert "worst gap +0.75% of their nmse: no worse beyond the band" in topk


def test_every_ablation_variant_is_a_valid_config() -> None:
    """Each ``benchmarks.ablation`` variant of ours names real config keys with values the config accepts
    and keeps: a typo would otherwise surface only when someone starts that variant's quarter-hour run."""
    from benchmarks.ablation import VARIANTS

    for arch, variants in VARIANTS.items():
        for name, values in variants.items():
            if values is None:  # SAELens's own SAE
                continue
            cfg = common.preset(arch, d_sae=8, k=4, **values) if arch in ("topk", "batchtopk", "matryoshka") \
                else common.preset(arch, d_sae=8, **values)
            assert {key: getattr(cfg, key) for key in values} == values, (arch, name)


@pytest.mark.parametrize(("sparsity_loss", "ste_to_input"), [("l0", False), ("l0", True), ("tanh", True)])
def test_jumprelu_with_saelens_choices_trains_exactly_as_saelens(sparsity_loss: str,
                                                                  ste_to_input: bool) -> None:
    """Our JumpReLU with SAELens's choices (free decoder, b_dec at zero, thresholds at the base learning
    rate, the plain L0 term at a fixed coefficient, one clipping norm over all parameters:
    ``optim.grad_clip_scope=global``), started from SAELens's weights, takes the same steps as SAELens's own
    training SAE under its trainer's step: what lets ``jumprelu_diagnosis_l6.txt`` say a gap between the two
    is a difference of choices, not of implementation. Also with the straight-through gradient passed to
    the pre-activations (``sae.ste_to_input``, SAELens's ``jumprelu_ste_to_input``) and with Anthropic's tanh
    penalty (``sae.sparsity_loss=tanh``, SAELens's ``jumprelu_sparsity_loss_mode="tanh"``)."""
    from benchmarks.ablation import VARIANTS
    from benchmarks.common import ours_trainer, preset, saelens_trainer

    torch.manual_seed(0)
    d_in, d_sae, coeff = 12, 40, 3.0
    mode = {"l0": "step"}.get(sparsity_loss, sparsity_loss)  # SAELens's name of the plain L0 term
    theirs, their_step = saelens_trainer("jumprelu", d_in, d_sae, coeff, lr=1e-2,
                                         jumprelu_ste_to_input=ste_to_input, jumprelu_sparsity_loss_mode=mode)
    cfg = preset("jumprelu", d_sae=d_sae, l0_coeff=coeff, ste_to_input=ste_to_input,
                 sparsity_loss=sparsity_loss, **VARIANTS["jumprelu"]["free_b0"])
    ours, our_step = ours_trainer(cfg, d_in, coeff, lr=1e-2, clip_scope="global")
    names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    with torch.no_grad():
        for name in names:
            getattr(ours, name).copy_(getattr(theirs, name))
    data = torch.randn(20, 256, d_in, generator=torch.Generator().manual_seed(1)) + 0.3
    for x in data:
        our_step(x)
        their_step(x)
    for name in names:
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(ours.threshold, torch.full((d_sae,), ours.init_threshold))  # the thresholds moved


def test_penalised_ablation_trains_each_variant_once_per_seed(tmp_path: Path) -> None:
    """``benchmarks.ablation --arch jumprelu --seeds`` runs every (variant, seed) pair from the command line,
    records the seed with the run, and a seed changes the initialisation (so the spread it reports is real);
    ``--out`` writes the printed table whole under the results header."""
    import numpy as np

    acts, results = tmp_path / "acts.npy", tmp_path / "runs.jsonl"
    np.save(acts, torch.randn(1200, 16, generator=torch.Generator().manual_seed(0)).exp().numpy())
    cmd = [sys.executable, "-m", "benchmarks.ablation", "--acts", str(acts), "--arch", "jumprelu",
           "--variants", "thr10", "free10_b0", "--seeds", "0", "1", "--target-l0", "8", "--d-sae", "32",
           "--train-rows", "1000", "--eval-rows", "200", "--batch", "100", "--steps", "6",
           "--b-dec-sample", "500", "--curve-points", "2", "--threads", "1", "--results", str(results),
           "--out", str(tmp_path / "table.txt")]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, cwd=REPO)
    table = (tmp_path / "table.txt").read_text().splitlines()
    assert table[0] == f"# command: {shlex.join(['python', *cmd[1:]])}"
    assert table[7].startswith("data: acts.npy, d_in 16, d_sae 32") and len(table) == 9 + 4
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in rows] == [("thr10", 0), ("thr10", 1), ("free10_b0", 0),
                                                         ("free10_b0", 1)]
    assert rows[0]["nmse"] != rows[1]["nmse"] and rows[2]["nmse"] != rows[3]["nmse"]
    for r in rows:  # each run's firing-frequency spread is recorded, its quantiles in order
        lo, mid, hi = r["freq_quantiles"]
        assert 0 <= lo <= mid <= hi <= 1 and 0 <= r["dead"] <= r["rare"] <= 1 and 0 <= r["dense"] <= 1
        assert r["acts"] == "acts.npy"


def test_topk_ablation_trains_ours_and_saelens_per_k(tmp_path: Path) -> None:
    """``benchmarks.ablation --arch topk batchtopk``: each (arch, k, variant) once, SAELens's SAE beside
    ours, TopK's held-out L0 exactly k."""
    import numpy as np

    acts, results = tmp_path / "acts.npy", tmp_path / "runs.jsonl"
    np.save(acts, torch.randn(1200, 16, generator=torch.Generator().manual_seed(0)).exp().numpy())
    from benchmarks import ablation

    ablation.main(["--acts", str(acts), "--arch", "topk", "batchtopk", "--variants", "rescale01", "saelens",
                   "--k", "4", "--d-sae", "32", "--train-rows", "1000", "--eval-rows", "200",
                   "--batch", "100", "--steps", "4", "--b-dec-sample", "500", "--curve-points", "2",
                   "--threads", "1", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["arch"], r["variant"], r["k"]) for r in rows] == [
        ("topk", "rescale01", 4), ("topk", "saelens", 4), ("batchtopk", "rescale01", 4),
        ("batchtopk", "saelens", 4)]
    assert rows[0]["l0"] == 4
    with pytest.raises(SystemExit):  # a penalised architecture runs alone
        ablation.parse_args(["--acts", str(acts), "--arch", "gated", "topk"])


def test_firing_frequencies_counted_on_held_out_rows_and_summarised() -> None:
    """``common.train_counting_fires`` counts each latent's fires over the held-out rows at the last score,
    and ``frequency_summary`` matches a hand computation (quantiles interpolate between order statistics)."""
    import argparse

    class Fixed(torch.nn.Module):  # latent i fires on the rows whose column i is positive
        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return x.relu()

        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return z

    eval_x = torch.tensor([[1.0, -1.0, 2.0, -1.0, 3.0], [1.0, -1.0, -2.0, -1.0, 3.0],
                           [-1.0, -1.0, -2.0, -1.0, 3.0], [1.0, -1.0, -2.0, -1.0, 3.0]])
    args = argparse.Namespace(d_sae=5, steps=2, batch=2, curve_points=1)
    steps = []
    curve, freq, _ = common.train_counting_fires(Fixed(), steps.append, torch.zeros(4, 5), eval_x, args)
    assert len(steps) == 2 and len(curve) == 1
    torch.testing.assert_close(freq, torch.tensor([0.75, 0.0, 0.25, 0.0, 1.0]))
    summary = common.frequency_summary(torch.tensor([0.0, 0.005, 0.2, 0.6, 1.0]))
    # sorted positions 0..4: q05 at 0.2 -> 0.2 * 0.005; q50 at 2 -> 0.2; q95 at 3.8 -> 0.6 + 0.8 * 0.4
    assert summary["dead"] == pytest.approx(0.2) and summary["rare"] == pytest.approx(0.4)
    assert summary["dense"] == pytest.approx(0.4)
    assert summary["freq_quantiles"] == pytest.approx([0.001, 0.2, 0.92])


TINY_LIVE = ["--tokens", "512", "--batch", "64", "--context", "16", "--lm-batch", "4", "--buffer-rows", "128",
             "--layer", "1", "--d-sae", "32", "--k", "4", "--reps", "1"]  # live_vs_saelens.py on tiny_llama


def _live_args(tmp_path: Path, model_dir: Path, *extra: str) -> argparse.Namespace:
    return live.parse_args(["--model-dir", str(model_dir), *TINY_LIVE, "--l1", "2", "--lr", "3e-4",
                            "--work", str(tmp_path / "work"), *extra])


def test_live_vs_saelens_both_sides_get_the_same_settings(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """``live_vs_saelens.py``: our overrides compose into the train config they promise (each variant of
    ``OURS_ACTIVATIONS``) and SAELens's runner config holds the same model, hook, sizes and buffer rows."""
    from hydra import compose, initialize

    from sae_lightning.config import register_configs, to_config
    from sae_lightning.sweep.multirun import register_resolvers

    register_configs()
    register_resolvers()
    for variant in live.OURS_ACTIVATIONS:
        args = _live_args(tmp_path, tiny_llama_dir, "--ours-activations", variant)
        for arch, sparsity in (("relu_dn", ("l1", 2.0)), ("topk", ("k", 4))):
            overrides = live.ours_overrides(args, arch, tmp_path / "run")
            assert f"hydra.run.dir={tmp_path / 'run'}" in overrides
            with initialize(config_path="../../conf", version_base="1.3"):
                cfg = to_config(compose("train", [o for o in overrides if not o.startswith("hydra.")]))
            assert (cfg.model.name, cfg.model.source) == (str(tiny_llama_dir), "hub")
            assert (cfg.layer, cfg.hook.name) == (1, "mlp_post")
            assert (cfg.data.context_size, cfg.data.lm_batch_size) == (16, 4)
            assert (cfg.train_tokens, cfg.batch_size, cfg.lr, cfg.seed) == (512, 64, 3e-4, 0)
            assert (cfg.sae.architecture, cfg.sae.d_sae) == (arch, 32)
            key, value = sparsity
            assert (cfg.l1 if key == "l1" else cfg.sae.k) == value
            assert cfg.activations.source == variant
            assert cfg.activations.val_fraction == cfg.activations.eval_fraction == 0
            assert not cfg.logger.wandb
            if variant == "live":
                assert cfg.activations.buffer_tokens == 128
    args = _live_args(tmp_path, tiny_llama_dir)
    for arch, extra in (("standard", {}), ("topk", common.SAELENS_SPARSE)):
        theirs = live.saelens_config(args, arch, extra, tiny_llama_dir, tmp_path / "ds", tmp_path / "out",
                                     d_in=96, prepend_bos=True)
        assert theirs.sae.architecture() == arch and (theirs.sae.d_in, theirs.sae.d_sae) == (96, 32)
        assert theirs.hook_name == "blocks.1.mlp.hook_post" and theirs.context_size == 16
        assert (theirs.training_tokens, theirs.train_batch_size_tokens, theirs.lr) == (512, 64, 3e-4)
        assert theirs.n_batches_in_buffer * theirs.context_size == 128
        assert theirs.store_batch_size_prompts == 4
        assert not theirs.logger.log_to_wandb and theirs.checkpoint_path is None
        assert theirs.exclude_special_tokens is True and theirs.sequence_separator_token == "eos"
        if arch == "standard":
            assert theirs.sae.l1_coefficient == 2.0
        else:
            assert theirs.sae.k == 4 and theirs.sae.use_sparse_activations
    for bad in (["--tokens", "500"], ["--buffer-rows", "100"], ["--buffer-rows", "32"]):
        with pytest.raises(SystemExit):
            _live_args(tmp_path, tiny_llama_dir, *bad)


@pytest.mark.slow
def test_live_vs_saelens_times_both_sides_on_a_tiny_model(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The whole script on a tiny random LLaMA: SAELens's runner (its model through ``saelens_model``) and
    our live ``train.py`` each train once per contender, and the report ends with the ratio as one
    key=value line. One contender per library: the others differ only in the architecture passed to the
    same command (their settings: the test above), and a pair left out is left out of the report."""
    out = tmp_path / "report.txt"
    contenders = ["ours topk", "saelens topk sparse_acts"]
    cmd = [sys.executable, "-m", "benchmarks.live_vs_saelens", "--model-dir", str(tiny_llama_dir),
           *TINY_LIVE, "--out", str(out), "--contenders", *contenders]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# command: python -m benchmarks.live_vs_saelens --model-dir ")
    assert lines[1].startswith("# commit: ") and "GFLOP/s" in lines[5]
    assert lines[7].startswith("# load average at the end: ")   # stamped at the start, so also at the end
    assert lines[10] == "# ours: train.py with activations=live"
    timed = [line.split(" s wall")[0].split()[2:-1] for line in lines if line.startswith("  rep 0 ")]
    assert sorted(" ".join(words) for words in timed) == sorted(contenders)
    keys = dict(item.split("=") for item in lines[-1].split())
    assert keys["activations"] == "live" and keys["tokens"] == "512"
    assert 0 < float(keys["topk_vs_saelens"]) < 100 and "relu_dn_vs_saelens" not in keys
    assert "ours topk / saelens topk sparse_acts whole-process tokens/s = " in out.read_text()
    assert done.stdout.rstrip().endswith(lines[-1])


def test_live_vs_saelens_report_divides_by_the_faster_saelens(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Medians per contender; each pair's ratio is SAELens's median wall (its faster TopK variant) over
    ours, also by CPU seconds; the last line holds them as key=value."""
    args = _live_args(tmp_path, tiny_llama_dir)
    run = live.Run
    runs = {"ours relu_dn": [run(10, 15, 1), run(12, 16, 1), run(11, 17, 1)],
            "saelens standard": [run(22, 30, 2), run(33, 40, 2), run(20, 35, 2)],
            "ours topk": [run(8, 10, 1)] * 3, "saelens topk": [run(40, 60, 2)] * 3,
            "saelens topk sparse_acts": [run(24, 50, 2)] * 3}
    lines = live.report(args, runs)
    assert "ours relu_dn / saelens standard whole-process tokens/s = 2.00x" in lines[-3]  # 22 / 11
    assert "worst-best pairing 1.67-3.30x; by CPU seconds 2.19x" in lines[-3]  # 20/12, 33/10, 35/16
    assert "ours topk / saelens topk sparse_acts (the faster SAELens) whole-process tokens/s = 3.00x" \
        in lines[-2]  # 24 / 8 (SAELens's dense TopK is slower)
    keys = dict(item.split("=") for item in lines[-1].split())
    assert keys["relu_dn_vs_saelens"] == "2.000" and keys["relu_dn_vs_saelens_cpu"] == "2.188"
    assert keys["topk_vs_saelens"] == "3.000" and keys["topk_vs_saelens_cpu"] == "5.000"
    assert keys["tokens_per_s_saelens_standard"] == str(round(512 / 22))
