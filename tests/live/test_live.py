"""``activations=live``: the LM inside training. The stream's layout (windows, shuffle, ranks, held-out
contexts), its resume and memory bound, transcoder pairs from one forward, bad inputs, and whole runs of
``train.py`` (SIGKILL + resume bit-identical, ``trainer=ddp_sim``, ``evaluate.py``) without a cache."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from sae_lightning.cache.reader import NORM_SAMPLE_ROWS
from sae_lightning.checks import ConfigError
from sae_lightning.live import LiveDataModule
from sae_lightning.live.contexts import Split, training_contexts
from sae_lightning.train.step import DATA_INIT_ROWS
from tests.train.test_resume import (
    _wait_for_step,
    batch_log,
    batches_trained,
    ckpt,
    configure,
    record_env,
    run_train_py,
)

TRAIN = Path(__file__).resolve().parents[2] / "train.py"
EVALUATE = Path(__file__).resolve().parents[2] / "evaluate.py"
CTX, BATCH = 32, 64


def live_overrides(model_dir: Path, text: Path, **extra: object) -> list[str]:
    """A tiny live run: the tiny GPT-2 (3 layers, 64 positions) on the TinyStories sample."""
    over: dict[str, object] = {
        "activations": "live", "activations.buffer_tokens": 4 * BATCH, "model.name": model_dir,
        "model.device": "cpu", "data": "tinystories_local", "data.path": text, "data.context_size": CTX,
        "data.n_tokens": 4096, "data.lm_batch_size": 8, "layer": 1, "hook": "mlp_post", "batch_size": BATCH,
        "train_tokens": 40 * BATCH, "logger": "csv", "trainer": "cpu", "trainer.progress_bar": "false",
        "trainer.limit_val_batches": 2, "trainer.val_every_n_steps": 25,
        "trainer.checkpoint_every_n_steps": 10}
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


@pytest.fixture(scope="module")
def text(tmp_path_factory, tinystories_path) -> Path:
    """The first ~1,500 stories of the sample: enough for every test, quick to tokenize."""
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    with tinystories_path.open(encoding="utf-8") as f:
        path.write_text("".join(islice(f, 6000)), encoding="utf-8")
    return path


def datamodule(tiny_gpt2, tiny_gpt2_dir: Path, text: Path, **extra: object) -> LiveDataModule:
    cfg, _ = configure(live_overrides(tiny_gpt2_dir, text, **extra))
    return LiveDataModule(cfg, lm=tiny_gpt2)


def rows_of_contexts(dm: LiveDataModule, contexts) -> torch.Tensor:
    """The trained rows of ``contexts`` computed directly, one context at a time."""
    out = []
    for c in contexts:
        acts = dm.lm.activations(torch.from_numpy(c.tokens)[None], dm.hooks)[dm.hooks[0]][0]
        out.append(acts[torch.from_numpy(c.kept)])
    return torch.cat(out)


def take(dm: LiveDataModule, n: int, start: int = 0) -> list[torch.Tensor]:
    dm._resume_batches = start
    return list(islice(iter(dm.train_dataloader()), n))


def test_each_window_serves_its_own_rows_once_in_a_seeded_order(tiny_gpt2, tiny_gpt2_dir, text) -> None:
    """Window w holds rows [w S, (w+1) S) of the rank's row stream (the trained positions of its training
    contexts, in order), each served exactly once, in an order that depends on the seed."""
    dm = datamodule(tiny_gpt2, tiny_gpt2_dir, text)
    batches = take(dm, 8)   # two windows of 4 batches
    contexts = list(islice(training_contexts(dm.text, dm.split, 0, 1, repeat=False), 40))
    want = rows_of_contexts(dm, contexts)[: 2 * dm.window]
    for w in range(2):
        got = torch.cat(batches[4 * w: 4 * w + 4])
        mine = want[w * dm.window:(w + 1) * dm.window]
        order = lambda t: t[torch.argsort(t[:, 0] * 1e3 + t[:, 1])]  # noqa: E731 - rows as a set
        torch.testing.assert_close(order(got), order(mine), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, mine)   # shuffled
    other = datamodule(tiny_gpt2, tiny_gpt2_dir, text, seed=1)
    assert not torch.equal(torch.cat(take(other, 4)), torch.cat(batches[:4]))


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_resumed_stream_continues_with_exactly_the_next_batches(tiny_gpt2, tiny_gpt2_dir, text,
                                                                   prefetch) -> None:
    dm = datamodule(tiny_gpt2, tiny_gpt2_dir, text, **{"activations.prefetch": prefetch})
    full = take(dm, 11)
    for start in (3, 4, 9):
        tail = take(dm, 11 - start, start=start)
        assert all(torch.equal(a, b) for a, b in zip(tail, full[start:], strict=True)), start
    reference = datamodule(tiny_gpt2, tiny_gpt2_dir, text, **{"activations.prefetch": not prefetch})
    assert all(torch.equal(a, b) for a, b in zip(take(reference, 11), full, strict=True))


@pytest.mark.parametrize("prefetch", [True, False])
def test_window_memory_is_bounded_by_the_buffer(tiny_gpt2, tiny_gpt2_dir, text, prefetch) -> None:
    """At most two windows (one served, one filled) exist with prefetch, one without: the ``2 x
    buffer_tokens x d x 4`` bytes of docs/data-and-caching.md, followed through the buffers' lifetimes."""
    dm = datamodule(tiny_gpt2, tiny_gpt2_dir, text, **{"activations.prefetch": prefetch})
    window_bytes = dm.window * dm.d_in * 4
    for _ in take(dm, 30):   # 7.5 windows
        assert dm.gauge.bytes <= (2 if prefetch else 1) * window_bytes
    assert dm.gauge.peak == (2 if prefetch else 1) * window_bytes


