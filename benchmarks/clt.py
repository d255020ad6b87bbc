"""A cross-layer transcoder against a set of per-layer transcoders (PLTs) of equal total latents.

For each ``k`` (the same k per layer for every contender), on the same layers, tokens and cache, the
contenders (``--kinds``):

- ``plt``: the PLT set, ``python train.py ... layers=[...] hook=mlp_in target.name=mlp_out sae=batchtopk``
  (one BatchTopK transcoder per layer, one stream);
- ``clt``: the same command plus ``clt=true`` (a BatchTopK CLT, ``k`` per layer);
- ``clt_jumprelu``: a JumpReLU CLT, ``clt=true sae=jumprelu sae.target_l0=<k x layers>`` (the controller
  steers the total L0 to the same budget).

Each run is a ``train.py`` subprocess under ``/usr/bin/time`` (peak RSS); its fit time and steps come from
``summary.json``, and what the benchmark measured of it is kept in ``<run>/bench.json``, so a rerun with
the same ``--work`` reuses finished runs (delete the folder to train again). Then the replacement model,
exactly as ``python evaluate.py`` runs it (``evaluate/replacement.py``: every MLP of the layers replaced at
once in one forward, special-token positions left alone) on the evaluation's held-out contexts: CE loss
recovered ``(L_zero - L_repl) / (L_zero - L_clean)``, KL, and the total L0 (active latents per token summed
over layers).

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

from benchmarks.common import REPO, Report, add_out_arg

# What every run shares (each run adds its layers, k, seed, cache and folder).
OVERRIDES = ["experiment=quickstart", "hook=mlp_in", "target.name=mlp_out", "logger=csv", "trainer=cpu",
             "trainer.progress_bar=false", "activations=lm"]
KINDS = {"plt": ["sae=batchtopk"], "clt": ["sae=batchtopk", "clt=true"],
         "clt_jumprelu": ["sae=jumprelu", "clt=true"]}


def sparsity(kind: str, k: int, n_layers: int) -> list[str]:
    """The overrides that give ``kind`` a budget of ``k`` active latents per layer."""
    return [f"sae.target_l0={k * n_layers}"] if kind == "clt_jumprelu" else [f"sae.k={k}"]


def train(kind: str, k: int, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One ``train.py`` run (or the finished one in its folder): its summary's numbers, wall time and peak
    RSS."""
    run = args.work / f"{kind}_k{k}_s{seed}"
    done = run / "bench.json"
    if done.is_file():
        return json.loads(done.read_text())
    layers = f"layers=[{','.join(map(str, args.layers))}]"
    over = [*OVERRIDES, *KINDS[kind], *args.overrides, layers, *sparsity(kind, k, len(args.layers)),
            f"sae.dict_mult={args.dict_mult}", f"train_tokens={args.train_tokens}", f"seed={seed}",
            f"activations.cache_dir={args.work / 'cache'}", f"hydra.run.dir={run}"]
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, str(REPO / "train.py"), *over],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} k={k} failed:\n{proc.stderr[-3000:]}")
    rss_kib = int(proc.stderr.strip().splitlines()[-1])
    if kind.startswith("clt"):
        summaries = [json.loads((run / "summary.json").read_text())]
    else:
        summaries = [json.loads((run / f"layer{layer}_mlp_in" / "summary.json").read_text())
                     for layer in args.layers]
    result = {"run": str(run), "seconds": summaries[0]["train_seconds"], "steps": summaries[0]["steps"],
              "wall": wall, "rss_mib": rss_kib / 1024,
              "val_nmse": sum(s["metrics"]["val/nmse"] for s in summaries) / len(summaries)}
    done.write_text(json.dumps(result))
    return result


def replacement(kind: str, run: Path, contexts: int) -> dict[str, float]:
    """The replacement model's numbers of one run, as ``evaluate.py`` computes them."""
    from sae_lightning.circuits.clt import load_clt
    from sae_lightning.config import EvalConfig, train_config_from_dict
    from sae_lightning.evaluate.replacement import PLTSet, replacement_metrics
    from sae_lightning.evaluate.run import held_out_contexts, replacement_inputs
    from sae_lightning.lm.text import special_token_mask

    if kind.startswith("clt"):
        tc: Any = load_clt(run / "clt")
        config = tc.metadata["train_config"]
        train_cfg = train_config_from_dict({**config, "clt": False, "layers": None, "layer": tc.layers[0]})
    else:
        tc, train_cfg = PLTSet.from_group(run)
    cfg = EvalConfig(ckpt_path=str(run), downstream_contexts=contexts, device="cpu")
    lm, dm = replacement_inputs(cfg, train_cfg, list(tc.layers))
    tokens = held_out_contexts(dm, cfg.downstream_contexts, cfg.max_tokens, cfg.batch_size)
    with torch.inference_mode():
        return replacement_metrics(lm, list(tokens.split(train_cfg.data.lm_batch_size)), tc,
                                   exclude=lambda t: special_token_mask(t, lm.tokenizer), alone=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2, 3])
    p.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 32])
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    p.add_argument("--dict-mult", type=float, default=2.0)
    p.add_argument("--train-tokens", type=int, default=327_680)
    p.add_argument("--seeds", type=int, default=1, help="seeds at the middle k (the spread)")
    p.add_argument("--eval-contexts", type=int, default=64)
    p.add_argument("--work", type=Path, default=Path("/tmp/clt_bench"),
                   help="run folders and their cache; finished runs in it are reused")
    p.add_argument("--overrides", nargs="*", default=[], help="more train.py overrides (every run)")
    add_out_arg(p)
    args = p.parse_args()
    report = Report("benchmarks.clt", stamp=True)
    report(f"# layers {args.layers}, dict_mult {args.dict_mult} per layer (equal total latents), "
           f"{args.train_tokens} training tokens, {args.eval_contexts} held-out contexts; kinds {args.kinds}")
    report(f"{'kind':13} {'k':>3} {'seed':>4} {'L0 total':>9} {'CE rec':>7} {'KL':>7} {'CE':>7} "
           f"{'CE clean':>8} {'CE zero':>7} {'val nmse':>8} {'fit s':>7} {'s/step':>7} {'peak RSS MiB':>12}")
    args.work.mkdir(parents=True, exist_ok=True)
    middle = args.ks[len(args.ks) // 2]
    for k in args.ks:
        for seed in range(args.seeds if k == middle else 1):
            for kind in args.kinds:
                run = train(kind, k, args, seed)
                m = {key.removeprefix("replacement/"): v
                     for key, v in replacement(kind, Path(run["run"]), args.eval_contexts).items()}
                report(f"{kind:13} {k:3d} {seed:4d} {m['l0_total']:9.1f} {m['ce_loss_recovered']:7.4f} "
                       f"{m['kl_div']:7.4f} {m['ce_loss_replaced']:7.4f} {m['ce_loss_clean']:8.4f} "
                       f"{m['ce_loss_zero']:7.4f} {run['val_nmse']:8.4f} {run['seconds']:7.1f} "
                       f"{run['seconds'] / run['steps']:7.3f} {run['rss_mib']:12.0f}")
    report.write(args.out)


if __name__ == "__main__":
    main()
