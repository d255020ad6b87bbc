"""A cross-layer transcoder against a set of per-layer transcoders (PLTs) of equal total latents.

For each ``k`` (BatchTopK, the same k per layer for both), on the same layers, tokens and cache:

- the PLT set: ``python train.py ... layers=[...] hook=mlp_in target.name=mlp_out sae=batchtopk`` (one
  transcoder per layer, one stream);
- the CLT: the same command plus ``clt=true``.

Each run is a ``train.py`` subprocess under ``/usr/bin/time`` (peak RSS); its fit time and steps come from
``summary.json``. Then the replacement model on held-out contexts (the text after the training tokens):
every MLP of the layers replaced at once by the transcoders' output, layer by layer in one forward (each
layer's ``mlp_in`` encoded as the replaced model computes it, ``mlp_out`` written as ``decode`` of the
latents so far, the interface of ``docs/cross-layer-transcoders.md``), special-token positions left
alone; CE loss recovered ``(L_zero - L_repl) / (L_zero - L_clean)`` with every replaced MLP zeroed for
``L_zero``, and the total L0 (active latents per token summed over layers) in that forward.

    flock -x /tmp/cpu-bench.lock python -m benchmarks.clt --layers 0,1,2,3 --ks 8,16,32 \\
        --out benchmarks/results/clt_cpu.txt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import REPO, header, invocation
from sae_lightning.circuits.clt import load_clt
from sae_lightning.lm import HookPoint
from sae_lightning.saes import SAE

# What both kinds of run share (each run adds its layers, k, seed, cache and folder).
OVERRIDES = ["experiment=quickstart", "hook=mlp_in", "target.name=mlp_out", "sae=batchtopk", "logger=csv",
             "trainer=cpu", "trainer.progress_bar=false", "activations=lm"]


class PLTSet:
    """The per-layer transcoders of a ``layers=[...]`` run behind the CLT's interface."""

    def __init__(self, run: Path, layers: list[int]) -> None:
        self.layers = layers
        self.saes = {layer: SAE.load(run / f"layer{layer}_mlp_in" / "sae") for layer in layers}

    def encode(self, layer: int, mlp_in: Tensor) -> Tensor:
        return self.saes[layer].encode(mlp_in)

    def decode(self, layer: int, latents: dict[int, Tensor], mlp_in: Tensor) -> Tensor:
        return self.saes[layer].decode(latents[layer], mlp_in)


def train(kind: str, k: int, args: argparse.Namespace, seed: int, out: Path) -> dict[str, Any]:
    """One ``train.py`` run; its summary's numbers, wall time and peak RSS."""
    run = out / f"{kind}_k{k}_s{seed}"
    layers = f"layers=[{','.join(map(str, args.layers))}]"
    over = [*OVERRIDES, *args.overrides, layers, f"sae.k={k}", f"sae.dict_mult={args.dict_mult}",
            f"train_tokens={args.train_tokens}", f"seed={seed}", f"activations.cache_dir={out / 'cache'}",
            f"hydra.run.dir={run}", *(["clt=true"] if kind == "clt" else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, str(REPO / "train.py"), *over],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} k={k} failed:\n{proc.stderr[-3000:]}")
    rss_kib = int(proc.stderr.strip().splitlines()[-1])
    if kind == "clt":
        summary = json.loads((run / "summary.json").read_text())
        seconds, steps, nmse = summary["train_seconds"], summary["steps"], summary["metrics"]["val/nmse"]
    else:
        summaries = [json.loads((run / f"layer{layer}_mlp_in" / "summary.json").read_text())
                     for layer in args.layers]
        seconds, steps = summaries[0]["train_seconds"], summaries[0]["steps"]
        nmse = sum(s["metrics"]["val/nmse"] for s in summaries) / len(summaries)
    return {"run": run, "seconds": seconds, "steps": steps, "wall": wall, "rss_mib": rss_kib / 1024,
            "val_nmse": nmse}


def held_out_tokens(args: argparse.Namespace) -> tuple[Any, Tensor, Tensor]:
    """The LM, ``args.eval_contexts`` contexts of the text after the training tokens, and their special
    positions."""
    from hydra import compose, initialize_config_dir

    from sae_lightning.config import register_configs, to_config
    from sae_lightning.lm import load_lm
    from sae_lightning.lm.text import iter_token_batches, special_token_mask

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = to_config(compose("train", overrides=[*OVERRIDES, *args.overrides]))
    lm = load_lm(cfg.model, device="cpu")
    skip = cfg.data.n_tokens // cfg.data.context_size
    cfg.data.n_tokens += args.eval_contexts * cfg.data.context_size
    batches = torch.cat(list(iter_token_batches(cfg.data, lm.tokenizer, 8)))
    tokens = batches[skip: skip + args.eval_contexts]
    return lm, tokens, special_token_mask(tokens, lm.tokenizer)