@pytest.mark.parametrize("prefetch", [True, False])
def test_the_last_window_holds_only_the_rows_the_run_trains_on(tiny_gpt2, tiny_gpt2_dir, text,
                                                               prefetch) -> None:
    """A budget ending inside a window (10 batches, windows of 4) runs the LM for 10 batches' rows, not 12;
    the cut window serves the rows it would have held first, and a resume inside it gives the same."""
    dm = datamodule(tiny_gpt2, tiny_gpt2_dir, text, train_tokens=10 * BATCH,
                    **{"activations.prefetch": prefetch})
    seen = []
    forward = dm._forward
    dm._forward = lambda tokens: seen.append(tokens.shape[0]) or forward(tokens)   # type: ignore[method-assign]
    batches = list(iter(dm.train_dataloader()))
    assert len(batches) == 10 and dm.gauge.peak <= (2 if prefetch else 1) * dm.window * dm.d_in * 4
    contexts = list(islice(training_contexts(dm.text, dm.split, 0, 1, repeat=False), 40))
    want = rows_of_contexts(dm, contexts)[: 10 * BATCH]
    order = lambda t: t[torch.argsort(t[:, 0] * 1e3 + t[:, 1])]  # noqa: E731 - rows as a set
    torch.testing.assert_close(order(torch.cat(batches[8:])), order(want[8 * BATCH:]), rtol=1e-5, atol=1e-5)
    held = np.cumsum([c.rows for c in contexts])
    ten, twelve = (int(np.searchsorted(held, n * BATCH)) + 1 for n in (10, 12))   # contexts holding n batches
    assert ten <= sum(seen) < twelve
    assert all(torch.equal(a, b) for a, b in zip(take(dm, 1, start=9), batches[9:], strict=True))


def test_the_window_thread_stops_at_the_end_of_fit(tiny_gpt2, tiny_gpt2_dir, text) -> None:
    """A stream left open (Lightning stops at max_steps without closing it) has its thread stopped by
    ``teardown``: a thread still inside a torch op when the interpreter exits aborts the process."""
    import threading

    dm = datamodule(tiny_gpt2, tiny_gpt2_dir, text)
    it = iter(dm.train_dataloader())
    next(it)
    assert any(t.name == "live-activations" for t in threading.enumerate())
    dm.teardown("fit")   # stops the window being computed between two forward chunks
    assert not any(t.name == "live-activations" for t in threading.enumerate())


