"""Cache build throughput against the bare truncated forward pass of the same model on the same batches.

    python benchmarks/cache_build.py [--batches 6 --batch-size 8 --ctx 128 --dtype float32 --device auto]

Model: a random GPT-2 of GPT-2 small's shape cut to 7 layers, hook L6.mlp_post (d=3072), through
``sae_lightning.lm.HookedLM`` (the truncated forward the real build uses). Token ids are random (speed
does not depend on them); column 0 is BOS and is left out, as in a real build.

Two figures, because this machine is shared and its speed drifts:
- ``ratio_vs_bare``: bare-pass time / build time, the bare pass timed just before and just after the
  build (the mean of the two);
- ``ratio_in_build``: time inside ``compute`` during the build / build time: what storing costs,
  measured within the same run, immune to drift between runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled
from sae_lightning.cache import CacheKey, build_cache
from sae_lightning.cache.reader import ActivationCache
from sae_lightning.lm import HookedLM, HookPoint

HOOK = HookPoint(6, "mlp_post")
BOS = 50256


def bare_pass(lm: HookedLM, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for t in batches:
        lm.activations(t, [HOOK])
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=24, help="more batches, less timing noise")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--shard-rows", type=int, default=2048)
    args = p.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    torch.manual_seed(0)
    lm = HookedLM(GPT2LMHeadModel(GPT2Config(n_layer=7)).to(device), None)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, BOS, (args.batch_size, args.ctx), generator=g) for _ in range(args.batches)]
    for t in batches:
        t[:, 0] = BOS
    n_tokens = args.batches * args.batch_size * args.ctx
    lm.activations(batches[0], [HOOK])           # warm-up

    in_compute = 0.0

    def compute(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        nonlocal in_compute
        start = time.perf_counter()
        acts = {"L6.mlp_post": lm.activations(tokens, [HOOK])[HOOK]}
        if device == "cuda":
            torch.cuda.synchronize()
        in_compute += time.perf_counter() - start
        return acts

    root = tempfile.mkdtemp(prefix="bench_cache_build_")
    try:
        key = CacheKey(model="random-gpt2-7L", data="random-tokens", hooks=("L6.mlp_post",),
                       context_size=args.ctx, n_tokens=n_tokens, dtype=args.dtype)
        bare_before = bare_pass(lm, batches)
        start = time.perf_counter()
        path = build_cache(key, batches, compute, lambda t: t == BOS, root, shard_rows=args.shard_rows)
        build = time.perf_counter() - start
        bare_after = bare_pass(lm, batches)
        cache = ActivationCache(path["L6.mlp_post"])
        size_mb = cache.size_bytes / 2**20
    finally:
        shutil.rmtree(root, ignore_errors=True)

    bare = (bare_before + bare_after) / 2
    rows = [("bare truncated forward (before)", bare_before), ("bare truncated forward (after)", bare_after),
            ("cache build (forward + store)", build), ("  of which inside compute()", in_compute)]
    print(f"device={device}  model=GPT-2 small shape, 7 layers  hook=L6.mlp_post d=3072  "
          f"tokens={n_tokens}  storage={args.dtype}  written={size_mb:.0f} MiB in {cache.n_shards} shards")
    print(f"{'pass':34s} {'seconds':>8s} {'tokens/s':>10s}")
    for name, sec in rows:
        print(f"{name:34s} {sec:8.2f} {n_tokens / sec:10.0f}")
    print(f"bare_tok_s={n_tokens / bare:.0f} build_tok_s={n_tokens / build:.0f} "
          f"ratio_vs_bare={bare / build:.3f} ratio_in_build={in_compute / build:.3f} device={device} "
          f"dtype={args.dtype}")


if __name__ == "__main__":
    main()
