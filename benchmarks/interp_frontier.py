"""Which SAEs are most interpretable? The monosemanticity score's frontier over architecture, L0 and width,
and the setting chosen from it on one half of the held-out contexts, reported on the other (issue 40).

    python -m benchmarks.interp_frontier                # the study; resumable, rerun the same command
    python -m benchmarks.interp_frontier --smoke        # the same code end to end at a tiny budget
    python -m benchmarks.interp_frontier --report-only  # rewrite the report and plot from the rows

The grid, everything through the package's own code: SmolLM2-135M layer 6 ``mlp_post`` on the TinyStories
sample (``experiment=quickstart``: its cache, its batch size and its token budget, the same for every SAE),
architectures ``relu_dn topk batchtopk jumprelu matryoshka gated``, L0 set by ``sae.k`` (TopK family) or
``sae.target_l0`` (the penalised ones) at ``--l0`` (16 45 128), widths ``--widths`` (2 8) x d_in; a second
SAE seed (``sae_seed=1``: another start on the same stream) at the middle L0 and the first width for each
architecture; and the reference, ``sae=relu`` with the preset's ``l1`` (today's ``experiment`` presets).
Each group of jobs of one (width, architecture) trains from one stream (``group.run.run_group``), each job
in its own run folder; each finished job is then evaluated by ``evaluate.after.evaluate_finished`` (what
``evaluate.enabled=true`` runs after a sweep's job) on the **validation half** of the held-out contexts
(``evaluate.py contexts=validation``; ``downstream=false``: the study needs no LM loss), at the default
number of scored units.

The selection rule, fixed before any held-out number is computed: among the seed-0 jobs and the reference
whose validation-half explained variance is >= ``--min-ev`` (0.7), the one with the highest validation-half
``latent_minus_neuron_coherence_median`` (``latent_coherence_median`` where the evaluation has no such key:
the neurons scored are the same for every job, so both rank alike), ties to the lower L0. Only once every
job of the grid has its row are the chosen job and the reference evaluated on the **test half**
(``contexts=test``, which no choice saw); the report gives both, with the intervals where the evaluation
reports them, and says whether the chosen one beats the reference beyond them.

Resumable: one JSONL row per job (``--rows``), appended as soon as the job is evaluated, each with a
fingerprint of its resolved config, the evaluation's options and a hash of the code it measures
(``sae_lightning/``, ``conf/``, this script). A rerun skips the jobs whose row has the current fingerprint;
run folders live under ``--work/<code hash>/``, so a group killed part-way resumes from its own checkpoint
(``ckpt_path=auto``) and never from another version of the code. ``--lock`` takes that file's shared lock
(``flock -s``) around each group only, so an exclusive timing benchmark can run between two groups.

Outputs (``--out`` stem): ``.jsonl`` (the rows), ``.txt`` (the report, written whole with the header of
``benchmarks.common.header``), ``.png`` (the score against L0 and against explained variance, with the
intervals), and the
package's own comparison page of every job (``compare.py``) in the work folder.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import header, invocation
from sae_lightning.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

ARCHITECTURES = ("relu_dn", "topk", "batchtopk", "jumprelu", "matryoshka", "gated")
BY_K = {"topk", "batchtopk", "matryoshka"}  # sparsity set by sae.k; the others by sae.target_l0
REFERENCE = "relu"  # today's presets' architecture, at the preset's l1
SCORE_KEYS = ("latent_minus_neuron_coherence_median", "latent_coherence_median")
SHOWN = ("latent_coherence_median", "neuron_coherence_median", "latent_minus_neuron_coherence_median",
         "latent_token_matched_lift_median", "absorption_rate", "absorption_fraction")
CODE = ("sae_lightning", "conf")


@dataclass
class Job:
    """One SAE of the study: its name (folder), its ``train.py`` overrides and where it sits in the grid."""

    name: str
    architecture: str
    width: int
    l0: int | None  # the asked L0; None for the reference (its preset's l1)
    sae_seed: int
    overrides: list[str] = field(default_factory=list)


def grid(args: argparse.Namespace) -> list[list[Job]]:
    """The study's groups: one per (width, architecture), the first width's groups first (the cheaper
    half of the grid finishes first), the reference with the first width."""
    groups = []
    middle = args.l0[len(args.l0) // 2]
    for width in args.widths:
        if width == args.widths[0]:
            groups.append([Job(f"{REFERENCE}_x{width}_s0", REFERENCE, width, None, 0,
                               [f"sae={REFERENCE}", f"sae.dict_mult={width}"])])
        for arch in args.architectures:
            key = "sae.k" if arch in BY_K else "sae.target_l0"
            seeds = [(l0, 0) for l0 in args.l0] + ([(middle, 1)] if width == args.widths[0] else [])
            groups.append([Job(f"{arch}_L{l0}_x{width}_s{seed}", arch, width, l0, seed,
                               [f"sae={arch}", f"sae.dict_mult={width}", f"{key}={l0}", f"sae_seed={seed}"])
                           for l0, seed in seeds])
    return groups


def code_hash() -> str:
    """Hash of the code the study measures: every file under ``sae_lightning/`` and ``conf/``, and this
    script."""
    digest = hashlib.sha256()
    files = sorted(p for d in CODE for p in (ROOT / d).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts)
    for path in [*files, Path(__file__).resolve()]:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def compose(overrides: list[str]) -> dict[str, Any]:
    """The resolved config that ``python train.py <overrides>`` trains."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from sae_lightning.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        dict_cfg = hydra_compose("train", overrides=overrides)
        to_config(dict_cfg)  # checked as train.py checks it
        return OmegaConf.to_container(dict_cfg, resolve=True)