def test_ranks_read_disjoint_contexts_with_equal_batch_counts(tiny_gpt2, tiny_gpt2_dir, text) -> None:
    dm = datamodule(tiny_gpt2, tiny_gpt2_dir, text)
    seen, val = [], []
    for rank in (0, 1):
        dm.rank, dm.world_size, dm._val = rank, 2, None
        seen.append({c.index for c in islice(training_contexts(dm.text, dm.split, rank, 2, False), 200)})
        val.append(dm.val_batches())
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 200
    assert not (seen[0] | seen[1]) & set(dm.held_out)   # no held-out context is trained on
    # 7 validation contexts: 4 and 3 per rank, ~93 rows on the smaller: one batch on each
    assert len(val[0]) == len(val[1]) == 1 and not torch.equal(val[0][0], val[1][0])


def test_held_out_contexts_are_the_ones_a_cache_holds_out(tiny_gpt2, tiny_gpt2_dir, text) -> None:
    """A cache of data.n_tokens=4096 (128 contexts) holds out its last 5 % (eval) and the 5 % before (val);
    a live run holds out the same contexts and trains on the others, beyond n_tokens too."""
    dm = datamodule(tiny_gpt2, tiny_gpt2_dir, text)
    assert dm.split == Split(128, range(114, 121), range(121, 128))
    first = [c.index for c in islice(training_contexts(dm.text, dm.split, 0, 1, False), 130)]
    assert first == [*range(114), *range(128, 144)]


def test_eval_rows_carry_their_context_and_equal_the_model_s_activations(tiny_gpt2, tiny_gpt2_dir,
                                                                         text) -> None:
    dm = datamodule(tiny_gpt2, tiny_gpt2_dir, text)
    rows = list(dm.eval_rows(200, batch_size=50))
    assert [len(r.acts) for r in rows] == [50, 50, 50, 50]
    r = rows[1]
    assert set(r.doc.tolist()) <= set(dm.split.eval)
    for i in (0, 17, 49):
        context = torch.from_numpy(dm.context(int(r.doc[i])))
        assert context[r.pos[i]] == r.tokens[i]
        want = tiny_gpt2.activations(context[None], dm.hooks)[dm.hooks[0]][0, r.pos[i]]
        torch.testing.assert_close(r.acts[i], want, rtol=1e-5, atol=1e-5)


def test_transcoder_pairs_come_from_one_forward(tiny_gpt2, tiny_gpt2_dir, text) -> None:
    """mlp_in -> mlp_out pairs: every target row is the MLP applied to its input row, in training batches,
    samples and evaluation rows alike."""
    dm = datamodule(tiny_gpt2, tiny_gpt2_dir, text, hook="mlp_in", **{"target.name": "mlp_out"})
    mlp = tiny_gpt2.blocks[1].mlp
    assert (dm.d_in, dm.d_out) == (32, 32)
    pairs = [*take(dm, 5), (dm.sample(100), dm.sample_targets(100))]
    pairs.append(next(iter((r.acts, r.target) for r in dm.eval_rows(64))))
    with torch.no_grad():
        for x, y in pairs:
            torch.testing.assert_close(mlp(x), y, rtol=1e-4, atol=1e-5)


def test_a_bfloat16_model_gives_float32_rows_close_to_the_float32_model(tiny_gpt2, tiny_gpt2_dir,
                                                                         text) -> None:
    """``model.dtype=bfloat16``: the LM runs in bf16, the windows hold float32 rows for the SAE."""
    cfg, _ = configure(live_overrides(tiny_gpt2_dir, text, **{"model.dtype": "bfloat16"}))
    bf16 = LiveDataModule(cfg)
    assert next(bf16.lm.model.parameters()).dtype == torch.bfloat16
    x16, x32 = take(bf16, 1)[0], take(datamodule(tiny_gpt2, tiny_gpt2_dir, text), 1)[0]
    assert x16.dtype == torch.float32
    torch.testing.assert_close(x16, x32, rtol=0.1, atol=0.02)


