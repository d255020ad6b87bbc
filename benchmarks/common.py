"""What the benchmark scripts share: the results header and writer, how each library trains an SAE step by
step, the data they time it on, and how a run is scored on held-out rows.

Run every script from the repository root as ``python -m benchmarks.<name>``.

The CPU's speed varies about 2x between sessions here, so a figure is only comparable with the GEMM rate
measured in the same run; the header every results file starts with carries it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import numpy as np

    from sae_lightning.config import TrainConfig
    from sae_lightning.saes import SAE, SAEConfig
    from sae_lightning.train.step import LatentStats

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PRESETS = REPO / "conf" / "sae"
Step = Callable[..., None]
PENALISED_COEFF = 5.0  # the L1 / L0 coefficient of penalised SAEs timed at a held L0 (it cannot move L0 then)


# ---------------------------------------------------------------- the results header and writer
def gemm_gflops(n: int = 2048, reps: int = 5) -> float:
    """Median fp32 GEMM rate ``[n, n] @ [n, n]`` in GFLOP/s, with this process's thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[reps // 2] / 1e9


def version(package: str) -> str:
    """The installed version of ``package``, or ``absent``."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def invocation(module: str, argv: list[str] | None = None) -> str:
    """The command that runs ``module`` (a script's ``__spec__.name``, ``benchmarks.<name>``) with ``argv``
    (None: this process's arguments): ``python -m benchmarks.<name> <arguments>``."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def header(command: str) -> str:
    """``# key: value`` lines: command, commit (``+dirty`` with uncommitted changes to the measured code;
    results files, which the scripts themselves write, do not count), UTC date, versions, threads,
    measured GEMM rate, and the load average when stamped (other work on the machine slows timings; it
    leaves quality figures as they are)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "sae_lightning", "benchmarks", "conf", "train.py",
                ":(exclude)benchmarks/results")
    commit = git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    lines = {"command": command, "commit": commit,
             "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
             "versions": f"torch {torch.__version__}, transformers {version('transformers')}, "
                         f"lightning {version('lightning')}, sae-lens {version('sae-lens')}",
             "threads": str(torch.get_num_threads()),
             "fp32 GEMM": f"{gemm_gflops():.0f} GFLOP/s (2048^3, median of 5)",
             "load average": "{:.1f} {:.1f} {:.1f} (1, 5, 15 min)".format(*os.getloadavg())}
    return "".join(f"# {k}: {v}\n" for k, v in lines.items())


class Report:
    """Lines printed as they come and kept, to be written whole under :func:`header` at the end (a rerun
    replaces the file; nothing is appended). ``module`` and ``argv``: the command (:func:`invocation`);
    ``stamp``: make and print the header now (a long run shows its settings first), else when the file is
    written."""

    def __init__(self, module: str, argv: list[str] | None = None, stamp: bool = False) -> None:
        self.command = invocation(module, argv)
        self.lines: list[str] = []
        self.head = header(self.command) if stamp else None
        if self.head:
            print(self.head, end="", flush=True)

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self, path: Path | None) -> None:
        """Write the header and every line to ``path`` (nothing when None)."""
        if path is None:
            return
        from sae_lightning.io import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        head = self.head or header(self.command)
        if self.head:   # stamped at the start: the load at the end too
            head += "# load average at the end: {:.1f} {:.1f} {:.1f} (1, 5, 15 min)\n".format(
                *os.getloadavg())
        atomic_write_text(path, head + "\n".join(self.lines) + "\n")


def add_out_arg(p: argparse.ArgumentParser, default: Path | None = None) -> None:
    """``--out FILE``: also write the report there, whole, under the header."""
    p.add_argument("--out", type=Path, default=default,
                   help="also write the report there, whole, under the results header")


def med_range(values: Iterable[float], fmt: str = ".2f", paren: bool = False) -> str:
    """``median [min-max]`` (``median (min-max)`` with ``paren``) of ``values`` in format ``fmt``."""
    v = list(values)
    lo, hi = ("(", ")") if paren else ("[", "]")
    return f"{statistics.median(v):{fmt}} {lo}{min(v):{fmt}}-{max(v):{fmt}}{hi}"


# ---------------------------------------------------------------- configs as train.py composes them
def compose(overrides: list[str]) -> tuple[TrainConfig, dict]:
    """(``TrainConfig``, resolved dict) that ``python train.py <overrides>`` runs."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from sae_lightning.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        dict_cfg = hydra_compose("train", overrides=overrides)
        return to_config(dict_cfg), OmegaConf.to_container(dict_cfg, resolve=True)


def preset(name: str, **overrides: object) -> SAEConfig:
    """The config that ``sae=<name>`` composes (its schema's defaults, then the preset's values), with
    ``overrides`` (d_sae, k, ...) on top."""
    from omegaconf import OmegaConf

    from sae_lightning.saes import config_from_dict

    values = OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"))
    values.pop("defaults", None)
    return config_from_dict({"architecture": name, **values, **overrides})


# ---------------------------------------------------------------- data for timing
def heavy_tailed(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Student-t(3) entries times per-dimension log-normal scales (a few dimensions dominate the norm):
    activations of a real shape for throughput, which does not depend on the values."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(3.0).sample((n, d))
    scale = torch.exp(torch.randn(d, generator=g))
    return (t * scale).float()


# ---------------------------------------------------------------- each library's training step
def ours_trainer(cfg: SAEConfig, d_in: int, coeff: float, lr: float = 1e-4,
                 dead_window_tokens: int | None = None, sae: SAE | None = None,
                 stats: LatentStats | None = None, l1_warmup_steps: int = 0,
                 clip_scope: str = "group") -> tuple[torch.nn.Module, Step]:
    """Our SAE (``sae``, else built from ``cfg``) and ``step.train_step`` with the trainer's defaults
    (gradient clipping, dead window, the ``sae.target_l0`` controller when ``cfg`` sets one: ``coeff`` is
    then its start); ``stats``: the ``LatentStats`` to use, for a caller that sets which latents are
    dead; ``l1_warmup_steps``: ``optim.l1_warmup_steps``, the coefficient's linear warm-up, during which
    the controller waits (as ``SAEModule.training_step``); ``clip_scope``: ``optim.grad_clip_scope``."""
    from sae_lightning.config import LatentsConfig, OptimConfig
    from sae_lightning.saes import build_sae
    from sae_lightning.train.sparsity import TargetL0
    from sae_lightning.train.step import LatentStats, adam, train_step, warmup_scale

    sae = build_sae(cfg, d_in) if sae is None else sae
    opt = adam(sae.param_groups(lr))
    if stats is None:
        stats = LatentStats(sae.d_sae, dead_window_tokens or LatentsConfig().dead_window_tokens)
    grad_clip = OptimConfig().grad_clip
    target = getattr(cfg, "target_l0", None)
    steer = TargetL0(target, two_sided=sae.two_sided_target) if target is not None else None

    done = 0  # steps taken

    def step(x: torch.Tensor) -> None:
        nonlocal done
        warm = warmup_scale(done, l1_warmup_steps)
        scale = steer.scale() if steer is not None else 1.0
        out = train_step(sae, opt, x, stats, coeff=coeff * warm * scale, grad_clip=grad_clip,
                         clip_scope=clip_scope, step=done)
        if steer is not None and warm == 1:
            steer.update(out.l0.detach())
        done += 1

    return sae, step


# SAELens architecture -> (module in sae_lens.saes, training SAE class, its coefficient field and key)
SAELENS = {"standard": ("standard_sae", "StandardTrainingSAE", "l1_coefficient", "l1"),
           "topk": ("topk_sae", "TopKTrainingSAE", None, None),
           "batchtopk": ("batchtopk_sae", "BatchTopKTrainingSAE", None, None),
           "matryoshka": ("matryoshka_batchtopk_sae", "MatryoshkaBatchTopKTrainingSAE", None, None),
           "gated": ("gated_sae", "GatedTrainingSAE", "l1_coefficient", "l1"),
           "jumprelu": ("jumprelu_sae", "JumpReLUTrainingSAE", "l0_coefficient", "l0")}
# SAELens's faster TopK mode; its backward needs the decoder-norm rescaling off (benchmarks.train_step)
SAELENS_SPARSE = {"use_sparse_activations": True, "rescale_acts_by_decoder_norm": False}


def saelens_trainer(arch: str, d_in: int, d_sae: int, coeff: float, lr: float = 1e-4,
                    dead_window_steps: int = 10**9, **kw: object) -> tuple[torch.nn.Module, Step]:
    """SAELens's training SAE ``arch`` (a key of ``SAELENS``, its defaults plus ``kw``) and its step as
    ``SAETrainer._train_step`` runs it; ``coeff`` is its sparsity coefficient (ignored by TopK-family)."""
    import importlib

    from sae_lens.saes.sae import TrainStepInput

    module, cls, field, key = SAELENS[arch]
    mod = importlib.import_module(f"sae_lens.saes.{module}")
    cfg_kw = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", **kw}
    if field:
        cfg_kw[field] = coeff
    sae = getattr(mod, cls)(getattr(mod, cls + "Config")(**cfg_kw))
    coefficients = {key: coeff} if key else {}
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(d_sae)  # in steps, as SAETrainer counts

    def step(x: torch.Tensor) -> None:
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x, dead_neuron_mask=since_fired > dead_window_steps, coefficients=coefficients,
            n_training_steps=0, is_logging_step=False))
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return sae, step


# ---------------------------------------------------------------- timing in turns
@torch.no_grad()
def hold_l0(sae: torch.nn.Module, x: torch.Tensor, l0: float) -> Step:
    """Set the encoder biases of a penalised SAE (ours or SAELens's) so that each latent fires on ``l0 /
    d_sae`` of the rows of ``x`` (JumpReLU: the thresholds, the bias at zero; gated: the gate bias, the
    magnitude path then positive wherever the gate is open); returns what puts these weights back."""
    from sae_lightning.saes import SAE

    ours = isinstance(sae, SAE)
    h = sae.pre_acts(sae.normalize(x), bias=0.0) if ours else sae.process_sae_in(x) @ sae.W_enc
    keep = round(x.shape[0] * (1 - l0 / h.shape[1]))  # the rows each latent does not fire on
    cut = h.kthvalue(keep, dim=0).values
    if hasattr(sae, "threshold"):
        sae.threshold.copy_(cut)
        sae.b_enc.zero_()
    else:  # SAELens's gated SAE names its gate bias b_gate, ours b_enc
        (sae.b_gate if hasattr(sae, "b_gate") else sae.b_enc).copy_(-cut)
    held = {name: p.detach().clone() for name, p in sae.named_parameters()}

    def reset() -> None:
        with torch.no_grad():
            for name, p in sae.named_parameters():
                p.copy_(held[name])

    return reset


@torch.no_grad()
def measured_l0(sae: torch.nn.Module, x: torch.Tensor) -> float:
    """The mean number of active latents per row of ``x`` of ours or SAELens's SAE (training forward)."""
    from sae_lightning.saes import SAE

    if isinstance(sae, SAE):
        return float(sae(sae.normalize(x), sparsity_coeff=0.0).l0)
    return float((sae.encode(x) != 0).sum(-1).float().mean())


def gemm_steps(batch: int, d_in: int, d_sae: int) -> dict[str, Step]:
    """The step's three GEMM shapes (forward encoder, decoder, weight gradient) as timed contenders."""
    a, w = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    z, wd = torch.randn(batch, d_sae), torch.randn(d_sae, d_in)
    return {"gemm [B,d_in]@[d_in,d_sae]": lambda: a @ w, "gemm [B,d_sae]@[d_sae,d_in]": lambda: z @ wd,
            "gemm [d_in,B]@[B,d_sae]": lambda: a.t() @ z}


def time_in_turns(contenders: dict[str, Step], reps: int, prepare: dict[str, Step] | None = None,
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds of each contender in each of ``reps`` turns (after a warm-up call);
    ``prepare[name]``, when given, runs untimed before each of that contender's calls.

    CPU seconds count what the process itself burnt, so they show less of other load on the machine.
    """
    prepare = prepare or {}
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for name, fn in contenders.items():
        prepare.get(name, lambda: None)()
        fn()
    for _ in range(reps):
        for name, fn in contenders.items():
            prepare.get(name, lambda: None)()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


# ---------------------------------------------------------------- whole processes
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Run:
    """One timed process: wall and CPU seconds, peak RSS in GiB."""

    wall: float
    cpu: float
    rss_gb: float


def module_command(name: str, *args: str) -> list[str]:
    """The command line of ``python -m benchmarks.<name> <args>`` with this interpreter (a worker
    process; run it with ``cwd=REPO``)."""
    return [sys.executable, "-m", f"benchmarks.{name}", *args]


# Runs the command it is given as its own forked child and writes (exit code, CPU s, peak RSS KiB) to a file.
_LAUNCHER = """import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump([os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, usage.ru_maxrss], f)
"""


def run_child(cmd: list[str], **popen: object) -> tuple[int, Run, str | None]:
    """Run ``cmd`` (its first item a path) to its exit: exit code, wall and CPU seconds and peak RSS, and
    its standard error when ``popen`` asks for it (``stderr=subprocess.PIPE``).

    Linux hands a process the peak RSS of the memory it had before ``exec`` (``ru_maxrss``: a vfork child
    gets its parent's peak, a forked one its parent's RSS at the fork), so a child of this process would
    report this process's peak whenever it is the larger. ``cmd`` is therefore forked by a small launcher
    process, whose peak is a few MiB."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(result), *cmd], **popen)
        _, err = proc.communicate()
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"the launcher of {' '.join(cmd)} failed (exit {proc.returncode})")
        code, cpu, kib = json.loads(result.read_text())
    return code, Run(wall, cpu, kib / 2**20), err


def timed(cmd: list[str], log: Path) -> Run:
    """Run ``cmd`` offline from the repository root (output to ``log``); its wall and CPU seconds and peak
    RSS; raise if it fails."""
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [shutil.which(cmd[0]) or cmd[0], *cmd[1:]]
    with open(log, "w") as out:
        code, run, _ = run_child(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if code != 0:
        raise RuntimeError(f"exit {code} after {run.wall:.1f} s wall, {run.cpu:.1f} s CPU: "
                           f"{' '.join(cmd)}\n{log.read_text()[-4000:]}")
    return run


# ---------------------------------------------------------------- SAEs trained and scored on held-out rows
def synthetic(n: int, d_in: int, n_features: int, mean_active: float, seed: int = 0) -> torch.Tensor:
    """``n`` rows of ``activations=synthetic``'s generator (``sae_lightning.cache.synthetic``: sparse
    log-normal codes over a random unit-norm dictionary, Zipf-like firing frequencies, Gaussian noise) plus a
    constant offset, which SAEs whose ``b_dec`` starts at zero must learn [n, d_in]."""
    import numpy as np

    from sae_lightning.cache.synthetic import SyntheticGenerator
    from sae_lightning.config import SyntheticConfig

    cfg = SyntheticConfig(n_features=n_features, d=d_in, n_rows=n, mean_active=mean_active, freq_exponent=0.7,
                          magnitude_mean=1.5, magnitude_std=1.0, noise_std=0.05, seed=seed)
    rng = np.random.default_rng([seed, 3])
    offset = 0.5 * rng.standard_normal(d_in, dtype=np.float32)
    return torch.from_numpy(SyntheticGenerator(cfg).rows(rng, n) + offset)


def read_rows(path: str, n: int) -> np.ndarray:
    """The first rows of an ``.npy`` array (``n``) or of an activation cache directory (the whole context
    rows among its first ``n`` rows, so a split after any of them splits no context), as float32."""
    import numpy as np

    if not Path(path).is_dir():
        return np.asarray(np.load(path, mmap_mode="r")[:n], dtype=np.float32)
    from sae_lightning.cache.reader import open_source

    source, parts, docs, left = open_source(path), [], [], n
    for shard, size in enumerate(source.shard_sizes):
        if left <= 0:
            break
        idx = np.arange(min(size, left))
        parts.append(source.read_rows(shard, idx))
        docs.append(source.read_where(shard, idx)[1])
        left -= len(idx)
    rows, doc = np.concatenate(parts), np.concatenate(docs)
    whole = doc != doc[-1] if left <= 0 else np.ones(len(doc), bool)  # drop the last, maybe partial, context
    return rows[whole].astype(np.float32, copy=False)


def data_width(path: str) -> int:
    """The width (d_in) of an ``.npy`` array or activation cache directory, read without loading rows."""
    import numpy as np

    if not Path(path).is_dir():
        return int(np.load(path, mmap_mode="r").shape[1])
    from sae_lightning.cache.reader import open_source

    return int(open_source(path).d)


def source_name(acts: str | None) -> str | None:
    """The data's file name, or a cache's directory name (its ``CacheKey.name``: model, hook, data,
    context, tokens, dtype and the key's hash), not where it lies on the machine that ran it."""
    return Path(acts).name if acts else None


def load(path: str | None, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) activations scaled to ``E||x||^2 = d_in``: the eval rows come after the train rows in
    the source (whole context rows for a cache: ``read_rows`` stops at a context boundary), and only the
    train rows are shuffled. Without ``path``: :func:`synthetic` rows of ``args.d_in``, ``args.features``,
    ``args.mean_active``."""
    n = args.train_rows + args.eval_rows
    x = torch.from_numpy(read_rows(path, n)) if path else synthetic(n, args.d_in, args.features,
                                                                     args.mean_active)
    x = x * math.sqrt(x.shape[1] / x.pow(2).sum(1).mean())
    train, held_out = x[: -args.eval_rows], x[-args.eval_rows:]
    return train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(1))], held_out


@torch.no_grad()
def evaluate(encode_decode: Callable, x: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """(held-out L0, normalized MSE) of ``encode_decode(x) -> (z, x_hat)`` over ``x``, by ``metrics.py``."""
    from sae_lightning.metrics import ReconstructionStats

    stats = ReconstructionStats()
    for xs in x.split(chunk):
        z, x_hat = encode_decode(xs)
        stats.update(xs, x_hat, z)
    values = stats.compute()
    return values["l0"], values["nmse"]


def train(step: Step, train_x: torch.Tensor, args: argparse.Namespace,
          score: Callable[[], tuple[float, float]]) -> list[tuple[int, float, float]]:
    """Run ``args.steps`` steps on consecutive batches (wrapping around: several passes when the train rows
    are fewer than steps x batch), the same for every SAE; ``score()`` -> (L0, nmse) on the held-out rows
    after each ``args.steps / args.curve_points`` steps. Returns the curve [(tokens, L0, nmse)]."""
    curve, every = [], max(1, args.steps // args.curve_points)
    for i in range(args.steps):
        start = (i * args.batch) % (train_x.shape[0] - args.batch + 1)
        step(train_x[start:start + args.batch])
        if (i + 1) % every == 0 or i + 1 == args.steps:
            curve.append(((i + 1) * args.batch, *score()))
    return curve


def train_counting_fires(sae: torch.nn.Module, step: Step, train_x: torch.Tensor, eval_x: torch.Tensor,
                         args: argparse.Namespace
                         ) -> tuple[list[tuple[int, float, float]], torch.Tensor, int]:
    """:func:`train` scored through ``sae.encode``/``decode`` (ours or SAELens's), also counting how often
    each latent fires on the held-out rows: (curve, each latent's firing frequency at the last point,
    seconds)."""
    fires = torch.zeros(args.d_sae)

    def encode_decode(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = sae.encode(xs)
        fires.add_((z.to_dense() if z.is_sparse else z).ne(0).sum(0))
        return z, sae.decode(z)

    def score() -> tuple[float, float]:
        sae.eval()
        fires.zero_()
        result = evaluate(encode_decode, eval_x)
        sae.train()
        return result

    sae.train()
    t0 = time.perf_counter()
    curve = train(step, train_x, args, score)
    return curve, fires / eval_x.shape[0], round(time.perf_counter() - t0)


def frequency_summary(freq: torch.Tensor) -> dict[str, object]:
    """How the latents' held-out firing frequencies spread: the fraction that never fire (``dead``), fire on
    under 1 % of rows (``rare``) or on over half (``dense``), and the 5 / 50 / 95 % quantiles
    (``freq_quantiles``). Two SAEs at one L0 can split it very differently."""
    quantiles = torch.quantile(freq.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return {"dead": (freq == 0).float().mean().item(), "rare": (freq < 0.01).float().mean().item(),
            "dense": (freq > 0.5).float().mean().item(), "freq_quantiles": quantiles.tolist()}


def add_run_args(p: argparse.ArgumentParser, *, d_sae: int, train_rows: int, eval_rows: int, batch: int,
                 steps: int, threads: int) -> None:
    """The options that fix how every SAE is trained and scored, with these defaults (the quality
    benchmark and the ablations train alike)."""
    p.add_argument("--d-sae", type=int, default=d_sae)
    p.add_argument("--train-rows", type=int, default=train_rows)
    p.add_argument("--eval-rows", type=int, default=eval_rows)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dead-window", type=int, default=200, help="steps unfired => dead")
    p.add_argument("--b-dec-sample", type=int, default=8192)
    p.add_argument("--curve-points", type=int, default=4, help="held-out scores during training (the curve)")
    p.add_argument("--threads", type=int, default=threads, help="torch threads")


def append_result(path: Path | None, row: dict) -> None:
    """Append ``row`` as one JSON line to ``path`` (nothing when None): a run is kept as soon as it ends."""
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def code_hash(*parts: ModuleType | Callable | str) -> str:
    """12 hex digits of the SHA-256 over ``parts`` in order: the source of modules and functions, strings
    as they are (e.g. a resolved config's ``repr``). What a stored result measured, so that a change to any
    of them marks the result stale."""
    h = hashlib.sha256()
    for part in parts:
        h.update((part if isinstance(part, str) else inspect.getsource(part)).encode())
    return h.hexdigest()[:12]
