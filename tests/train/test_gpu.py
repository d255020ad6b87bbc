"""What docs/multi-gpu.md promises on a GPU (marker ``gpu``; skipped where CUDA is absent, as in CI): every
architecture's training step on CUDA computes what it computes on CPU (the TopK family's sparse kernels
included), bf16 autocast stays near fp32, a compiled SAE trains like the eager one, and ``train.py`` then
``evaluate.py`` run with ``trainer=gpu trainer.compile=true`` (bf16 autocast) and ``trainer=ddp`` (NCCL)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_lightning.saes import SAE, build_sae, config_from_dict
from sae_lightning.train.step import LatentStats, train_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[2]
D_IN, D_SAE, ROWS = 64, 512, 1024
# architecture -> (config keys, sparsity coefficient passed to the step)
ARCHS = {"relu": ({}, 3e-3), "relu_dn": ({}, 3e-3), "gated": ({}, 3e-3),
         "jumprelu": ({"l0_coeff": 1e-2}, 0.0), "topk": ({"k": 16}, 0.0), "batchtopk": ({"k": 16}, 0.0),
         "matryoshka": ({"k": 16}, 0.0)}


def _data(seed: int = 0) -> torch.Tensor:
    """Sparse combinations of 256 random directions (so latents have structure to find), on CPU."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.rand(ROWS, 256, generator=g) * (torch.rand(ROWS, 256, generator=g) < 0.05)
    return codes @ torch.randn(256, D_IN, generator=g)


def _sae(arch: str, **keys: object) -> SAE:
    torch.manual_seed(0)
    sae = build_sae(config_from_dict({"architecture": arch, "d_sae": D_SAE, **ARCHS[arch][0], **keys}), D_IN)
    sae.init_from_data(_data(1))
    return sae


def _train(sae: SAE, x: torch.Tensor, steps: int, coeff: float, autocast: bool = False) -> list[float]:
    """``steps`` trainer steps on ``x`` (batches of 256, wrapping); the losses."""
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    stats = LatentStats(sae.d_sae, 10**9).to(x.device)
    losses = []
    for i in range(steps):
        batch = x[(i * 256) % ROWS:(i * 256) % ROWS + 256]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = train_step(sae, opt, batch, stats, coeff=coeff, grad_clip=1.0, step=i)
        losses.append(float(out.loss.detach()))
    return losses


@pytest.mark.parametrize(("arch", "keys"),
                         [(a, {"sparse_kernel": k}) for a in ARCHS for k in ("sparse", "dense")])
def test_cuda_steps_match_cpu(arch: str, keys: dict[str, str]) -> None:
    """Five steps from one init on CPU and on CUDA give the same losses and weights (float32, TF32 off)."""
    cpu = _sae(arch, **keys)
    gpu = copy.deepcopy(cpu).cuda()
    x = _data()
    coeff = ARCHS[arch][1]
    torch.testing.assert_close(torch.tensor(_train(gpu, x.cuda(), 5, coeff)),
                               torch.tensor(_train(cpu, x, 5, coeff)), rtol=1e-4, atol=1e-6)
    for name, p in cpu.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[name].cpu(), p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_autocast_trains_close_to_float32(arch: str) -> None:
    """Under bf16 autocast (what ``trainer.precision=bf16-mixed`` wraps the step in) the weights stay float32,
    the loss stays finite, and 100 steps end within 5 % of the float32 run's loss."""
    x = _data().cuda()
    coeff = ARCHS[arch][1]
    fp32 = _train(_sae(arch).cuda(), x, 100, coeff)
    sae = _sae(arch).cuda()
    bf16 = _train(sae, x, 100, coeff, autocast=True)
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert torch.isfinite(torch.tensor(bf16)).all()
    assert bf16[-1] < 0.7 * bf16[0]
    assert abs(sum(bf16[-5:]) - sum(fp32[-5:])) < 0.05 * sum(fp32[-5:])


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
def test_compiled_sae_trains_like_eager(arch: str) -> None:
    """``trainer.compile=true`` compiles the SAE module (``SAE.compile()``): same losses and weights."""
    eager = _sae(arch).cuda()
    compiled = copy.deepcopy(eager)
    compiled.compile()
    x, coeff = _data().cuda(), ARCHS[arch][1]
    torch.testing.assert_close(torch.tensor(_train(compiled, x, 5, coeff)),
                               torch.tensor(_train(eager, x, 5, coeff)), rtol=1e-4, atol=1e-6)
    for name, p in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], p, rtol=1e-4, atol=1e-5, msg=name)


def _cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAE_LIGHTNING_CACHE": str(cwd / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.parametrize("trainer", [("trainer=gpu", "trainer.compile=true", "sae=topk"),
                                     ("trainer=ddp", "sae=batchtopk")])
def test_train_then_evaluate_on_the_gpu(tmp_path: Path, tiny_gpt2_dir: Path, tinystories_path: Path,
                                        trainer: tuple[str, ...]) -> None:
    """The CLI on one GPU: the LM's cache built on CUDA, the SAE trained under bf16 autocast (compiled, or
    under DDP with NCCL), then evaluated: the run learnt something and says it ran on the GPU."""
    run_dir = tmp_path / "run"
    proc = _cli("train.py", f"model.name={tiny_gpt2_dir}", "data=tinystories_local",
                f"data.path={tinystories_path}", "data.context_size=64", "data.n_tokens=20000",
                "activations.shard_rows=2048", "layer=1", "sae.dict_mult=4", "sae.k=8", "lr=3e-3",
                "batch_size=256", "train_tokens=25600", "logger=csv", *trainer,
                "trainer.val_every_n_steps=25", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}",
                cwd=tmp_path)
    assert "GPU available: True (cuda), used: True" in proc.stdout + proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 100
    state = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True, map_location="cpu")
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    proc = _cli("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'final.ckpt'}", "monosemanticity=false",
                "downstream_contexts=8", cwd=tmp_path)
    m = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    assert 0.3 < m["explained_variance"] <= 1.0 and m["ce_loss_recovered"] > 0


def test_live_activations_on_the_gpu(tmp_path: Path, tiny_gpt2_dir: Path, tinystories_path: Path) -> None:
    """``activations=live`` with the LM in bf16 on CUDA (its windows filled on a side stream by the
    prefetch thread) and the SAE under bf16 autocast: the run finishes, learns, and writes no cache."""
    run_dir = tmp_path / "run"
    _cli("train.py", "activations=live", f"model.name={tiny_gpt2_dir}", "model.dtype=bfloat16",
         "model.device=cuda:0", "data=tinystories_local", f"data.path={tinystories_path}",
         "data.context_size=64", "data.n_tokens=20000", "activations.buffer_tokens=4096", "layer=1",
         "sae.dict_mult=4", "lr=3e-3", "batch_size=256", "train_tokens=25600", "logger=csv", "trainer=gpu",
         "trainer.limit_val_batches=4", "trainer.val_every_n_steps=25", "trainer.progress_bar=false",
         f"hydra.run.dir={run_dir}", cwd=tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 100
    assert summary["metrics"]["val/explained_variance"] > 0.3
    assert not (tmp_path / "cache").exists()
