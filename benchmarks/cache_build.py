"""Cache build throughput against the bare truncated forward pass of the same model on the same batches.

    python -m benchmarks.cache_build [--model gpt2-7L|pythia-70m | --model-dir DIR] [--layer L --hook NAME]
                                     [--batches 24 --batch-size 8 --ctx 128 --dtype float32 --device auto]

Model: a randomly initialised model of a real model's shape (``--model``: GPT-2 small cut to 7 layers,
hook L6.mlp_post, d=3072; or Pythia-70M's GPT-NeoX, 6 layers, d_model 512, hook L3.mlp_post, d=2048), or
a saved one (``--model-dir``: a ``save_pretrained`` directory or a hub id in the local cache, hook at its
middle layer), all through ``sae_lightning.lm`` (the truncated forward the real build uses). Token ids
are random (speed does not depend on them); column 0 is BOS and is left out, as in a real build.

Two figures, because this machine is shared and its speed drifts:
- ``ratio_vs_bare``: bare-pass time / build time, the bare pass timed just before and just after the
  build (the mean of the two);
- ``ratio_in_build``: time inside ``compute`` during the build / build time: what storing costs,
  measured within the same run, immune to drift between runs.

``--out FILE`` writes the report whole under the results header.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmarks.common import Report, add_out_arg

if TYPE_CHECKING:
    from sae_lightning.lm import HookedLM, HookPoint


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-7L", choices=list(SHAPES), help="shape of a random model")
    p.add_argument("--model-dir", default=None, help="a saved model (save_pretrained directory) instead")
    p.add_argument("--layer", type=int, default=None, help="hooked layer (default: see above)")
    p.add_argument("--hook", default="mlp_post", help="hook name (default mlp_post)")
    p.add_argument("--batches", type=int, default=24, help="more batches, less timing noise")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--shard-rows", type=int, default=2048)
    add_out_arg(p)
    args = p.parse_args(argv)
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
        build, layer, bos = SHAPES[args.model]
        lm, label = HookedLM(build().to(device), None), f"random {args.model}"
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
    say = Report(__spec__.name, argv)
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
    say.write(args.out)


if __name__ == "__main__":
    main()
