"""Streaming DataModule: determinism, rank/worker sharding, equal batch counts, splits, normalization,
resume."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sae_lightning.cache import CacheError, CacheKey, build_cache
from sae_lightning.cache.datamodule import ActivationDataModule
from sae_lightning.config import ActivationsConfig

N, D, B = 2000, 8, 16


class Recorder(L.LightningModule):
    """Trains a throwaway linear map and keeps the row ids (column 0) of every batch it got; with
    ``out_dir`` it saves them per rank at the end (module level, so ddp_spawn can pickle it)."""

    def __init__(self, out_dir: Path | None = None):
        super().__init__()
        self.lin, self.seen, self.out_dir = torch.nn.Linear(D, 1), [], out_dir

    def training_step(self, batch, _):
        self.seen.append(batch[:, 0].clone())
        return self.lin(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-6)

    def on_train_end(self):
        if self.out_dir is not None:
            torch.save(torch.cat(self.seen), self.out_dir / f"rank{self.global_rank}.pt")


@pytest.fixture
def array_path(tmp_path) -> Path:
    """Rows whose column 0 is the row index, so every streamed row says which one it is."""
    x = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32) * 5
    x[:, 0] = np.arange(N)
    np.save(tmp_path / "acts.npy", x)
    return tmp_path / "acts.npy"


def make_dm(path, seed: int = 0, rank: int = 0, world: int = 1, batch_size: int = B,
            **cfg) -> ActivationDataModule:
    cfg = {"shard_rows": 100, "val_fraction": 0.1, "shuffle_buffer": 300, "normalize": False, **cfg}
    dm = ActivationDataModule(path, ActivationsConfig(source="file", path=str(path), **cfg), batch_size, seed)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)   # what Lightning sets before setup()
    dm.setup("fit")
    dm.trainer = None
    return dm


def ids(batches) -> np.ndarray:
    return np.concatenate([b[:, 0].numpy() for b in batches]).astype(np.int64)


def take(loader, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(loader), n))


def test_batches_are_float32_and_deterministic_given_seed(array_path):
    a = take(make_dm(array_path).train_dataloader(), 30)
    b = take(make_dm(array_path).train_dataloader(), 30)
    c = take(make_dm(array_path, seed=1).train_dataloader(), 30)
    assert a[0].shape == (B, D) and a[0].dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert (ids(a) != ids(c)).any()


def test_an_epoch_visits_each_training_row_at_most_once_and_reshuffles(array_path):
    dm = make_dm(array_path)
    train_rows = sum(dm.source.shard_sizes[s] for s in dm.train_shards)
    per_epoch = train_rows // B
    two = ids(take(dm.train_dataloader(), 2 * per_epoch))
    first, second = two[:per_epoch * B], two[per_epoch * B:]
    assert len(set(first)) == len(first) >= train_rows - B + 1
    assert len(set(second)) == len(second)
    assert not np.array_equal(first, second)
    assert not np.array_equal(first[:B], np.sort(first[:B]))            # rows are shuffled...
    window = make_dm(array_path, shuffle_buffer=0)
    assert np.array_equal(np.diff(ids(take(window.train_dataloader(), 1))), np.ones(B - 1))  # ...unless 0


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_read_disjoint_rows_with_equal_batch_counts(array_path, workers):
    dms = [make_dm(array_path, rank=r, world=2, num_workers=workers) for r in range(2)]
    consumers = 2 * max(1, workers)
    spec = dms[0]._spec(dms[0].train_shards, True)
    per_epoch = spec.batches_per_epoch(max(1, workers))     # batches per consumer per epoch
    epoch = [ids(take(dm.train_dataloader(), per_epoch * max(1, workers))) for dm in dms]
    seen = np.concatenate(epoch)
    assert len(set(seen)) == len(seen) == consumers * per_epoch * B    # disjoint across (rank, worker)
    val = [list(dm.val_dataloader()) for dm in dms]
    assert len(val[0]) == len(val[1]) > 0                                # equal finite counts per rank
    val_ids = np.concatenate([ids(v) for v in val])
    assert len(set(val_ids)) == len(val_ids)


def test_validation_split_is_by_shard_and_disjoint_from_training(array_path):
    dm = make_dm(array_path, eval_fraction=0.0)
    assert dm.val_shards == list(range(dm.source.n_shards - len(dm.val_shards), dm.source.n_shards))
    val = ids(dm.val_dataloader())
    train = ids(take(dm.train_dataloader(), 300))
    assert not set(val) & set(train)
    assert val.min() >= N - sum(dm.source.shard_sizes[s] for s in dm.val_shards)
    assert np.array_equal(ids(dm.val_dataloader()), val)                # the same set every validation


def test_evaluation_has_its_own_split_after_validation(array_path):
    """Three disjoint splits by shard: train, then validation (run selection), then evaluation (the rows
    evaluate.py reports on), each holding at least its fraction of the rows."""
    dm = make_dm(array_path, val_fraction=0.1, eval_fraction=0.15)
    n = dm.source.n_shards
    assert dm.train_shards + dm.val_shards + dm.eval_shards == list(range(n))
    assert dm.val_shards and dm.eval_shards and dm.eval_split == "eval"
    rows = {name: sum(dm.source.shard_sizes[s] for s in shards)
            for name, shards in (("val", dm.val_shards), ("eval", dm.eval_shards))}
    assert rows["val"] >= 0.1 * N and rows["eval"] >= 0.15 * N
    evaluated = np.concatenate([r.acts[:, 0].numpy() for r in dm.eval_rows(max_tokens=N)]).astype(int)
    assert evaluated.tolist() == list(range(N - rows["eval"], N))       # exactly the last rows, in order
    assert not set(evaluated) & set(ids(dm.val_dataloader()))
    assert not set(evaluated) & set(ids(take(dm.train_dataloader(), 300)))
    assert make_dm(array_path, eval_fraction=0.0).eval_split == "validation"  # fallback, recorded


def test_norm_scale_gives_mean_norm_sqrt_d_and_rows_stay_raw(tmp_path):
    """``norm_scale`` is for the SAE (its ``input_scale``); the stream itself yields the raw rows."""
    raw = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32) * 5 + 1
    np.save(tmp_path / "x.npy", raw)
    dm = make_dm(tmp_path / "x.npy", normalize=True)
    x = torch.cat(take(dm.train_dataloader(), 100))
    assert dm.norm_scale != 1.0
    assert (x * dm.norm_scale).norm(dim=1).mean().item() == pytest.approx(np.sqrt(D), rel=0.02)
    assert all((torch.from_numpy(raw) == row).all(1).any() for row in x[:20])  # rows of the array as they are
    assert (dm.sample(500) * dm.norm_scale).norm(dim=1).mean().item() == pytest.approx(np.sqrt(D), rel=0.05)
    assert make_dm(tmp_path / "x.npy", normalize=False).norm_scale == 1.0


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_resumes_at_the_exact_next_batch(array_path, workers):
    dm = make_dm(array_path, num_workers=workers, shuffle_buffer=50)
    per_epoch = dm._spec(dm.train_shards, True).batches_per_epoch(max(1, workers))
    full = take(dm.train_dataloader(), 2 * per_epoch + 9)      # crosses epoch boundaries of every worker
    for consumed in (7, 2 * per_epoch + 3):
        resumed = make_dm(array_path, num_workers=workers, shuffle_buffer=50)
        resumed.load_state_dict({**dm.state_dict(), "batches": consumed})
        got = take(resumed.train_dataloader(), 6)
        assert all(torch.equal(x, y) for x, y in zip(got, full[consumed:consumed + 6], strict=True))


def test_resume_through_a_lightning_checkpoint(array_path, tmp_path):
    def fit(steps: int, ckpt: str | None = None) -> list[torch.Tensor]:
        module = Recorder()
        trainer = L.Trainer(max_steps=steps, max_epochs=-1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                            callbacks=[ModelCheckpoint(tmp_path / "ck", every_n_train_steps=4, save_top_k=-1,
                                                       filename="s{step}", auto_insert_metric_name=False)])
        trainer.fit(module, datamodule=make_dm(array_path), ckpt_path=ckpt)
        return module.seen

    straight = fit(10)
    resumed = fit(10, str(tmp_path / "ck" / "s4.ckpt"))
    assert len(resumed) == 6
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight[4:], strict=True))


@pytest.mark.timeout(300)
def test_real_ddp_spawn_ranks_and_workers_read_disjoint_rows(array_path, tmp_path):
    """Two gloo ranks, each with a dataloader worker (which has no RANK of its own under ddp_spawn)."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0)
    trainer.fit(Recorder(tmp_path), datamodule=make_dm(array_path, num_workers=1))
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 3 * B
    both = torch.cat(seen)
    assert len(set(both.tolist())) == len(both)       # no row trained twice across ranks