def replaced_forward(lm: Any, tokens: Tensor, excluded: Tensor, tc: Any | None, layers: list[int],
                     ) -> tuple[Tensor, float]:
    """Logits with every MLP of ``layers`` replaced by ``tc`` (zeroed when ``tc`` is None), and the total L0
    of the replacement (module docstring)."""
    inputs: dict[int, Tensor] = {}
    latents: dict[int, Tensor] = {}
    l0 = [0.0]
    keep = ~excluded.reshape(-1)

    def record(layer: int):
        def fn(x: Tensor) -> Tensor:
            inputs[layer] = x
            return x
        return fn

    def write(layer: int):
        def fn(y: Tensor) -> Tensor:
            if tc is None:
                new = torch.zeros_like(y)
            else:
                x = inputs[layer].reshape(-1, y.shape[-1]).float()
                latents[layer] = tc.encode(layer, x)
                l0[0] += float((latents[layer][keep] != 0).sum(-1).float().mean())
                new = tc.decode(layer, latents, x).reshape(y.shape).to(y.dtype)
            return torch.where(excluded[..., None], y, new)
        return fn

    replace = {HookPoint(layer, "mlp_in"): record(layer) for layer in layers}
    replace |= {HookPoint(layer, "mlp_out"): write(layer) for layer in layers}
    return lm.logits(tokens, replace), l0[0]


def ce_loss(logits: Tensor, tokens: Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                   tokens[:, 1:].flatten()))


def evaluate(lm: Any, tokens: Tensor, excluded: Tensor, tc: Any, layers: list[int],
             base: dict[str, float]) -> dict[str, float]:
    logits, l0 = replaced_forward(lm, tokens, excluded, tc, layers)
    ce = ce_loss(logits, tokens)
    recovered = (base["zero"] - ce) / (base["zero"] - base["clean"])
    return {"ce": ce, "ce_recovered": recovered, "l0_total": l0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2, 3])
    parser.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 32])
    parser.add_argument("--dict-mult", type=float, default=2.0)
    parser.add_argument("--train-tokens", type=int, default=327_680)
    parser.add_argument("--seeds", type=int, default=1, help="seeds at the middle k (the spread)")
    parser.add_argument("--eval-contexts", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clt_bench"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--overrides", nargs="*", default=[], help="more train.py overrides (both kinds)")
    args = parser.parse_args()
    command = invocation("benchmarks.clt")
    lines = [header(command), f"# layers {args.layers}, BatchTopK, dict_mult {args.dict_mult} per layer "
             f"(equal total latents), {args.train_tokens} training tokens, {args.eval_contexts} held-out "
             "contexts\n"]
    args.work.mkdir(parents=True, exist_ok=True)
    lm, tokens, excluded = held_out_tokens(args)
    with torch.inference_mode():
        base = {"clean": ce_loss(lm.logits(tokens), tokens),
                "zero": ce_loss(replaced_forward(lm, tokens, excluded, None, args.layers)[0], tokens)}
    lines.append(f"# clean CE {base['clean']:.4f}, every replaced MLP zeroed {base['zero']:.4f}\n")
    lines.append(f"{'kind':5} {'k':>3} {'seed':>4} {'L0 total':>9} {'CE rec':>7} {'CE':>7} {'val nmse':>8} "
                 f"{'fit s':>7} {'s/step':>7} {'peak RSS MiB':>12}\n")
    middle = args.ks[len(args.ks) // 2]
    for k in args.ks:
        for seed in range(args.seeds if k == middle else 1):
            for kind in ("plt", "clt"):
                run = train(kind, k, args, seed, args.work)
                tc = load_clt(run["run"] / "clt") if kind == "clt" else PLTSet(run["run"], args.layers)
                with torch.inference_mode():
                    m = evaluate(lm, tokens, excluded, tc, args.layers, base)
                line = (f"{kind:5} {k:3d} {seed:4d} {m['l0_total']:9.1f} {m['ce_recovered']:7.4f} "
                        f"{m['ce']:7.4f} {run['val_nmse']:8.4f} {run['seconds']:7.1f} "
                        f"{run['seconds'] / run['steps']:7.3f} {run['rss_mib']:12.0f}\n")
                print(line, end="", flush=True)
                lines.append(line)
    text = "".join(lines)
    if args.out is not None:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
