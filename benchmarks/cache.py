"""The activation cache's throughput: building it against the bare LM forward, and streaming from it
against the SAE step it feeds.

    python -m benchmarks.cache build  [--model gpt2-7L|pythia-70m | --model-dir DIR] [--layer L --hook NAME]
                                      [--batches 24 --batch-size 8 --ctx 128 --dtype float32 --device auto]
    python -m benchmarks.cache stream [--rows 32768 --factor 10 --batches 24 --shuffle-buffer 16384]

``build``: cache build throughput against the bare truncated forward pass of the same model on the same
batches. Model: a randomly initialised model of a real model's shape (``--model``: GPT-2 small cut to 7
layers, hook L6.mlp_post, d=3072; or Pythia-70M's GPT-NeoX, 6 layers, d_model 512, hook L3.mlp_post,
d=2048), or a saved one (``--model-dir``: a ``save_pretrained`` directory or a hub id in the local cache,
hook at its middle layer), all through ``sae_lightning.lm`` (the truncated forward the real build uses).
Token ids are random (speed does not depend on them); column 0 is BOS and is left out, as in a real
build. Two figures, because this machine is shared and its speed drifts:

- ``ratio_vs_bare``: bare-pass time / build time, the bare pass timed just before and just after the
  build (the mean of the two);
- ``ratio_in_build``: time inside ``compute`` during the build / build time: what storing costs,
  measured within the same run, immune to drift between runs.

``stream``: streaming throughput and memory, shuffled [4096 x 1536] float32 batches from a cache, against an
SAE step.

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
from typing import TYPE_CHECKING

import torch

from benchmarks.common import REPO, Report, add_out_arg, module_command

if TYPE_CHECKING:
    from sae_lightning.lm import HookedLM, HookPoint


# ---------------------------------------------------------------- build
def gpt2_7l() -> torch.nn.Module:
    """GPT-2 small cut to 7 layers, randomly initialised."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=7))


