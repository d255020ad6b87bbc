"""Streaming throughput and memory: shuffled [4096 x 1536] float32 batches from a cache, against an SAE step.

    python -m benchmarks.stream [--rows 32768 --factor 10 --batches 24 --shuffle-buffer 16384]

1. Builds two caches with the real writer: ``rows`` x 1536 and ``factor`` times that (float32,
   ``shard-rows`` per shard, 5% held out by shard), from a cheap stand-in model (rows looked up from a
   random table), so the build takes seconds.
2. Streams ``batches`` training batches of 4096 from each through ``ActivationDataModule`` in a fresh
   subprocess, timing them and reading the process's peak RSS (which counts the mapped shard pages it
   touched), so the two memory figures are comparable. The first batch, which also hashes shards on
   first open, is included.
3. Times a plain torch SAE step of the standard configuration (ReLU, d_in=1536, d_sae=6144, batch
   4096, fwd + bwd + Adam) in this process: the consumer the stream has to outrun.

``--out FILE`` writes the report whole under the results header.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, Report, add_out_arg, module_command

D, BATCH, CTX, VOCAB = 1536, 4096, 128, 4096


def build(root: Path, rows: int, shard_rows: int) -> Path:
    """A float32 cache of ``rows`` x D built by the real writer from a table lookup (cheap 'model')."""
    from sae_lightning.cache import CacheKey, build_cache

    table = torch.randn(VOCAB, D, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    batches = (torch.randint(0, VOCAB, (32, CTX), generator=g) for _ in range(rows // (32 * CTX)))
    key = CacheKey(model="table", data="random", hooks=("L0.x",), context_size=CTX, n_tokens=rows)
    return build_cache(key, batches, lambda t: {"L0.x": table[t]}, None, root, shard_rows=shard_rows)["L0.x"]


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: anonymous and mapped file pages), reset by exec unlike
    ``ru_maxrss``, which a child inherits from the parent that forked it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def stream_child(path: str, batches: int, shuffle_buffer: int) -> None:
    """Run in a subprocess: stream ``batches`` batches and print timing and peak RSS as JSON."""
    from sae_lightning.config import ActivationsConfig
    from sae_lightning.datamodule import ActivationDataModule

    rss_before = peak_rss_mb()
    cfg = ActivationsConfig(shuffle_buffer=shuffle_buffer, val_fraction=0.05)
    dm = ActivationDataModule(path, cfg, BATCH, seed=0)
    start = time.perf_counter()
    it = iter(dm.train_dataloader())
    first = next(it)
    first_s = time.perf_counter() - start
    for _ in range(batches - 1):
        assert next(it).shape == first.shape
    total = time.perf_counter() - start
    print(json.dumps({"seconds": total, "first_s": first_s, "tok_s": batches * BATCH / total,
                      "rss_mb": peak_rss_mb(),
                      "rss_after_imports_mb": rss_before, "rows": dm.source.n_rows,
                      "shards": dm.source.n_shards}))


def measure_stream(path: Path, batches: int, shuffle_buffer: int) -> dict:
    cmd = module_command("stream", "--child", str(path), "--batches", str(batches),
                         "--shuffle-buffer", str(shuffle_buffer))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sae_step_seconds(steps: int = 2, d_sae: int = 6144) -> float:
    """Seconds per fwd + bwd + Adam step of a plain ReLU SAE (sum-over-d MSE + L1), batch 4096."""
    torch.manual_seed(0)
    w_enc = (torch.randn(D, d_sae) / D**0.5).requires_grad_()
    w_dec = (torch.randn(d_sae, D) / d_sae**0.5).requires_grad_()
    b_enc, b_dec = torch.zeros(d_sae, requires_grad=True), torch.zeros(D, requires_grad=True)
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_dec], lr=1e-4)
    x = torch.randn(BATCH, D)

    def step() -> None:
        z = torch.relu((x - b_dec) @ w_enc + b_enc)
        loss = ((z @ w_dec + b_dec - x) ** 2).sum(-1).mean() + 5.0 * (z * w_dec.norm(dim=1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32_768, help="rows of the small cache")
    p.add_argument("--factor", type=int, default=10, help="the large cache has factor x rows")
    p.add_argument("--shard-rows", type=int, default=4096)
    p.add_argument("--shuffle-buffer", type=int, default=16_384)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--child", help=argparse.SUPPRESS)
    add_out_arg(p)
    args = p.parse_args(argv)
    if args.child:
        stream_child(args.child, args.batches, args.shuffle_buffer)
        return
    root = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    try:
        start = time.perf_counter()
        small = build(root / "small", args.rows, args.shard_rows)
        large = build(root / "large", args.rows * args.factor, args.shard_rows)
        build_s = time.perf_counter() - start
        res = {"small": measure_stream(small, args.batches, args.shuffle_buffer),
               "large": measure_stream(large, args.batches, args.shuffle_buffer)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    step_s = sae_step_seconds()
    say = Report(__spec__.name, argv)
    sae_tok_s = BATCH / step_s
    say(f"d_in={D} batch={BATCH} shuffle_buffer={args.shuffle_buffer} shard_rows={args.shard_rows} "
        f"batches streamed={args.batches} (caches built in {build_s:.0f} s)")
    say(f"{'cache':6s} {'rows':>9s} {'shards':>6s} {'GiB':>5s} {'tokens/s':>9s} {'1st batch s':>11s} "
        f"{'peak RSS MiB':>12s} {'RSS after imports':>17s}")
    for name, r in res.items():
        say(f"{name:6s} {r['rows']:9d} {r['shards']:6d} {r['rows'] * D * 4 / 2**30:5.2f} {r['tok_s']:9.0f} "
            f"{r['first_s']:11.2f} {r['rss_mb']:12.0f} {r['rss_after_imports_mb']:17.0f}")
    say(f"SAE step (relu, d_sae=6144, batch 4096, fwd+bwd+Adam): {step_s:.2f} s = {sae_tok_s:.0f} tokens/s")
    speedup = res["small"]["tok_s"] / sae_tok_s
    rss_ratio = res["large"]["rss_mb"] / res["small"]["rss_mb"]
    say(f"stream_tok_s={res['small']['tok_s']:.0f} stream_large_tok_s={res['large']['tok_s']:.0f} "
        f"sae_step_tok_s={sae_tok_s:.0f} stream_over_sae={speedup:.1f} "
        f"rss_small_mb={res['small']['rss_mb']:.0f} rss_large_mb={res['large']['rss_mb']:.0f} "
        f"rss_large_over_small={rss_ratio:.3f}")
    say.write(args.out)


if __name__ == "__main__":
    main()
