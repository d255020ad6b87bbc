"""Activation cache: key, build, reuse, resume, locking, integrity errors, array import, CLI."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_lightning.cache import (
    ActivationCache,
    ArraySource,
    CacheBuildError,
    CacheError,
    CacheKey,
    build_cache,
    cache_path,
)
from sae_lightning.cache.__main__ import main as cli
from sae_lightning.cache.build import partial_path

VOCAB, CTX, BATCH, N_BATCHES, BOS = 500, 8, 4, 10, 0
EMBED = torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(0))
KEY = CacheKey(model="hub:toy@main", data="sha:abc", hooks=("L0.a", "L1.b"), context_size=CTX,
               n_tokens=CTX * BATCH * N_BATCHES, model_label="toy", data_label="stories")


def token_batches(n: int = N_BATCHES):
    """Deterministic token batches with BOS in column 0 (excluded, as a special token)."""
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        t = torch.randint(1, VOCAB, (BATCH, CTX), generator=g)
        t[:, 0] = BOS
        yield t


class Model:
    """Stand-in for the LM: a fixed function of (token, position), counting its forward passes."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        pos = torch.arange(tokens.shape[1]).view(1, -1, 1)
        return {"L0.a": EMBED[tokens] + pos, "L1.b": EMBED[tokens][..., :8] * 2}


def exclude_bos(tokens: torch.Tensor) -> torch.Tensor:
    return tokens == BOS


def build(root: Path, model: Model | None = None, key: CacheKey = KEY, shard_rows: int = 20, **kw):
    return build_cache(key, token_batches(), model or Model(), exclude_bos, root, shard_rows=shard_rows, **kw)


def test_key_is_stable_readable_and_sensitive_to_every_identity_field():
    assert KEY.hash == "8a027bb7acaa"   # changing how keys hash orphans every cache users have built
    assert KEY.for_hook("L0.a").name == f"toy-L0.a-stories-ctx8-320-f32-{KEY.for_hook('L0.a').hash}"
    relabelled = CacheKey(**{**KEY.to_dict(), "hooks": KEY.hooks, "model_label": "other", "data_label": ""})
    assert relabelled.hash == KEY.hash and relabelled == KEY
    for field, value in [("model", "hub:toy@v2"), ("data", "sha:abd"), ("hooks", ("L0.a",)),
                         ("context_size", 16), ("n_tokens", 321), ("dtype", "bfloat16"),
                         ("prepend_bos", False), ("exclude_special", False), ("format_version", 0)]:
        assert CacheKey(**{**KEY.to_dict(), "hooks": KEY.hooks, field: value}).hash != KEY.hash, field


def test_build_stores_every_kept_row_with_its_token_doc_and_pos(tmp_path):
    model = Model()
    paths = build(tmp_path, model)
    assert model.calls == N_BATCHES          # both hooks from one forward pass per batch
    batches = torch.cat(list(token_batches()))
    for hook in KEY.hooks:
        cache = ActivationCache(paths[hook], expected_key=KEY.for_hook(hook))
        assert cache.n_rows == N_BATCHES * BATCH * (CTX - 1)     # BOS rows excluded
        assert cache.shard_sizes == [20] * 14
        rows = [cache.shard(i) for i in range(cache.n_shards)]
        tok, doc, pos = (np.concatenate([r[k] for r in rows]) for k in ("tokens", "doc", "pos"))
        acts = np.concatenate([r["acts"] for r in rows])
        assert (batches[doc, pos].numpy() == tok).all() and (pos > 0).all()
        e = EMBED[torch.from_numpy(tok.astype(np.int64))]
        expected = e + torch.from_numpy(pos).view(-1, 1) if hook == "L0.a" else e[:, :8] * 2
        np.testing.assert_allclose(acts, expected.numpy(), rtol=1e-6)
        np.testing.assert_array_equal(cache.context(13), batches[13].numpy())
        norms = np.linalg.norm(acts, axis=1)
        assert cache.meta["mean_norm"] == pytest.approx(norms[np.arange(len(norms)) % 20 % 8 == 0].mean())
        assert cache.norm_scale == pytest.approx(np.sqrt(cache.d) / cache.meta["mean_norm"])