def test_scale_and_samples_come_from_training_rows(tiny_gpt2, tiny_gpt2_dir, text) -> None:
    dm = datamodule(tiny_gpt2, tiny_gpt2_dir, text)
    x = dm.sample(100)
    assert x.shape == (100, 128) and torch.equal(x, dm.sample(100))
    assert not torch.equal(x, dm.sample(100, seed=1))
    sample = dm._sample(10**6, 0)[0]   # at most one buffer
    assert len(sample) == dm.window
    assert float((sample * dm.norm_scale).norm(dim=1).mean()) == pytest.approx(128 ** 0.5, rel=1e-5)


def test_the_scale_and_the_start_share_one_forward_over_the_first_rows(tiny_gpt2, tiny_gpt2_dir, text,
                                                                       monkeypatch) -> None:
    """A run's norm scale and its data-dependent start (``sample(DATA_INIT_ROWS)``) read one sample of the
    first training rows, at any seed: the model runs over those rows once."""
    dm = datamodule(tiny_gpt2, tiny_gpt2_dir, text, seed=3)
    calls = []
    forward = dm._forward
    monkeypatch.setattr(dm, "_forward", lambda tokens: calls.append(len(tokens)) or forward(tokens))
    scale = dm.norm_scale
    rows = sum(calls)
    assert rows > 0
    x = dm.sample(DATA_INIT_ROWS)
    assert sum(calls) == rows   # no second forward
    n = min(DATA_INIT_ROWS, dm.window)
    assert x.shape == (n, 128) and torch.equal(x, dm._sample(NORM_SAMPLE_ROWS, 3)[0])
    assert scale == pytest.approx(128 ** 0.5 / float(x.double().norm(dim=1).mean()), rel=1e-9)


def test_the_first_window_takes_the_samples_forward_instead_of_running_the_lm_again(
        tiny_gpt2, tiny_gpt2_dir, text, monkeypatch) -> None:
    """The sample of a fresh run (norm scale, start) runs the LM over the first training contexts; the
    stream's first window takes those forward chunks instead of computing them again, and every batch
    equals that of a stream that computed all its rows itself."""
    extra = {"activations.prefetch": "false"}   # windows computed on demand: the forwards can be counted
    reference = take(datamodule(tiny_gpt2, tiny_gpt2_dir, text, **extra), 8)   # no sample drawn
    dm = datamodule(tiny_gpt2, tiny_gpt2_dir, text, **extra)
    calls = []
    forward = dm._forward
    monkeypatch.setattr(dm, "_forward", lambda tokens: calls.append(len(tokens)) or forward(tokens))
    assert dm.norm_scale > 0 and calls
    sampled = len(calls)
    batches = iter(dm.train_dataloader())
    first_window = [next(batches) for _ in range(4)]   # window 0: 4 batches, inside the sample's rows
    assert sum(calls[:sampled]) > dm.cfg.data.lm_batch_size   # the sample ran two chunks or more
    # window 0 ran only its last chunk, cut short by the window's end (the sample's chunk there is longer)
    assert sum(calls[sampled:]) < dm.cfg.data.lm_batch_size and dm._first_chunks == {}
    sampled = len(calls)
    second_window = [next(batches) for _ in range(4)]
    assert len(calls) > sampled   # window 1 lies past the sample: computed
    for got, want in zip(first_window + second_window, reference, strict=True):
        assert torch.equal(got, want)