def test_memory_is_bounded_by_the_window_not_the_cache(array_path):
    dm = make_dm(array_path, shuffle_buffer=250)
    loader = iter(dm.train_dataloader())
    mapped = []
    for _ in range(400):                      # more than three epochs
        next(loader)
        mapped.append(len(dm.source.mapped_shards))
    assert max(mapped) <= 240 // 32 + 2      # the shards of one window (250 rounded to batches) of 57


def test_too_little_data_is_a_clear_error(array_path, tmp_path):
    with pytest.raises(CacheError, match=r"training split has .* rows, fewer than batch_size=4096"):
        make_dm(array_path, batch_size=4096).train_dataloader()
    key = CacheKey(model="m", data="d", hooks=("L0.x",), context_size=4, n_tokens=8)
    one_shard = build_cache(key, [torch.ones(2, 4, dtype=torch.long)], lambda t: {"L0.x": t[..., None] * 1.0},
                            None, tmp_path, shard_rows=100)["L0.x"]
    with pytest.raises(CacheError, match=r"has 1 shard\(s\): too few to hold out activations\.val_fraction"):
        ActivationDataModule(one_shard, ActivationsConfig(val_fraction=0.05), 2, 0)
    assert make_dm(array_path, val_fraction=0.0).val_dataloader() == []