def test_same_key_reuses_the_cache_and_says_so(tmp_path, caplog):
    build(tmp_path)
    again = Model()
    with caplog.at_level(logging.INFO, logger="sae_lightning.cache"):
        paths = build(tmp_path, again)
    assert again.calls == 0
    assert f"reusing activation cache {paths['L0.a']}" in caplog.text


def test_bf16_storage_round_trips(tmp_path):
    key = CacheKey(**{**KEY.to_dict(), "hooks": ("L1.b",), "dtype": "bfloat16"})
    cache = ActivationCache(build(tmp_path, key=key)["L1.b"])
    x = cache.read_rows(0, np.arange(5))
    tok = torch.from_numpy(cache.shard(0)["tokens"][:5].astype(np.int64))
    assert cache.dtype == "bfloat16" and x.dtype == np.float32
    np.testing.assert_array_equal(x, (EMBED[tok][:, :8] * 2).bfloat16().float().numpy())


def test_killed_build_resumes_from_last_complete_shard(tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, Model(fail_after=6))          # 6 batches x 28 rows = 168 rows: 8 shards of 20
    assert not cache_path(tmp_path, KEY.for_hook("L0.a")).exists()   # nothing visible yet
    partial = partial_path(tmp_path, KEY.for_hook("L0.a"))
    assert len(json.loads((partial / "progress.json").read_text())["shards"]) == 8
    resumed = Model()
    with caplog.at_level(logging.INFO, logger="sae_lightning.cache"):
        paths = build(tmp_path, resumed)
    assert "resuming activation cache build from shard 8" in caplog.text
    assert resumed.calls == 5     # rows 160.. start in batch 5 (rows 140-167): batches 5..9 recomputed
    fresh = build(tmp_path / "fresh")
    for hook in KEY.hooks:
        a, b = ActivationCache(paths[hook]).meta, ActivationCache(fresh[hook]).meta
        assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert not partial.exists()


def test_resume_ignores_a_shard_corrupted_after_the_kill(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, Model(fail_after=6))
    shard = partial_path(tmp_path, KEY.for_hook("L1.b")) / "shard_00007.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    resumed = Model()
    build(tmp_path, resumed)
    assert resumed.calls == 5    # both hooks restart from shard 7: row 140, the first row of batch 5
    ActivationCache(cache_path(tmp_path, KEY.for_hook("L1.b"))).verify()


