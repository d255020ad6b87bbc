"""What ``evaluate.py`` runs: checkpoint -> held-out activations -> metrics.json, HTML report, export.

Cheap checks first (the checkpoint, then the activations it will be applied to), then the one streamed
pass over held-out rows, then the LM-based numbers (downstream loss, logit effects) and the report.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from sae_lightning.checkpoints import CheckpointError, load_sae_checkpoint
from sae_lightning.config import EvalConfig, TrainConfig
from sae_lightning.datamodule import ActivationDataModule, EvalRows
from sae_lightning.evaluate.pipeline import RowsResult, evaluate_rows, track_candidates
from sae_lightning.module import SAEModule

log = logging.getLogger(__name__)


def eval_dir_for(ckpt_path: str, out_dir: str | None = None) -> Path:
    """``<run>/eval`` for a checkpoint in ``<run>/checkpoints/``, else ``<checkpoint's folder>/eval``."""
    if out_dir:
        return Path(out_dir)
    ckpt = Path(ckpt_path).resolve()
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run / "eval"


def keep_previous(path: Path) -> None:
    """Rename an earlier output to ``<stem>.<its mtime><suffix>``: a new evaluation never destroys one."""
    if path.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        path.rename(path.with_name(f"{path.stem}.{stamp}{path.suffix}"))


def open_eval_data(cfg: EvalConfig, train_cfg: TrainConfig, module: SAEModule) -> ActivationDataModule:
    """The held-out shards of the training activations, or every row of an explicitly given array."""
    if cfg.activations is not None and cfg.activations.source == "file":
        dm = ActivationDataModule(cfg.activations.path, cfg.activations, cfg.batch_size, cfg.seed)
        dm.val_shards = dm.train_shards + dm.val_shards  # an explicitly given array is held out in full
    else:
        dm = ActivationDataModule.from_config(train_cfg)
    if dm.d_in != module.sae.d_in:
        raise CheckpointError(
            f"checkpoint {cfg.ckpt_path} holds an SAE for d_in={module.sae.d_in} activations, but "
            f"{dm.source.path} has d={dm.d_in}: evaluate it on the activations it was trained on")
    return dm


def held_out_rows(dm: ActivationDataModule, cfg: EvalConfig, norm_scale: float):
    """Held-out rows normalized with the CHECKPOINT's scale (an explicitly given array has its own)."""
    rescale = norm_scale / dm.norm_scale if dm.norm_scale else norm_scale
    for rows in dm.eval_rows(cfg.max_tokens, cfg.batch_size):
        yield EvalRows(rows.acts * rescale, rows.tokens, rows.doc, rows.pos)