def test_bad_inputs_fail_before_the_first_batch(tiny_gpt2, tiny_gpt2_dir, text) -> None:
    with pytest.raises(ConfigError, match=r"holds \d+ training tokens .* fewer than train_tokens=10000000 .*"
                                          r"activations.repeat_text=true"):
        datamodule(tiny_gpt2, tiny_gpt2_dir, text, train_tokens=10_000_000)
    # validation rows are bounded by the validation contexts too: 7 contexts of 32 tokens fit 256 rows
    assert configure(live_overrides(tiny_gpt2_dir, text, **{"trainer.limit_val_batches": 20}))[0]
    repeated = datamodule(tiny_gpt2, tiny_gpt2_dir, text, train_tokens=10_000_000,
                          **{"activations.repeat_text": "true"})
    assert len(take(repeated, 1)) == 1
    for extra, match in [({"activations.buffer_tokens": 32}, "must hold at least one batch"),
                         ({"model.device": "cuda:3"}, "model.device='cuda:3' does not exist"),
                         ({"model.device": "gpu7"}, "not a device name")]:
        with pytest.raises(ConfigError, match=match):
            cfg, _ = configure(live_overrides(tiny_gpt2_dir, text, **extra))
            LiveDataModule(cfg)
    from sae_lightning.lm import LayoutError
    with pytest.raises(LayoutError, match=r"hook.module='mlp.nonexistent': no such module"):
        datamodule(tiny_gpt2, tiny_gpt2_dir, text, hook="module", **{"hook.module": "mlp.nonexistent"})
    with pytest.raises(ValueError, match="layer"):
        datamodule(tiny_gpt2, tiny_gpt2_dir, text, layer=7)


# ----- whole runs ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_then_resume_ends_bit_identical_and_writes_no_cache(tmp_path, tiny_gpt2_dir, text) -> None:
    over = [*live_overrides(tiny_gpt2_dir, text), f"activations.cache_dir={tmp_path / 'cache'}"]
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
    steps = [int(line.split("\t")[0]) for line in batch_log(run)]
    assert steps.count(20) == 2   # resumed from the step-20 checkpoint
    reference = batch_log(tmp_path / "ref")
    assert batches_trained(batch_log(run)) == reference and len(reference) == 40
    want, got = ckpt(tmp_path / "ref/checkpoints/final.ckpt"), ckpt(run / "checkpoints/final.ckpt")
    for name, tensor in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name
    assert not (tmp_path / "cache").exists()

    out = subprocess.run([sys.executable, str(EVALUATE), f"ckpt_path={run}/checkpoints/final.ckpt",
                          "downstream_contexts=4", "monosemanticity=false", "report_latents=2",
                          "report_neurons=2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["eval_split"] == "eval" and metrics["n_tokens"] > 0
    assert np.isfinite(metrics["ce_loss_recovered"]) and (run / "eval" / "report.html").exists()
    assert not (tmp_path / "cache").exists()


class _RecordRank(L.Callback):
    """Records every training batch of this rank and saves them with the rank's final state."""

    def __init__(self, out: Path) -> None:
        self.out, self.batches = out, []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, i: int) -> None:
        self.batches.append(batch.detach().clone())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"batches": self.batches, "state": state}, self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_train_on_disjoint_contexts_and_end_equal(tmp_path, tiny_gpt2, tiny_gpt2_dir,
                                                            text) -> None:
    """Two gloo processes, each with its own LM replica: every batch row comes from a context of that rank
    alone, both ranks train the same number of batches and end with bit-identical weights."""
    from sae_lightning.train.module import SAEModule

    cfg, config = configure(live_overrides(tiny_gpt2_dir, text, train_tokens=8 * BATCH))
    dm = LiveDataModule(cfg, lm=tiny_gpt2)
    module = SAEModule(config, d_in=dm.d_in)
    module.sae.set_input_scale(dm.norm_scale)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=8, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[_RecordRank(tmp_path)])
    trainer.fit(module, datamodule=dm)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    contexts = list(islice(training_contexts(dm.text, dm.split, 0, 1, repeat=False), 60))
    rows = torch.cat([rows_of_contexts(dm, [c]) for c in contexts])
    owner = torch.cat([torch.full((c.rows,), c.index) for c in contexts])
    read = []
    for rank, r in enumerate(ranks):
        assert len(r["batches"]) == 8
        match = torch.cdist(torch.cat(r["batches"]), rows) < 1e-3   # [batch rows, context rows]
        owners = [set(owner[m].tolist()) for m in match]
        assert all(owners)   # every row is a row of one of these contexts ...
        assert all(any(i % 2 == rank for i in o) for o in owners)   # ... of this rank's (index j % 2 = rank)
        read.append(set().union(*(o for o in owners if len(o) == 1)))   # rows found in one context only
    assert read[0] and read[1] and not read[0] & read[1]
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], tensor), name


