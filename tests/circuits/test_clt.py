"""Cross-layer transcoders (``sae_lightning/circuits/``): the maths against a hand computation, the
replacement-model contract, save/load, circuit-tracer's loader on our export, the memory estimate, and a
``clt=true`` run of train.py that resumes; bad inputs refused before work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_lightning.checks import ConfigError
from sae_lightning.circuits.clt import CrossLayerTranscoder, load_clt
from sae_lightning.circuits.export import ExportError, export_circuit_tracer
from sae_lightning.circuits.training import check_clt_model
from sae_lightning.config import EvalConfig
from sae_lightning.evaluate.run import run_evaluation
from sae_lightning.group.memory import clt_parts, weight_bytes
from sae_lightning.saes.batchtopk import BatchTopKConfig
from sae_lightning.saes.jumprelu import JumpReLUConfig
from sae_lightning.saes.topk import TopKConfig
from sae_lightning.train.checkpoints import CheckpointError, load_sae_checkpoint
from tests.live.test_live import BATCH, live_overrides, text  # noqa: F401  (the module-scoped text fixture)
from tests.train.test_resume import ckpt, configure, run_train_py

LAYERS = [0, 1, 2]
D_IN, D_OUT, D_SAE = 4, 3, 5


def tiny_clt(cfg, seed: int = 0, layers: list[int] = LAYERS, d_out: int = D_OUT) -> CrossLayerTranscoder:
    """A CLT with every parameter random (biases and thresholds too) and non-trivial scales."""
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(cfg, layers, D_IN, d_out)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        if cfg.architecture == "jumprelu":
            for t in clt.threshold:
                t.copy_(torch.rand_like(t) * 0.5)
        if cfg.architecture == "batchtopk":
            clt.threshold.copy_(torch.tensor([0.1, 0.2, 0.3][: len(layers)], dtype=torch.float64))
    clt.set_scales([1.5, 0.5, 2.0][: len(layers)], [0.7, 3.0, 1.2][: len(layers)])
    return clt


def hand_latents(clt: CrossLayerTranscoder, i: int, u: torch.Tensor) -> torch.Tensor:
    """Layer i's latents, latent by latent and row by row (the definitions, not the code's tensor ops)."""
    B = u.shape[0]
    z = torch.zeros(B, clt.d_sae, dtype=torch.float64)
    for b in range(B):
        pre = [float(sum(u[b, d] * clt.W_enc[i][d, f] for d in range(clt.d_in)) + clt.b_enc[i][f])
               for f in range(clt.d_sae)]
        for f in range(clt.d_sae):
            if clt.cfg.architecture == "jumprelu":
                z[b, f] = pre[f] if pre[f] > float(clt.threshold[i][f]) else 0.0
            elif clt.cfg.architecture == "topk":
                kept = sorted(range(clt.d_sae), key=lambda g: -pre[g])[: clt.cfg.k]
                z[b, f] = max(pre[f], 0.0) if f in kept else 0.0
    if clt.cfg.architecture == "batchtopk":  # the k * B largest relu(pre) over the whole batch
        pre = (u.double() @ clt.W_enc[i].double() + clt.b_enc[i].double()).relu()
        order = sorted(((float(pre[b, f]), b, f) for b in range(B) for f in range(clt.d_sae)), reverse=True)
        for value, b, f in order[: clt.cfg.k * B]:
            z[b, f] = value
    return z


@torch.no_grad()
def hand_loss(clt: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor, coeff: float) -> float:
    """sum_j mean_b ||sum_{i<=j} z_i W_dec[i][:, j-i] + b_dec[j] - y_j s_out[j]||^2 (+ coeff * L0 terms)."""
    n, B = clt.n_layers, x.shape[0]
    u = [x[:, i] * float(clt.input_scale[i]) for i in range(n)]
    z = [hand_latents(clt, i, u[i]) for i in range(n)]
    loss = 0.0
    for j in range(n):
        for b in range(B):
            for e in range(clt.d_out):
                pred = float(clt.b_dec[j][e])
                for i in range(j + 1):
                    pred += sum(float(z[i][b, f]) * float(clt.W_dec[i][f, j - i, e])
                                for f in range(clt.d_sae))
                loss += (pred - float(y[b, j, e]) * float(clt.target_scale[j])) ** 2 / B
    if clt.cfg.architecture == "jumprelu":
        loss += coeff * sum(float((zi != 0).sum()) / B for zi in z)
    return loss


CONFIGS = {"jumprelu": JumpReLUConfig(d_sae=D_SAE), "topk": TopKConfig(d_sae=D_SAE, k=2),
           "batchtopk": BatchTopKConfig(d_sae=D_SAE, k=2)}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_forward_loss_equals_the_hand_computation_and_every_decoder_block_gets_a_gradient(arch) -> None:
    clt = tiny_clt(CONFIGS[arch])
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, D_IN), torch.randn(6, 3, D_OUT)
    want = hand_loss(clt, x, y, coeff=0.3)
    clt.eval()  # BatchTopK: the threshold estimate is not updated (it does not change the selection)
    out = clt(clt.normalize(x), target=clt.normalize_target(y), sparsity_coeff=0.3)
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    out.loss.backward()
    for i in range(3):
        for k in range(3 - i):  # the decoder block from source layer i to target layer i + k
            assert clt.W_dec[i].grad[:, k].abs().sum() > 0, (i, k)
        assert clt.W_enc[i].grad.abs().sum() > 0
    if arch == "jumprelu":
        assert all(t.grad is not None for t in clt.threshold)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_the_sparse_kernels_compute_the_dense_loss_and_gradients(arch) -> None:
    """``sae.sparse_kernel=sparse`` (only the kept / in-play entries) against ``dense``: same loss, same
    gradient of every parameter."""
    import dataclasses

    grads = {}
    for kernel in ("dense", "sparse"):
        clt = tiny_clt(dataclasses.replace(CONFIGS[arch], sparse_kernel=kernel))
        torch.manual_seed(1)
        x, y = torch.randn(6, 3, D_IN), torch.randn(6, 3, D_OUT)
        clt.eval()
        out = clt(clt.normalize(x), target=clt.normalize_target(y), sparsity_coeff=0.3)
        out.loss.backward()
        grads[kernel] = (out.loss.detach(), out.fire_counts, {n: p.grad for n, p in clt.named_parameters()})
    (loss_d, fire_d, g_d), (loss_s, fire_s, g_s) = grads["dense"], grads["sparse"]
    torch.testing.assert_close(loss_s, loss_d)
    assert torch.equal(fire_s, fire_d)
    for name, g in g_d.items():
        torch.testing.assert_close(g_s[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_the_replacement_contract_is_the_raw_scale_forward(arch) -> None:
    """encode(layer, mlp_in) / decode(layer, latents, mlp_in) on raw activations give the training
    forward's reconstruction divided back to raw (BatchTopK: the forward selects per batch, so compare with
    JumpReLU at its threshold: the per-token encode by hand)."""
    clt = tiny_clt(CONFIGS[arch]).eval()
    torch.manual_seed(2)
    x = torch.randn(5, 3, D_IN)
    latents, preds = {}, []
    for j, layer in enumerate(clt.layers):
        latents[layer] = clt.encode(layer, x[:, j])
        preds.append(clt.decode(layer, latents, x[:, j]))
    if arch != "batchtopk":
        out = clt(clt.normalize(x), target=torch.zeros(5, 3, D_OUT), sparsity_coeff=0.0)
        torch.testing.assert_close(torch.stack(preds, 1), out.x_hat / clt.output_scale)
    for i in range(3):
        u = x[:, i] * clt.input_scale[i]
        pre = u @ clt.W_enc[i] + clt.b_enc[i]
        if arch == "batchtopk":
            torch.testing.assert_close(latents[i], pre * (pre > float(clt.threshold[i])))
    with torch.no_grad():  # layer 2 from layer 0's latents alone
        only = clt.decode(2, {0: latents[0]}, x[:, 2])
        want = (latents[0] @ clt.W_dec[0][:, 2] + clt.b_dec[2]) / clt.target_scale[2]
        torch.testing.assert_close(only, want)


def test_a_skip_connection_adds_each_layers_own_input() -> None:
    cfg = JumpReLUConfig(d_sae=D_SAE, skip=True)
    clt = tiny_clt(cfg, d_out=D_IN).eval()
    x = torch.randn(4, 3, D_IN)
    z = {0: clt.encode(0, x[:, 0])}
    with torch.no_grad():
        want = (z[0] @ clt.W_dec[0][:, 0] + clt.b_dec[0] + x[:, 0] * clt.input_scale[0] @ clt.W_skip[0])
        torch.testing.assert_close(clt.decode(0, z, x[:, 0]), want / clt.target_scale[0])
    with pytest.raises(ValueError, match="needs mlp_in"):
        clt.decode(0, z)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_save_and_load_round_trip(tmp_path, arch) -> None:
    clt = tiny_clt(CONFIGS[arch])
    clt.metadata = {"train_config": {"layers": LAYERS}}
    folder = clt.save(tmp_path / "clt")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["clt.json", *(f"layer_{i}.safetensors" for i in LAYERS)]
    back = load_clt(folder)
    assert back.metadata == clt.metadata and back.layers == LAYERS and not back.training
    for k, v in clt.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, msg=k)


def test_load_refuses_a_folder_without_its_config(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a CLT folder"):
        load_clt(tmp_path)


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk"])
def test_circuit_tracer_loads_our_export_and_computes_what_ours_does(tmp_path, arch) -> None:
    """circuit-tracer's own ``load_clt`` on our export: its per-layer encode and its decode of every
    layer from the latents of all layers equal ours on the same raw activations."""
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt as ct_load_clt

    clt = tiny_clt(CONFIGS[arch], d_out=D_IN).eval()
    with torch.no_grad():  # thresholds low enough that every position has an active latent
        for i in range(3):
            clt.b_enc[i].add_(2.0)
    out = export_circuit_tracer(clt, tmp_path / "ct")
    theirs = ct_load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    assert (theirs.n_layers, theirs.d_transcoder, theirs.d_model) == (3, D_SAE, D_IN)
    torch.manual_seed(3)
    x = torch.randn(3, 7, D_IN)   # [layer, position, d_model], circuit-tracer's order
    ours_latents = {i: clt.encode(i, x[i]) for i in range(3)}
    for i in range(3):
        torch.testing.assert_close(theirs.encode_layer(x[i], i), ours_latents[i], rtol=1e-5, atol=1e-5)
    features = torch.stack([ours_latents[i] for i in range(3)])
    assert (features != 0).any(-1).any(0).all()   # circuit-tracer sizes its output by the last active one
    recon = theirs.decode(features.to_sparse())
    with torch.no_grad():
        for j in range(3):
            torch.testing.assert_close(recon[j], clt.decode(j, ours_latents, x[j]), rtol=1e-5, atol=1e-5)
    lazy = ct_load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32)  # the default: lazy decoder
    torch.testing.assert_close(lazy.decode(features.to_sparse()), recon)


@pytest.mark.parametrize(("cfg", "layers", "d_out", "match"), [
    (TopKConfig(d_sae=D_SAE, k=2), LAYERS, D_IN, "TopK"),
    (JumpReLUConfig(d_sae=D_SAE, skip=True), LAYERS, D_IN, "skip"),
    (JumpReLUConfig(d_sae=D_SAE), [1, 2], D_IN, "0..n-1"),
    (JumpReLUConfig(d_sae=D_SAE), LAYERS, D_OUT, "reads and writes"),
])
def test_export_refuses_what_circuit_tracer_cannot_hold(tmp_path, cfg, layers, d_out, match) -> None:
    clt = tiny_clt(cfg, layers=layers, d_out=d_out)
    with pytest.raises(ExportError, match=match):
        export_circuit_tracer(clt, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_memory_state_estimate_is_the_weights_gradients_and_adam_moments(precision) -> None:
    """The estimate's state is exactly what a step leaves: weights + gradients + Adam's moments (in the
    module's dtype), the buffers and LatentStats; the decoders hold d_sae d_out n (n+1)/2 weights."""
    from sae_lightning.train.step import LatentStats

    cfg, _ = configure(["sae=jumprelu", "sae.d_sae=6", "clt=true", "layers=[0,1,2,3]", "hook=mlp_in",
                        "target.name=mlp_out", f"trainer.precision={precision}"])
    state, _ = clt_parts(cfg, 8, 8)
    dtype = torch.bfloat16 if weight_bytes(precision) == 2 else torch.float32
    clt = CrossLayerTranscoder(cfg.sae, [0, 1, 2, 3], 8, 8).to(dtype)
    assert sum(p.numel() for p in clt.W_dec) == 6 * 8 * 4 * 5 // 2
    opt = torch.optim.Adam(clt.param_groups(1e-3))
    x = torch.randn(16, 4, 8, dtype=dtype)
    clt(clt.normalize(x), target=x, sparsity_coeff=1.0).loss.backward()
    opt.step()
    held = [*clt.parameters(), *(p.grad for p in clt.parameters()),
            *(v for s in opt.state.values() for k, v in s.items() if k != "step"),
            *LatentStats(clt.n_latents, 100).buffers()]
    assert all(t.dtype == dtype for t in held[:-3])   # Adam's moments follow the weights' dtype
    buffers = CrossLayerTranscoder(cfg.sae, [0, 1, 2, 3], 8, 8).buffers()   # the scales, counted in float32
    window_tokens = 8   # LatentStats' one scalar, outside the estimate's 16 bytes per latent
    assert state == sum(t.numel() * t.element_size() for t in [*held, *buffers]) - window_tokens


# ----- train.py ---------------------------------------------------------------------------------------
def clt_overrides(model_dir: Path, text: Path, **extra: object) -> list[str]:  # noqa: F811
    return [*live_overrides(model_dir, text, **{"train_tokens": 24 * BATCH, **extra}), "hook=mlp_in",
            "target.name=mlp_out", "layers=[0,1,2]", "clt=true", "sae=jumprelu", "sae.d_sae=64"]


def test_clt_run_writes_one_run_folder_that_loads_and_exports(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    run = tmp_path / "run"
    out = run_train_py([*clt_overrides(tiny_gpt2_dir, text, train_tokens=8 * BATCH,
                                       **{"trainer.val_every_n_steps": 4, "trainer.log_every_n_steps": 2}),
                        f"hydra.run.dir={run}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 8
    assert summary["sae_dir"] == str(run / "clt")
    m = summary["metrics"]
    for layer in (0, 1, 2):
        assert 0 < m[f"val/layer{layer}/nmse"] < 10
    assert m["val/l0"] == pytest.approx(sum(m[f"val/layer{i}/l0"] for i in (0, 1, 2)))
    assert not (run / "layer0_mlp_in").exists() and (run / "checkpoints" / "final.ckpt").exists()
    clt = load_clt(run / "clt")
    assert clt.layers == [0, 1, 2] and clt.metadata["train_config"]["clt"] is True
    final = ckpt(run / "checkpoints" / "final.ckpt")
    torch.testing.assert_close(final["state_dict"]["sae.W_dec.1"], clt.W_dec[1])
    assert final["hyper_parameters"]["slots"] == [[0, 1], [2, 3], [4, 5]]
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert header.count("train/loss_reconstruction_layer2") == 1
    export_circuit_tracer(clt, tmp_path / "ct")
    assert len(list((tmp_path / "ct").glob("W_dec_*.safetensors"))) == 3
    with pytest.raises(CheckpointError, match="cross-layer transcoder's"):
        load_sae_checkpoint(run / "checkpoints" / "final.ckpt")
    # evaluate.py on the run: the CLT's replacement model, all its layers at once and each alone
    metrics = json.loads(run_evaluation(EvalConfig(ckpt_path=str(run), downstream_contexts=4)).read_text())
    assert metrics["layers"] == [0, 1, 2]
    assert metrics["replacement/ce_loss_replaced"] > 0 and metrics["replacement/kl_div"] >= 0
    assert metrics["replacement/l0_total"] == pytest.approx(sum(metrics[f"replacement/layer{i}/l0"]
                                                                for i in (0, 1, 2)))
    assert {f"alone/layer{i}/ce_loss_recovered" for i in (0, 1, 2)} <= set(metrics)
    assert (run / "eval" / "report.html").is_file()


@pytest.mark.slow
def test_sigkill_then_resume_of_a_clt_ends_bit_identical(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    import signal
    import subprocess
    import sys

    from tests.train.test_resume import TRAIN, _wait_for_step, batch_log, record_env

    over = clt_overrides(tiny_gpt2_dir, text, **{"trainer.checkpoint_every_n_steps": 5})
    env = record_env()
    ref = run_train_py([*over, f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path, env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(TRAIN), *over, f"hydra.run.dir={run}"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(lambda: [run], 12, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (run / "checkpoints" / "final.ckpt").exists()
    resumed = run_train_py([*over, f"hydra.run.dir={run}", "ckpt_path=last"], tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(line.split("\t")[0]) for line in batch_log(run)].count(10) == 2
    want, got = ckpt(tmp_path / "ref/checkpoints/final.ckpt"), ckpt(run / "checkpoints/final.ckpt")
    assert want["state_dict"].keys() == got["state_dict"].keys()
    for k, v in want["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), k
    assert json.loads((run / "summary.json").read_text())["resumed_from"].endswith("last.ckpt")


@pytest.mark.parametrize(("extra", "match"), [
    (["layers=[0,5]"], "beyond the model's depth"),
    (["sae=relu"], "has no cross-layer transcoder"),
    (["target.name=null"], "needs its target"),
    (["layers=[2,0]"], "ascending"),
    (["target.layer=1"], "drop target.layer"),
])
def test_bad_clt_configs_are_refused_before_any_work(tmp_path, tiny_gpt2_dir, text, extra, match) -> None:  # noqa: F811
    run = tmp_path / "run"
    out = run_train_py([*clt_overrides(tiny_gpt2_dir, text), *extra, f"hydra.run.dir={run}"], tmp_path)
    assert out.returncode == 1 and match in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert not list(run.glob("checkpoints/*.ckpt"))


def test_a_block_without_an_mlp_projection_is_refused(tiny_llama) -> None:
    """A model whose layer 1 has no MLP (replaced by an identity without weights): the CLT names it."""
    import copy

    from sae_lightning.lm import HookedLM

    model = copy.deepcopy(tiny_llama.model)
    model.model.layers[1].mlp = torch.nn.Identity()
    lm = HookedLM(model, tiny_llama.tokenizer)
    check_clt_model(tiny_llama, [0, 1, 2], "mlp_in", "mlp_out")   # the intact model passes
    with pytest.raises(ConfigError, match="layer 1 has no mlp_in") as err:
        check_clt_model(lm, [0, 1, 2], "mlp_in", "mlp_out")
    assert "layer 0" not in str(err.value) and "layer 2" not in str(err.value)
    with pytest.raises(ConfigError, match="beyond the model's depth"):
        check_clt_model(tiny_llama, [0, 3], "mlp_in", "mlp_out")


def test_a_clt_too_big_for_memory_is_refused_naming_bf16(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    run = tmp_path / "run"
    out = run_train_py([*clt_overrides(tiny_gpt2_dir, text), f"hydra.run.dir={run}"], tmp_path,
                       {**__import__("os").environ, "SAE_LIGHTNING_MEMORY_LIMIT": "200M"})
    assert out.returncode == 1 and "trainer.precision=bf16-true" in out.stderr, out.stderr[-3000:]
    assert not list(run.glob("checkpoints/*.ckpt"))


def test_a_clt_trains_with_bf16_weights(tmp_path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    """``trainer.precision=bf16-true``: weights, gradients and Adam's moments in bf16 (half the state the
    memory formula counts), the folder's weights in bf16, loaded as float32."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    out = run_train_py([*clt_overrides(tiny_gpt2_dir, text, train_tokens=6 * BATCH), "sae=batchtopk",
                        "sae.k=4", "trainer.precision=bf16-true", f"hydra.run.dir={run}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert load_file(run / "clt" / "layer_0.safetensors")["W_dec"].dtype == torch.bfloat16
    final = ckpt(run / "checkpoints" / "final.ckpt")
    moments = final["optimizer_states"][0]["state"][0]
    assert moments["exp_avg"].dtype == moments["exp_avg_sq"].dtype == torch.bfloat16
    clt = load_clt(run / "clt")
    assert clt.W_enc[0].dtype == torch.float32 and float(clt.threshold[2]) > 0