def fingerprint(config: dict[str, Any], code: str) -> str:
    return hashlib.sha256(json.dumps([config, code], sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(path: Path, row: dict[str, Any]) -> None:
    """One more row, flushed to disk before the next job starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def shared_lock(path: str | None) -> Iterator[None]:
    """``flock -s path`` for the duration (nothing when ``path`` is None)."""
    if path is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def common_overrides(args: argparse.Namespace) -> list[str]:
    over = ["experiment=quickstart", f"activations.cache_dir={args.cache_dir}", "logger=csv",
            "trainer.progress_bar=false", "ckpt_path=auto", "evaluate.enabled=true",
            f"evaluate.overrides=[{','.join(_quoted(o) for o in eval_overrides(args, 'validation'))}]"]
    if args.train_tokens is not None:
        over.append(f"train_tokens={args.train_tokens}")
    return over


def eval_overrides(args: argparse.Namespace, half: str) -> list[str]:
    """``evaluate.py`` options of the study's evaluations (``half``: validation or test)."""
    over = [f"contexts={half}", f"context_split_seed={args.split_seed}", "downstream=false"]
    if args.units is not None:
        over.append(f"monosemanticity_units={args.units}")
    return over


def _quoted(value: str) -> str:
    return "'" + value + "'"


def train_and_evaluate(group: list[Job], configs: list[dict], work: Path, rows_path: Path, code: str,
                       args: argparse.Namespace) -> None:
    """Train one group from one stream (unless every member is already trained), then evaluate each
    member on the validation half and append its row."""
    from sae_lightning.evaluate.after import evaluate_finished
    from sae_lightning.group.members import Member
    from sae_lightning.group.run import run_group
    from sae_lightning.train.rundir import RunDir

    members = [Member(job.name, work / "runs" / job.name, config) for job, config in zip(group, configs,
                                                                                        strict=True)]
    summaries = [RunDir(m.run_dir).read_summary() for m in members]
    trained = all(s is not None and s.status == "finished" and (m.run_dir / "sae" / "cfg.json").is_file()
                  for m, s in zip(members, summaries, strict=True))
    start = time.perf_counter()
    if not trained:
        group_dir = work / ".groups" / f"{group[0].name}..{group[-1].name}"
        summaries = run_group(members, group_dir)
    group_seconds = time.perf_counter() - start
    for job, member, summary in zip(group, members, summaries, strict=True):
        row: dict[str, Any] = {"job": job.name, "architecture": job.architecture, "width": job.width,
                               "l0_asked": job.l0, "sae_seed": job.sae_seed, "group": [j.name for j in group],
                               "fingerprint": fingerprint(member.config, code), "code": code,
                               "status": summary.status, "error": summary.error, "steps": summary.steps,
                               "tokens": summary.tokens, "train_seconds": summary.train_seconds,
                               "group_seconds": round(group_seconds, 1) if not trained else None,
                               "d_sae": summary.d_sae, "run_dir": str(member.run_dir),
                               "val": {k: v for k, v in summary.metrics.items() if k.startswith("val/")}}
        if summary.status == "finished":
            metrics = evaluate_finished(summary, member.cfg)
            row["validation_half"] = metrics
            if metrics is None:
                row["status"], row["error"] = "eval_failed", RunDir(member.run_dir).read_summary().error
        append_row(rows_path, row)
        print(f"{job.name}: {row['status']}", _brief(row.get("validation_half")), flush=True)


def _brief(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return ""
    keys = ("l0", "explained_variance", *SCORE_KEYS, "latent_token_matched_lift_median", "eval_seconds")
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float)))