def test_two_processes_build_once(tmp_path):
    script = textwrap.dedent(f"""
        import logging, sys, time
        from pathlib import Path
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        from tests.cache import test_cache as t
        class Slow(t.Model):
            def __call__(self, tokens):
                time.sleep(0.1)
                with open({str(tmp_path / 'calls')!r}, 'a') as f:
                    f.write('x')
                return super().__call__(tokens)
        t.build(Path({str(tmp_path / 'root')!r}), Slow())
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert (tmp_path / "calls").read_text() == "x" * N_BATCHES
    assert sum("built activation cache" in o for o in outs) == 1
    assert sum("reusing activation cache" in o for o in outs) == 1


def _corrupt_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, **changes}))


def test_truncated_shard_is_refused_on_open(tmp_path):
    path = build(tmp_path)["L0.a"]
    shard = path / "shard_00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheError, match=rf"{shard}.*truncated.*Delete {path} and rebuild"):
        ActivationCache(path)


def test_checksum_mismatch_is_refused_on_first_read(tmp_path):
    path = build(tmp_path)["L0.a"]
    shard = path / "shard_00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = ActivationCache(path)            # sizes agree: opening stays cheap
    cache.shard(0)
    with pytest.raises(CacheError, match=rf"{shard} fails its SHA-256 checksum.*Delete {path}"):
        cache.shard(2)
    assert cli(["verify", "--root", str(tmp_path)]) == 1


def test_incompatible_format_version_is_refused(tmp_path):
    path = build(tmp_path)["L0.a"]
    _corrupt_meta(path, format_version=0)
    with pytest.raises(CacheError, match=r"meta.json has cache format version 0.*reads version 1.*rebuild"):
        ActivationCache(path)


def test_key_mismatch_is_refused(tmp_path):
    path = build(tmp_path)["L0.a"]
    other = CacheKey(**{**KEY.to_dict(), "hooks": ("L0.a",), "n_tokens": 640})
    with pytest.raises(CacheError, match=r"built for another config \(n_tokens: cache=320 config=640\)"):
        ActivationCache(path, expected_key=other)
    _corrupt_meta(path, key={**KEY.for_hook("L0.a").to_dict(), "context_size": 16})
    with pytest.raises(CacheError, match="does not match its directory name"):
        ActivationCache(path)


def test_full_disk_fails_cleanly_and_the_next_run_resumes(tmp_path):
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1500, old_limit[1]))   # a shard of L0.a is ~1.9 kB
    try:
        with pytest.raises(CacheBuildError, match=r"writing shard .*shard_00000.safetensors.tmp failed: "
                                                  r"File too large.*resumes.*activations.cache_dir"):
            build(tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert not cache_path(tmp_path, KEY.for_hook("L0.a")).exists()
    assert not list(tmp_path.rglob("*.tmp"))
    paths = build(tmp_path)
    ActivationCache(paths["L0.a"]).verify()


def test_shards_are_standard_safetensors(tmp_path):
    from safetensors import safe_open

    path = build(tmp_path)["L0.a"]
    cache = ActivationCache(path)
    with safe_open(str(path / "shard_00001.safetensors"), framework="np") as f:
        assert set(f.keys()) == {"acts", "tokens", "doc", "pos", "contexts"}
        np.testing.assert_array_equal(f.get_tensor("acts"), cache.shard(1)["acts"])


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "safetensors-bf16"])
def test_array_import(tmp_path, fmt):
    x = np.random.default_rng(0).standard_normal((1000, 12)).astype(np.float32) * 3
    path = tmp_path / f"acts.{fmt.split('-')[0]}"
    if fmt == "npy":
        np.save(path, x)
    else:
        from safetensors.torch import save_file

        t = torch.from_numpy(x)
        save_file({"acts": t.bfloat16() if fmt.endswith("bf16") else t}, str(path))
        if fmt.endswith("bf16"):
            x = t.bfloat16().float().numpy()
    src = ArraySource(path, shard_rows=100)
    assert (src.d, src.n_rows, src.shard_sizes) == (12, 1000, [16] * 62 + [8])
    np.testing.assert_array_equal(np.concatenate([src.read_rows(i, np.arange(n))
                                                  for i, n in enumerate(src.shard_sizes)]), x)
    assert src.norm_scale == pytest.approx(np.sqrt(12) / np.linalg.norm(x, axis=1).mean(), rel=1e-6)


def test_array_import_errors_name_the_file(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((3, 4, 5), np.float32))
    with pytest.raises(CacheError, match=r"bad.npy: need a non-empty C-ordered 2-D"):
        ArraySource(tmp_path / "bad.npy")
    with pytest.raises(CacheError, match=r"missing.npy does not exist"):
        ArraySource(tmp_path / "missing.npy")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(CacheError, match=r"unknown suffix '.csv'"):
        ArraySource(tmp_path / "x.csv")


def test_cli_list_shows_size_and_key(tmp_path, capsys):
    build(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "other", Model(fail_after=3))
    assert cli(["list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert KEY.for_hook("L0.a").name in out and "280 rows x 16 float32, 14 shards" in out
    assert '"n_tokens": 320' in out
    assert cli(["verify", "--root", str(tmp_path)]) == 0
    assert cli(["list", "--root", str(tmp_path / "other")]) == 0
    assert "interrupted build: 4 complete shards" in capsys.readouterr().out


def test_ensure_cache_with_the_tiny_lm(tmp_path, tiny_gpt2_dir, tiny_gpt2, tinystories_path, caplog):
    from sae_lightning.cache import ensure_cache
    from sae_lightning.config import ActivationsConfig, DataConfig, HookConfig, ModelConfig, TrainConfig

    cfg = TrainConfig(model=ModelConfig(name=str(tiny_gpt2_dir)), layer=1,
                      hook=HookConfig(name="mlp_post", extra=["resid_post"]),
                      data=DataConfig(source="files", path=str(tinystories_path), context_size=16,
                                      n_tokens=2048, lm_batch_size=8),
                      activations=ActivationsConfig(cache_dir=str(tmp_path), shard_rows=500), batch_size=64,
                      train_tokens=640)
    from sae_lightning.lm import HookPoint

    mlp, resid = ensure_cache(cfg)
    assert (mlp.d, resid.d) == (128, 32) and mlp.n_rows == resid.n_rows
    name = f"{tiny_gpt2_dir.name}-L1.mlp_post-tinystories_train_head-ctx16-2048-f32-"
    assert mlp.path.name.startswith(name)
    shard = mlp.shard(0)
    assert (shard["pos"] > 0).all() and shard["doc"][-1] >= 8   # BOS left out; more than one LM batch
    rows = shard["doc"] == 9
    ctx = torch.from_numpy(mlp.context(9).astype(np.int64))[None]
    want = tiny_gpt2.activations(ctx, [HookPoint(1, "mlp_post")])[HookPoint(1, "mlp_post")][0]
    np.testing.assert_allclose(shard["acts"][rows], want[shard["pos"][rows]].numpy(), rtol=1e-4, atol=1e-5)
    with caplog.at_level(logging.INFO, logger="sae_lightning.cache"):
        again = ensure_cache(cfg)
    assert [c.path for c in again] == [mlp.path, resid.path] and "reusing" in caplog.text
    assert "loading" not in caplog.text      # reuse never loads the model


def test_extra_layers_are_cached_in_the_same_pass(tmp_path, tiny_gpt2_dir, tiny_gpt2, tinystories_path):
    from sae_lightning.cache import ensure_cache
    from sae_lightning.config import ActivationsConfig, DataConfig, HookConfig, ModelConfig, TrainConfig
    from sae_lightning.lm import HookPoint

    cfg = TrainConfig(model=ModelConfig(name=str(tiny_gpt2_dir)), layer=2,
                      hook=HookConfig(name="resid_post", extra_layers=[0]),
                      data=DataConfig(source="files", path=str(tinystories_path), context_size=16,
                                      n_tokens=512, lm_batch_size=8),
                      activations=ActivationsConfig(cache_dir=str(tmp_path), shard_rows=500), batch_size=64,
                      train_tokens=640)
    trained, extra = ensure_cache(cfg)
    assert "-L2.resid_post-" in trained.path.name and "-L0.resid_post-" in extra.path.name
    shard = extra.shard(0)
    rows = shard["doc"] == 3
    ctx = torch.from_numpy(extra.context(3).astype(np.int64))[None]
    want = tiny_gpt2.activations(ctx, [HookPoint(0, "resid_post")])[HookPoint(0, "resid_post")][0]
    np.testing.assert_allclose(shard["acts"][rows], want[shard["pos"][rows]].numpy(), rtol=1e-4, atol=1e-5)


def test_cli_build_composes_the_train_config(tmp_path, tiny_gpt2_dir, capsys):
    overrides = [f"model.name={tiny_gpt2_dir}", "data=tinystories_local", "data.context_size=16",
                 "data.n_tokens=512", "data.lm_batch_size=8", "layer=0", "hook=resid_post",
                 f"activations.cache_dir={tmp_path}", "activations.shard_rows=100"]
    assert cli(["build", *overrides]) == 0
    printed = capsys.readouterr().out
    cache = ActivationCache(printed.split()[0])
    assert cache.key.hooks == ("L0.resid_post",) and cache.meta["shape"] == [cache.n_rows, 32]
    assert cli(["build", *overrides]) == 0 and capsys.readouterr().out == printed   # reused
