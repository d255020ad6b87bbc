"""``python -m sae_lightning.lm <model dir or hub id> [--layer L] [--device cpu]``: where each hook point
is in that model (found and checked on a probe forward, as training does), or why it is missing.

Answers "does it run on my model?" before any data is read: the module each hook name reads, its width,
and the blocks' path, for a ``hook=module hook.module=...`` when something else is wanted.
"""

from __future__ import annotations

import argparse

from sae_lightning.config import HOOK_NAMES, ModelConfig
from sae_lightning.lm.layout import LayoutError
from sae_lightning.lm.loading import load_lm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_lightning.lm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a local directory or a Hugging Face hub id (model.name)")
    p.add_argument("--layer", type=int, default=None, help="block to show (default: the middle one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    lm = load_lm(ModelConfig(name=args.model, dtype=args.dtype), device=args.device)
    layer = lm.n_layers // 2 if args.layer is None else args.layer
    print(f"{args.model}: model_type={lm.family} n_layers={lm.n_layers} d_model={lm.d_model} "
          f"max positions={lm.context_size}")
    try:
        layout = lm.layout(layer)
    except LayoutError as err:
        print(err)
        return 1
    print(f"blocks: {lm.blocks_path}  layer {layer}{' (parallel attention)' if layout.parallel else ''}")
    for name in HOOK_NAMES:
        if name in layout.sites:
            print(f"  {name:10s} d={layout.dims[name]:<6d} {layout.sites[name]}")
        else:
            print(f"  {name:10s} missing: {layout.missing[name]}")
    gain = lm.final_norm_gain()
    print("final norm gain folded into W_U for direct logit effects:", "none" if gain is None else "yes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