def score_key(rows: list[dict[str, Any]]) -> str:
    """The score the rule maximises: latent minus neuron coherence where the evaluation reports it."""
    have = [r["validation_half"] for r in rows if r.get("validation_half")]
    return next((k for k in SCORE_KEYS if have and all(k in m for m in have)), SCORE_KEYS[-1])


def choose(rows: list[dict[str, Any]], min_ev: float) -> dict[str, Any] | None:
    """The selection rule (module docstring) on the validation half."""
    key = score_key(rows)
    eligible = [r for r in rows if r["sae_seed"] == 0 and r.get("validation_half")
                and r["validation_half"].get("explained_variance", -math.inf) >= min_ev
                and math.isfinite(r["validation_half"].get(key, math.nan))]
    if not eligible:
        return None
    return max(eligible, key=lambda r: (r["validation_half"][key], -r["validation_half"]["l0"]))


def evaluate_test_half(row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The job's evaluation on the test half of the held-out contexts (into ``<run>/eval_test``)."""
    from sae_lightning.config import EvaluateAfterConfig
    from sae_lightning.evaluate.run import run_evaluation

    run_dir = Path(row["run_dir"])
    cfg = EvaluateAfterConfig(True, [*eval_overrides(args, "test"), f"out_dir={run_dir / 'eval_test'}"])
    start = time.perf_counter()
    metrics = json.loads(run_evaluation(cfg.eval_config(run_dir)).read_text())
    metrics["eval_seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def _value(metrics: dict[str, Any] | None, key: str) -> str:
    """``0.0727 [0.061, 0.083]``: a number with its interval where the evaluation gave one."""
    if not metrics or not isinstance(metrics.get(key), (int, float)):
        return "-"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    both = isinstance(low, (int, float)) and isinstance(high, (int, float))
    ci = f" [{low:.4f}, {high:.4f}]" if both else ""
    return f"{metrics[key]:.4f}{ci}"


def frontier(points: list[tuple[float, float, str]], lower_x_better: bool) -> list[str]:
    """Names of the points no other point beats on both x (L0 lower / explained variance higher) and the
    score (higher)."""
    sign = 1 if lower_x_better else -1
    out = []
    for x, y, name in points:
        if not any(sign * x2 <= sign * x and y2 >= y and (x2, y2) != (x, y) for x2, y2, _ in points):
            out.append(name)
    return out


def report(rows: list[dict[str, Any]], jobs: list[Job], args: argparse.Namespace, command: str,
           test: dict[str, Any] | None) -> str:
    """The results file: header, grid progress, the table, the frontiers, the choice and its test half."""
    key = score_key(rows)
    done = {r["job"]: r for r in rows}
    lines = [header(command).rstrip("\n"),
             f"# grid: {len(jobs)} jobs ({', '.join(args.architectures)} + {REFERENCE} reference; L0 "
             f"{'/'.join(map(str, args.l0))}; widths {'/'.join(map(str, args.widths))} x d_in); "
             f"{len(done)} with a row; score: {key}; split seed {args.split_seed}; rule: max score at "
             f"validation-half explained variance >= {args.min_ev}",
             "", "validation half of the held-out contexts (the choice is made here):"]
    titles = ["job", "L0", "EV", "nmse", *(k.replace("_median", "") for k in SHOWN), "train s", "eval s"]
    lines.append(" | ".join(titles))
    for job in jobs:
        r = done.get(job.name)
        m = (r or {}).get("validation_half") or {}
        if r is None:
            lines.append(f"{job.name} | (not run yet)")
            continue
        if not m:
            lines.append(f"{job.name} | {r['status']}: {r.get('error')}")
            continue
        present = [_value(m, k) for k in SHOWN]
        lines.append(" | ".join([job.name, f"{m['l0']:.1f}", f"{m['explained_variance']:.4f}",
                                 f"{m['nmse']:.4f}", *present, f"{r['train_seconds']:.0f}",
                                 f"{m.get('eval_seconds', 0):.0f}"]))
    scored = [(r["validation_half"]["l0"], r["validation_half"]["explained_variance"],
               r["validation_half"][key], r["job"]) for r in rows
              if r.get("validation_half") and isinstance(r["validation_half"].get(key), (int, float))]
    lines += ["", f"interpretability frontier ({key}, validation half):",
              "  against L0 (lower L0, higher score): "
              + ", ".join(frontier([(a, s, n) for a, _, s, n in scored], True)),
              "  against explained variance (higher EV, higher score): "
              + ", ".join(frontier([(e, s, n) for _, e, s, n in scored], False))]
    seeds = [(r["job"], r["validation_half"].get(key)) for r in rows
             if r["sae_seed"] == 1 and r.get("validation_half")]
    for name, value in seeds:
        twin = done.get(name.replace("_s1", "_s0"), {}).get("validation_half") or {}
        lines.append(f"  seed spread: {name} {value:.4f} vs seed 0 {twin.get(key, math.nan):.4f}")
    lines.append("")
    if len(done) < len(jobs):
        lines.append(f"choice: pending ({len(done)} of {len(jobs)} jobs have a row; the rule runs on the "
                     "whole grid only)")
    elif test is None:
        lines.append(f"choice: no job reaches explained variance >= {args.min_ev} on the validation half")
    else:
        lines += [f"choice (validation half): {test['chosen']}; reference: {test['reference']}",
                  "test half (held-out contexts no choice saw):"]
        for name in (test["chosen"], test["reference"]):
            m = test["metrics"][name]
            lines.append(f"  {name}: L0 {m['l0']:.1f}, EV {m['explained_variance']:.4f}, "
                         + ", ".join(f"{k} {_value(m, k)}" for k in SHOWN if k in m))
        lines.append(f"  verdict: {test['verdict']}")
    return "\n".join(lines) + "\n"


def verdict(chosen: dict[str, Any], reference: dict[str, Any], key: str) -> str:
    """Whether the chosen setting beats the reference beyond the intervals on the test half."""
    low, high = chosen.get(f"{key}_ci_low"), reference.get(f"{key}_ci_high")
    if low is None or high is None:
        return (f"{key} {chosen.get(key, math.nan):.4f} vs {reference.get(key, math.nan):.4f}; no intervals "
                "in this evaluation, so no claim beyond them")
    beyond = low > high
    return (f"{key}: chosen interval low {low:.4f} {'>' if beyond else '<='} reference interval high "
            f"{high:.4f}: {'better beyond the intervals' if beyond else 'not better beyond the intervals'}")


def plot(rows: list[dict[str, Any]], path: Path, key: str) -> None:
    """The score (with its interval) against L0 and against explained variance, one line per
    (architecture, width) over L0, seed 1 and the reference as separate markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110, sharey=True)
    colors = dict(zip([*ARCHITECTURES, REFERENCE], plt.get_cmap("tab10").colors, strict=False))
    series: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        m = r.get("validation_half") or {}
        if isinstance(m.get(key), (int, float)):
            series.setdefault((r["architecture"], r["width"], r["sae_seed"]), []).append(m)
    for (arch, width, seed), ms in sorted(series.items()):
        ms = sorted(ms, key=lambda m: m["l0"])
        ys = [m[key] for m in ms]
        err = [[y - m.get(f"{key}_ci_low", y) for m, y in zip(ms, ys, strict=True)],
               [m.get(f"{key}_ci_high", y) - y for m, y in zip(ms, ys, strict=True)]]
        style = {"marker": "o" if width == min(r["width"] for r in rows) else "s",
                 "linestyle": "-" if seed == 0 else "none", "color": colors.get(arch), "capsize": 3,
                 "markerfacecolor": "none" if seed else colors.get(arch)}
        label = f"{arch} x{width}" + (f" seed {seed}" if seed else "")
        for ax, x_key in zip(axes, ("l0", "explained_variance"), strict=True):
            ax.errorbar([m[x_key] for m in ms], ys, yerr=err, label=label, **style)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("L0 (validation half)")
    axes[1].set_xlabel("explained variance (validation half)")
    axes[0].set_ylabel(key)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("Interpretability frontier: SmolLM2-135M layer 6 mlp_post")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace, command: str) -> None:
    code = code_hash()
    work = Path(args.work) / code
    out = Path(args.out)
    rows_path = out.with_suffix(".jsonl")
    groups = grid(args)
    jobs = [job for group in groups for job in group]
    common = common_overrides(args)
    if not args.report_only:
        for group in groups:
            configs = [compose([*common, *job.overrides]) for job in group]
            have = {r["fingerprint"] for r in read_rows(rows_path)}
            if all(fingerprint(c, code) in have for c in configs):
                continue
            with shared_lock(args.lock):
                train_and_evaluate(group, configs, work, rows_path, code, args)
            time.sleep(args.pause)  # lets a waiting exclusive (timing) lock in between two groups
    current = {fingerprint(compose([*common, *job.overrides]), code) for job in jobs}
    rows = [r for r in read_rows(rows_path) if r["fingerprint"] in current]
    rows = list({r["job"]: r for r in rows}.values())  # the last row of each job
    test = None
    if len({r["job"] for r in rows}) == len(jobs):
        test = held_out_figures(rows, rows_path, args)
    key = score_key(rows)
    atomic_write_text(out.with_suffix(".txt"), report(rows, jobs, args, command, test))
    plot(rows, out.with_suffix(".png"), key)
    if (work / "runs").is_dir():
        from sae_lightning.sweep.compare import compare_sweep

        compare_sweep(work / "runs")
    print(out.with_suffix(".txt").read_text())


def held_out_figures(rows: list[dict[str, Any]], rows_path: Path, args: argparse.Namespace) -> dict | None:
    """The rule's choice and the reference on the test half: evaluated once, kept in a ``test`` row."""
    key = score_key(rows)
    chosen = choose(rows, args.min_ev)
    if chosen is None:
        return None
    reference = next(r for r in rows if r["architecture"] == REFERENCE)
    stamp = fingerprint([chosen["fingerprint"], reference["fingerprint"]], "test")
    saved = [r for r in read_rows(rows_path.with_name(rows_path.stem + "_test.jsonl"))
             if r["fingerprint"] == stamp]
    if saved:
        return saved[-1]
    names = list(dict.fromkeys([chosen["job"], reference["job"]]))
    with shared_lock(args.lock):
        metrics = {r["job"]: evaluate_test_half(r, args) for r in rows if r["job"] in names}
    test = {"fingerprint": stamp, "chosen": chosen["job"], "reference": reference["job"], "metrics": metrics,
            "verdict": verdict(metrics[chosen["job"]], metrics[reference["job"]], key)}
    append_row(rows_path.with_name(rows_path.stem + "_test.jsonl"), test)
    return test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--l0", nargs="+", type=int, default=[16, 45, 128],
                        help="L0 asked (sae.k / sae.target_l0)")
    parser.add_argument("--widths", nargs="+", type=int, default=[2, 8], help="d_sae / d_in")
    parser.add_argument("--train-tokens", type=int, default=None, help="default: experiment=quickstart's")
    parser.add_argument("--units", type=int, default=None, help="scored units (default: evaluate.py's)")
    parser.add_argument("--min-ev", type=float, default=0.7)
    parser.add_argument("--split-seed", type=int, default=0, help="evaluate.py context_split_seed")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "activations"))
    parser.add_argument("--work", default=str(ROOT / "outputs" / "interp_frontier"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "interp_frontier"))
    parser.add_argument("--lock", default=None, help="a lock file whose shared lock each group takes")
    parser.add_argument("--pause", type=float, default=5.0, help="seconds between groups (--lock)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny budget: 2 architectures, L0 16/45, one width, 4096 tokens, 8 units")
    args = parser.parse_args()
    if args.smoke:
        args.architectures, args.l0, args.widths = ["relu_dn", "topk"], [16, 45], args.widths[:1]
        args.train_tokens, args.units = 4096, 8
        args.work, args.out = "/tmp/interp_frontier_smoke/work", "/tmp/interp_frontier_smoke/interp_frontier"
    run(args, invocation("benchmarks.interp_frontier"))


if __name__ == "__main__":
    main()