def pythia_70m() -> torch.nn.Module:
    """Pythia-70M's GPT-NeoX shape, randomly initialised."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
        rotary_pct=0.25, max_position_embeddings=2048))


# name -> (random model of that shape, its hooked layer, its BOS id)
SHAPES = {"gpt2-7L": (gpt2_7l, 6, 50256), "pythia-70m": (pythia_70m, 3, 0)}


def bare_pass(lm: HookedLM, hook: HookPoint, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for t in batches:
        lm.activations(t, [hook])
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def cache_build(args: argparse.Namespace, say: Report) -> None:
    from sae_lightning.cache import CacheKey, build_cache
    from sae_lightning.cache.reader import ActivationCache
    from sae_lightning.config import ModelConfig
    from sae_lightning.lm import HookedLM, HookPoint, load_lm

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    torch.manual_seed(0)
    if args.model_dir:
        lm = load_lm(ModelConfig(name=args.model_dir), device=device)
        layer, bos, label = lm.n_layers // 2, lm.tokenizer.bos_token_id or 0, Path(args.model_dir).name
    else:
        make, layer, bos = SHAPES[args.model]
        lm, label = HookedLM(make().to(device), None), f"random {args.model}"
    hook = HookPoint(args.layer if args.layer is not None else layer, args.hook)
    hook_id = f"L{hook.layer}.{hook.name}"
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, lm.vocab_size, (args.batch_size, args.ctx), generator=g)
               for _ in range(args.batches)]
    for t in batches:
        t[:, 0] = bos
    n_tokens = args.batches * args.batch_size * args.ctx
    lm.activations(batches[0], [hook])           # warm-up (and the probe that finds the hook point)

    in_compute = 0.0

    def compute(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        nonlocal in_compute
        start = time.perf_counter()
        acts = {hook_id: lm.activations(tokens, [hook])[hook]}
        if device == "cuda":
            torch.cuda.synchronize()
        in_compute += time.perf_counter() - start
        return acts

    root = tempfile.mkdtemp(prefix="bench_cache_build_")
    try:
        key = CacheKey(model=label, data="random-tokens", hooks=(hook_id,), context_size=args.ctx,
                       n_tokens=n_tokens, dtype=args.dtype)
        bare_before = bare_pass(lm, hook, batches)
        start = time.perf_counter()
        path = build_cache(key, batches, compute, lambda t: t == bos, root, shard_rows=args.shard_rows)
        build = time.perf_counter() - start
        bare_after = bare_pass(lm, hook, batches)
        cache = ActivationCache(path[hook_id])
        size_mb = cache.size_bytes / 2**20
    finally:
        shutil.rmtree(root, ignore_errors=True)

    bare = (bare_before + bare_after) / 2
    rows = [("bare truncated forward (before)", bare_before), ("bare truncated forward (after)", bare_after),
            ("cache build (forward + store)", build), ("  of which inside compute()", in_compute)]
    say(f"device={device}  model={label} ({lm.family}, {lm.n_layers} layers, d_model {lm.d_model})  "
        f"hook={hook_id} d={lm.hook_dim(hook)} ({lm.hook_site(hook)})  tokens={n_tokens}  "
        f"storage={args.dtype}  written={size_mb:.0f} MiB in {cache.n_shards} shards")
    say(f"{'pass':34s} {'seconds':>8s} {'tokens/s':>10s}")
    for name, sec in rows:
        say(f"{name:34s} {sec:8.2f} {n_tokens / sec:10.0f}")
    say(f"bare_tok_s={n_tokens / bare:.0f} build_tok_s={n_tokens / build:.0f} "
        f"ratio_vs_bare={bare / build:.3f} ratio_in_build={in_compute / build:.3f} device={device} "
        f"dtype={args.dtype}")


# ---------------------------------------------------------------- stream
D, BATCH, CTX, VOCAB = 1536, 4096, 128, 4096


def table_cache(root: Path, rows: int, shard_rows: int) -> Path:
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
    from sae_lightning.cache.datamodule import ActivationDataModule
    from sae_lightning.config import ActivationsConfig

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
    cmd = module_command("cache", "stream", "--child", str(path), "--batches", str(batches),
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


def stream(args: argparse.Namespace, say: Report) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    try:
        start = time.perf_counter()
        small = table_cache(root / "small", args.rows, args.shard_rows)
        large = table_cache(root / "large", args.rows * args.factor, args.shard_rows)
        build_s = time.perf_counter() - start
        res = {"small": measure_stream(small, args.batches, args.shuffle_buffer),
               "large": measure_stream(large, args.batches, args.shuffle_buffer)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    step_s = sae_step_seconds()
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    b = sub.add_parser("build", help="cache build vs the bare truncated forward pass")
    b.add_argument("--model", default="gpt2-7L", choices=list(SHAPES), help="shape of a random model")
    b.add_argument("--model-dir", default=None, help="a saved model (save_pretrained directory) instead")
    b.add_argument("--layer", type=int, default=None, help="hooked layer (default: see above)")
    b.add_argument("--hook", default="mlp_post", help="hook name (default mlp_post)")
    b.add_argument("--batches", type=int, default=24, help="more batches, less timing noise")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--ctx", type=int, default=128)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--device", default="auto")
    b.add_argument("--shard-rows", type=int, default=2048)
    s = sub.add_parser("stream", help="streaming throughput and peak memory vs the SAE step")
    s.add_argument("--rows", type=int, default=32_768, help="rows of the small cache")
    s.add_argument("--factor", type=int, default=10, help="the large cache has factor x rows")
    s.add_argument("--shard-rows", type=int, default=4096)
    s.add_argument("--shuffle-buffer", type=int, default=16_384)
    s.add_argument("--batches", type=int, default=24)
    s.add_argument("--child", help=argparse.SUPPRESS)
    for part in (b, s):
        add_out_arg(part)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.part == "stream" and args.child:
        stream_child(args.child, args.batches, args.shuffle_buffer)
        return
    say = Report(__spec__.name, argv)
    {"build": cache_build, "stream": stream}[args.part](args, say)
    say.write(args.out)


if __name__ == "__main__":
    main()
