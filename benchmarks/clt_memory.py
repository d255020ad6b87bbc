"""Does a CLT over every layer of SmolLM2-135M (30 blocks, d_model 576) train on this machine, and how does
its peak RSS compare with the memory guard's estimate (``group.memory.clt_parts``)?

One ``python train.py ... clt=true`` process (live activations: 60 hooks would be 60 caches) for a few
steps under ``/usr/bin/time``; the estimate is the one the run logs before any work ("Memory: the CLT needs
about ...").

    flock -s /tmp/cpu-bench.lock python -m benchmarks.clt_memory --out benchmarks/results/clt_memory_cpu.txt
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, header, invocation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dict-mult", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sae", default="jumprelu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--buffer-tokens", type=int, default=4096, help="live window: rows of 60 hooks each")
    parser.add_argument("--lm-batch-size", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clt_memory"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    run = args.work / f"{args.sae}_x{args.dict_mult:g}_b{args.batch_size}_{args.precision}"
    over = ["experiment=quickstart", "activations=live", f"activations.buffer_tokens={args.buffer_tokens}",
            f"data.lm_batch_size={args.lm_batch_size}", "hook=mlp_in",
            "target.name=mlp_out", f"layers=[{','.join(map(str, range(args.layers)))}]", "clt=true",
            f"sae={args.sae}", f"sae.dict_mult={args.dict_mult}", f"batch_size={args.batch_size}",
            f"train_tokens={args.steps * args.batch_size}", f"trainer.precision={args.precision}",
            "logger=csv", "trainer=cpu", "trainer.progress_bar=false", "trainer.limit_val_batches=1",
            f"hydra.run.dir={run}"]
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, str(REPO / "train.py"), *over],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    log = (run / "train.log").read_text() if (run / "train.log").exists() else ""
    estimate = re.search(r"Memory: the CLT needs about (.+?) of (.+?) available", log)
    peak = int(proc.stderr.strip().splitlines()[-1]) / 2**20 if proc.stderr.strip() else float("nan")
    lines = [header(invocation("benchmarks.clt_memory")),
             f"# train.py {' '.join(over)}\n",
             f"exit status: {proc.returncode}\n",
             f"layers: {args.layers}, d_sae per layer: {round(args.dict_mult * 576)}, {args.sae}, "
             f"batch {args.batch_size}, {args.steps} steps, precision {args.precision}\n",
             f"estimate (logged before work): {estimate[1] if estimate else 'absent'} "
             f"(available: {estimate[2] if estimate else '?'})\n",
             f"peak RSS of the process: {peak:.1f} GiB\n",
             f"wall time: {wall:.0f} s\n"]
    if proc.returncode != 0:
        lines.append(f"stderr tail:\n{proc.stderr[-2000:]}\n")
    text = "".join(lines)
    if args.out is not None:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