def test_eval_rows_carry_token_doc_and_pos_from_the_cache(tmp_path):
    embed = torch.randn(100, D, generator=torch.Generator().manual_seed(0))
    batches = [torch.randint(1, 100, (4, 8), generator=torch.Generator().manual_seed(i)) for i in range(10)]
    key = CacheKey(model="m", data="d", hooks=("L0.x",), context_size=8, n_tokens=320)
    path = build_cache(key, batches, lambda t: {"L0.x": embed[t]}, None, tmp_path, shard_rows=32)["L0.x"]
    acts_cfg = ActivationsConfig(shard_rows=32, val_fraction=0.1, eval_fraction=0.2)
    dm = ActivationDataModule(path, acts_cfg, 8, 0)
    assert (dm.d_in, len(dm.val_shards), len(dm.eval_shards)) == (D, 1, 2)
    rows = list(dm.eval_rows(max_tokens=50, batch_size=8))
    assert sum(len(r.tokens) for r in rows) == 50
    tokens = torch.cat(batches)
    for r in rows:
        assert torch.equal(tokens[r.doc, r.pos], r.tokens)
        torch.testing.assert_close(r.acts, embed[r.tokens])  # raw activations
        assert r.doc.min() >= 8 * 4                 # the held-out shards are the last rows
    assert np.array_equal(dm.context(int(rows[0].doc[0])), tokens[rows[0].doc[0]].numpy())