@pytest.mark.slow
def test_ddp_sim_run_trains_both_ranks_live(tmp_path, tiny_gpt2_dir, text) -> None:
    """``python train.py trainer=ddp_sim activations=live``: two processes, each its own LM, the doubled
    batch counted in the summary, and the run evaluates."""
    run = tmp_path / "run"
    over = [*live_overrides(tiny_gpt2_dir, text, trainer="ddp_sim", train_tokens=20 * BATCH),
            f"hydra.run.dir={run}"]
    out = run_train_py(over, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 20
    assert summary["tokens"] == 2 * 20 * BATCH


def _sweep(tmp_path: Path, name: str, archs: str, over: list[str], *extra: str) -> list[dict]:
    """A ``-m`` sweep over ``sae=<archs>``; the jobs' summaries (every one finished) in job order."""
    from tests.sweep.test_sweep import train_py

    sweep = tmp_path / name
    train_py("-m", f"sae={archs}", *over, *extra, f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=900)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    summaries = [json.loads((job / "summary.json").read_text()) for job in jobs]
    assert [s["status"] for s in summaries] == ["finished"] * len(archs.split(",")), summaries
    assert all(arch in (sweep / "comparison.html").read_text() for arch in archs.split(","))
    return summaries


@pytest.mark.slow
def test_every_architecture_trains_live_in_sweeps(tmp_path, tiny_gpt2_dir, text) -> None:
    """Every architecture with resampling in one sweep (the comparison page lists them), and the SLURM path
    (submitit's local executor: a job array, each job its own process and LM, logs under .submitit/) whose
    jobs train with the target-L0 controller."""
    over = live_overrides(tiny_gpt2_dir, text, train_tokens=12 * BATCH, callbacks="resample",
                          **{"callbacks.resample_steps": "[6]", "callbacks.resample_sample_rows": 128,
                             "latents.dead_window_tokens": 4 * BATCH, "sae.dict_mult": 2})
    summaries = _sweep(tmp_path, "all", "relu,relu_dn,gated,jumprelu,topk,batchtopk,matryoshka", over)
    assert all(s["steps"] == 12 for s in summaries)
    steered = _sweep(tmp_path, "submitit", "relu,jumprelu", over, "sae.target_l0=8",
                     "hydra/launcher=local_parallel")
    assert (tmp_path / "submitit" / ".submitit").is_dir()
    assert [s["config"]["sae"]["target_l0"] for s in steered] == [8, 8]
    for job in ("000_sae=relu", "001_sae=jumprelu"):
        assert "train/l0_target" in (tmp_path / "submitit" / job / "csv" / "metrics.csv").read_text()


def test_validation_rows_are_capped_at_one_buffer(tiny_gpt2, tiny_gpt2_dir, text) -> None:
    """More validation batches than a buffer holds: validation keeps one buffer of rows (the memory bound),
    so the reference setup's limit_val_batches works with any buffer."""
    dm = datamodule(tiny_gpt2, tiny_gpt2_dir, text,
                    **{"trainer.limit_val_batches": 20, "data.n_tokens": 100_000})
    batches = dm.val_batches()
    assert len(batches) == dm.window // BATCH == 4 and all(b.shape == (BATCH, dm.d_in) for b in batches)