def training_history(run_dir: Path) -> dict[str, list[float]] | None:
    """Step, L0 and MSE from the run's CSV log (the report's training curve), if there is one."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return None
    hist: dict[str, list[float]] = {"step": [], "l0": [], "mse": []}
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get("train/l0") and row.get("train/mse"):
                hist["step"].append(float(row["step"]))
                hist["l0"].append(float(row["train/l0"]))
                hist["mse"].append(float(row["train/mse"]))
    return hist if hist["step"] else None


def lm_metrics_and_report(cfg: EvalConfig, train_cfg: TrainConfig, module: SAEModule,
                          dm: ActivationDataModule, result: RowsResult, metrics: dict[str, float],
                          out_dir: Path) -> dict[str, float]:
    """Downstream LM loss with the SAE spliced in, then the report (contexts, logit effects, scores)."""
    from sae_lightning.evaluate.downstream import downstream_metrics
    from sae_lightning.evaluate.monosemanticity import load_embedder
    from sae_lightning.evaluate.pipeline import LMParts, build_report_data
    from sae_lightning.evaluate.report import write_report
    from sae_lightning.lm import HookPoint, load_lm
    from sae_lightning.text import special_token_mask

    scale = float(module.hparams.norm_scale)
    lm = load_lm(train_cfg.model, None if cfg.device == "auto" else cfg.device)
    hook = HookPoint(train_cfg.layer, train_cfg.hook.name)
    extra: dict[str, float] = {}
    if cfg.downstream:
        docs = result.docs[: cfg.downstream_contexts]
        rows = torch.stack([torch.tensor(dm.context(d), dtype=torch.long) for d in docs])
        batches = list(rows.split(train_cfg.data.lm_batch_size))
        t0 = time.perf_counter()
        extra |= downstream_metrics(lm, batches, hook, module.sae.to(lm.device), scale,
                                    exclude=lambda t: special_token_mask(t, lm.tokenizer))
        module.sae.cpu()
        log.info("downstream LM loss on %d contexts in %.1f s: CE loss recovered %.3f", len(docs),
                 time.perf_counter() - t0, extra["ce_loss_recovered"])
    if cfg.report:
        direct = lm.has_direct_logit_effect(hook)  # not for mlp_in or hook=module: no path to the logits
        parts = LMParts(W_out=lm.output_projection(hook) if direct else None,
                        W_U=lm.unembed_directions() if direct else None, tokenizer=lm.tokenizer)
        embedder = load_embedder() if cfg.monosemanticity else None
        details = {"checkpoint": str(Path(cfg.ckpt_path).resolve()), "model": train_cfg.model.name,
                   "hook": f"layer {train_cfg.layer} {train_cfg.hook.name}",
                   "architecture": train_cfg.sae.architecture, "d_sae": module.sae.d_sae,
                   "l1": train_cfg.l1}
        data, medians = build_report_data(
            f"SAE report: {train_cfg.model.name} layer {train_cfg.layer} {train_cfg.hook.name}",
            {**metrics, **extra}, result, module.sae, scale, parts, dm.context,
            n_latents=cfg.report_latents, n_neurons=cfg.report_neurons, n_scored=cfg.monosemanticity_units,
            embedder=embedder, seed=cfg.seed,
            history=training_history(eval_dir_for(cfg.ckpt_path).parent), details=details)
        extra |= medians
        report = out_dir / "report.html"
        keep_previous(report)
        write_report(report, data)
        log.info("report: %s", report)
    return extra


def run_evaluation(cfg: EvalConfig) -> Path:
    """Evaluate ``cfg.ckpt_path``; returns the path of the ``metrics.json`` it wrote."""
    module = load_sae_checkpoint(cfg.ckpt_path)
    train_cfg, scale = module.cfg, float(module.hparams.norm_scale)
    dm = open_eval_data(cfg, train_cfg, module)
    out_dir = eval_dir_for(cfg.ckpt_path, cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_text = cfg.activations is None and train_cfg.activations.source == "lm"
    n_track = 4 * max(cfg.report_latents, cfg.report_neurons)
    t0 = time.perf_counter()
    result = evaluate_rows(held_out_rows(dm, cfg, scale), module.sae, scale, n_top=cfg.top_contexts,
                           track_latents=track_candidates(module.sae.d_sae, n_track, cfg.seed),
                           track_neurons=track_candidates(module.sae.d_in, n_track, cfg.seed),
                           neurons=has_text and train_cfg.hook.name == "mlp_post",
                           dense_threshold=train_cfg.callbacks.dense_threshold)
    metrics: dict[str, Any] = dict(result.metrics)
    log.info("reconstruction metrics on %d held-out tokens in %.1f s", metrics["n_tokens"],
             time.perf_counter() - t0)
    if has_text and (cfg.downstream or cfg.report):
        metrics |= lm_metrics_and_report(cfg, train_cfg, module, dm, result, metrics, out_dir)
    if cfg.export or cfg.hub_repo_id:
        from sae_lightning.export import export_trained, push_to_hub

        exported = export_trained(module.sae, train_cfg, scale, out_dir / "saelens")
        metrics["export_path"] = str(exported)
        if cfg.hub_repo_id:
            push_to_hub(exported, cfg.hub_repo_id)
    metrics["ckpt_path"] = str(Path(cfg.ckpt_path).resolve())
    path = out_dir / "metrics.json"
    keep_previous(path)
    path.write_text(json.dumps(metrics, indent=2))
    return path
