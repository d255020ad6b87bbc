"""What ``evaluate.py`` runs: trained SAE -> held-out activations -> metrics.json (+ SAEBench core JSON),
HTML report, export.

``ckpt_path`` may name a run folder, its ``sae/`` folder, or a ``.ckpt`` file; the run's final weights are
read from ``<run>/sae`` (``SAE.load``), an intermediate checkpoint from the checkpoint itself. Cheap checks
first (the SAE, then the activations it will be applied to), then the one streamed pass over held-out
rows, then the LM-based numbers (downstream loss, logit effects) and the report.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import torch

from sae_lightning.checkpoints import CheckpointError
from sae_lightning.config import LM_SOURCES, ConfigError, EvalConfig, TrainConfig, train_config_from_dict
from sae_lightning.datamodule import ActivationDataModule, datamodule_from_config
from sae_lightning.evaluate.pipeline import RowsResult, evaluate_rows, track_candidates
from sae_lightning.evaluate.prefixes import has_prefixes, prefix_metrics
from sae_lightning.io import atomic_write_json, keep_previous
from sae_lightning.rundir import RunDir
from sae_lightning.saes import SAE

log = logging.getLogger(__name__)


def eval_dir_for(ckpt_path: str, out_dir: str | None = None) -> Path:
    """``<run>/eval`` for a run folder, its ``sae/`` folder or a checkpoint in its ``checkpoints/``."""
    return Path(out_dir) if out_dir else RunDir.of(ckpt_path).eval


def load_trained(path: str | Path) -> tuple[SAE, TrainConfig]:
    """The SAE to evaluate and the config it was trained with, from a run folder, its ``sae/`` folder, or a
    checkpoint (``final.ckpt`` is read from the run's ``sae/`` folder when there is one)."""
    p = Path(path)
    run = RunDir.of(p)
    if p.suffix == ".ckpt" and not (p.name == "final.ckpt" and run.sae.is_dir()):
        from sae_lightning.checkpoints import load_sae_checkpoint

        module = load_sae_checkpoint(p)
        return module.sae, module.cfg
    folder = p if (p / "cfg.json").is_file() else run.sae
    if not (folder / "cfg.json").is_file():
        raise CheckpointError(f"{path} is neither an SAE folder (cfg.json + sae.safetensors), a run folder "
                              "holding one in sae/, nor a .ckpt file. Give <run dir>, <run>/sae or "
                              "<run>/checkpoints/<file>.ckpt")
    sae = SAE.load(folder)
    return sae, train_config_from_dict(sae.metadata["train_config"])


def open_eval_data(cfg: EvalConfig, train_cfg: TrainConfig, sae: SAE) -> Any:
    """The held-out rows of the training activations (with a transcoder's target rows): the cache's held-out
    shards, or a live run's held-out contexts through the LM; or every row of an explicitly given array
    (SAEs only: an array has no target rows)."""
    if cfg.activations is not None and cfg.activations.source == "file":
        if sae.transcoder:
            raise ConfigError(f"activations.source=file: {cfg.ckpt_path} is a transcoder, which is evaluated "
                              "on its training caches (input and target hooks); drop activations=file")
        dm = ActivationDataModule(cfg.activations.path, cfg.activations, cfg.batch_size, cfg.seed)
        dm.eval_shards = list(range(dm.source.n_shards))  # an explicitly given array is held out in full
    else:
        dm = datamodule_from_config(train_cfg)
    if dm.d_in != sae.d_in:
        where = dm.source.path if hasattr(dm, "source") else f"layer {train_cfg.layer} {train_cfg.hook.name}"
        raise CheckpointError(
            f"checkpoint {cfg.ckpt_path} holds an SAE for d_in={sae.d_in} activations, but "
            f"{where} has d={dm.d_in}: evaluate it on the activations it was trained on")
    return dm


def training_history(run: RunDir) -> dict[str, list[float]] | None:
    """Step, L0 and MSE from the run's CSV log (the report's training curve), if there is one."""
    path = run.csv_log
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


def lm_metrics_and_report(cfg: EvalConfig, train_cfg: TrainConfig, sae: SAE,
                          dm: Any, result: RowsResult, metrics: dict[str, float],
                          out_dir: Path) -> dict[str, float]:
    """Downstream LM loss with the SAE spliced in, then the report (contexts, logit effects, scores)."""
    from sae_lightning.evaluate.downstream import downstream_metrics
    from sae_lightning.evaluate.monosemanticity import Uncertainty, load_embedder
    from sae_lightning.evaluate.pipeline import LMParts, build_report_data
    from sae_lightning.evaluate.report import write_report
    from sae_lightning.lm import HookPoint, load_lm
    from sae_lightning.text import special_token_mask

    live_lm = getattr(dm, "lm", None)   # a live run's evaluation data already runs the model
    lm = live_lm if live_lm is not None and cfg.device == "auto" else load_lm(
        train_cfg.model, None if cfg.device == "auto" else cfg.device)
    hook = HookPoint(train_cfg.layer, train_cfg.hook.name)
    target = hook if train_cfg.target_hook is None else HookPoint(*train_cfg.target_hook)
    input_hook = None if target == hook else hook
    where = f"layer {hook.layer} {hook.name}"
    if input_hook is not None:
        where += f" -> layer {target.layer} {target.name}"
    extra: dict[str, float] = {}
    if cfg.downstream:
        docs = result.docs[: cfg.downstream_contexts]
        rows = torch.stack([torch.tensor(dm.context(d), dtype=torch.long) for d in docs])
        batches = list(rows.split(train_cfg.data.lm_batch_size))
        t0 = time.perf_counter()
        extra |= downstream_metrics(lm, batches, target, sae.to(lm.device), input_hook=input_hook,
                                    exclude=lambda t: special_token_mask(t, lm.tokenizer))
        sae.cpu()
        log.info("downstream LM loss on %d contexts in %.1f s: CE loss recovered %.3f", len(docs),
                 time.perf_counter() - t0, extra["ce_loss_recovered"])
    if cfg.report:
        direct = lm.has_direct_logit_effect(target)  # not for mlp_in or hook=module: no path to the logits
        parts = LMParts(W_out=lm.output_projection(target) if direct else None,
                        W_U=lm.unembed_directions() if direct else None, tokenizer=lm.tokenizer,
                        neuron_W_out=lm.output_projection(hook) if lm.has_direct_logit_effect(hook) else None)
        embedder = load_embedder() if cfg.monosemanticity else None
        details = {"checkpoint": str(Path(cfg.ckpt_path).resolve()), "model": train_cfg.model.name,
                   "hook": where,
                   "architecture": train_cfg.sae.architecture, "d_sae": sae.d_sae,
                   "l1": train_cfg.l1}
        data, medians = build_report_data(
            f"{'Transcoder' if input_hook else 'SAE'} report: {train_cfg.model.name} {where}",
            {**metrics, **extra}, result, sae, parts, dm.context,
            n_latents=cfg.report_latents, n_neurons=cfg.report_neurons, n_scored=cfg.monosemanticity_units,
            embedder=embedder, seed=cfg.seed,
            uncertainty=Uncertainty(level=cfg.monosemanticity_ci_level,
                                    resamples=cfg.monosemanticity_resamples, seed=cfg.seed,
                                    target_width=cfg.monosemanticity_ci_width),
            history=training_history(RunDir.of(cfg.ckpt_path)), details=details)
        extra |= medians
        report = out_dir / "report.html"
        keep_previous(report)
        write_report(report, data)
        log.info("report: %s", report)
    return extra


def absorption_rows(cfg: EvalConfig, train_cfg: TrainConfig, sae: SAE) -> Any:
    """The collector of held-out rows for absorption (``absorption.LetterRows``; it needs the model's
    tokenizer only), or None when ``absorption=false`` or the SAE is a transcoder (its latents decode
    into another space than the one the first-letter probe reads)."""
    if not cfg.absorption or sae.transcoder:
        return None
    from sae_lightning.evaluate.absorption import LetterRows
    from sae_lightning.lm.loading import load_tokenizer

    return LetterRows(load_tokenizer(train_cfg.model), cfg.absorption_per_token, cfg.absorption_rows)


def absorption(cfg: EvalConfig, sae: SAE, rows: Any) -> dict[str, float]:
    """The ``absorption_*`` keys from the rows collected in the held-out pass."""
    from sae_lightning.evaluate.absorption import AbsorptionSettings, absorption_metrics
    from sae_lightning.evaluate.monosemanticity import Uncertainty

    t0 = time.perf_counter()
    out = absorption_metrics(rows, sae.cpu(), AbsorptionSettings(min_probe_f1=cfg.absorption_min_probe_f1,
                                                                 seed=cfg.seed),
                             Uncertainty(level=cfg.monosemanticity_ci_level,
                                         resamples=cfg.monosemanticity_resamples, seed=cfg.seed))
    log.info("absorption on %d held-out rows in %.1f s: rate %.3f, fraction %.3f over %d letters",
             out["absorption_rows"], time.perf_counter() - t0, out["absorption_rate"],
             out["absorption_fraction"], out["absorption_letters"])
    return out


def run_evaluation(cfg: EvalConfig) -> Path:
    """Evaluate ``cfg.ckpt_path``; returns the path of the ``metrics.json`` it wrote (``saebench_core.json``
    beside it)."""
    sae, train_cfg = load_trained(cfg.ckpt_path)
    if sae.transcoder and (cfg.export or cfg.hub_repo_id):
        raise ConfigError(f"export=true: {cfg.ckpt_path} is a transcoder; transcoders are not exported to "
                          "the SAELens format yet; use the <run>/sae folder (SAE.load)")
    dm = open_eval_data(cfg, train_cfg, sae)
    out_dir = eval_dir_for(cfg.ckpt_path, cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_text = cfg.activations is None and train_cfg.activations.source in LM_SOURCES
    n_track = 4 * max(cfg.report_latents, cfg.report_neurons)
    letter_rows = absorption_rows(cfg, train_cfg, sae) if has_text else None
    t0 = time.perf_counter()
    result = evaluate_rows(dm.eval_rows(cfg.max_tokens, cfg.batch_size), sae, n_top=cfg.top_contexts,
                           track_latents=track_candidates(sae.d_sae, n_track, cfg.seed),
                           track_neurons=track_candidates(sae.d_in, n_track, cfg.seed),
                           neurons=has_text and train_cfg.hook.name == "mlp_post",
                           dense_threshold=train_cfg.latents.dense_threshold,
                           observe=None if letter_rows is None else letter_rows.observe)
    metrics: dict[str, Any] = dict(result.metrics)
    metrics["eval_split"] = "file" if cfg.activations is not None else dm.eval_split
    log.info("reconstruction metrics on %d held-out tokens in %.1f s", metrics["n_tokens"],
             time.perf_counter() - t0)
    if cfg.activations is None and train_cfg.activations.source == "synthetic":
        from sae_lightning.evaluate.recovery import feature_recovery
        metrics |= feature_recovery(sae.W_dec, torch.from_numpy(dm.source.dictionary))
    if letter_rows is not None:
        metrics |= absorption(cfg, sae, letter_rows)
    if has_prefixes(sae):  # nested (Matryoshka) SAEs: each prefix's reconstruction, a second pass
        metrics |= prefix_metrics(dm.eval_rows(cfg.max_tokens, cfg.batch_size), sae)
    if has_text and (cfg.downstream or cfg.report):
        metrics |= lm_metrics_and_report(cfg, train_cfg, sae, dm, result, metrics, out_dir)
    if cfg.export or cfg.hub_repo_id:
        from sae_lightning.export import export_trained, push_to_hub

        exported = export_trained(sae, train_cfg, out_dir / "saelens")
        metrics["export_path"] = str(exported)
        if cfg.hub_repo_id:
            push_to_hub(exported, cfg.hub_repo_id)
    metrics["ckpt_path"] = str(Path(cfg.ckpt_path).resolve())
    path = out_dir / "metrics.json"
    keep_previous(path)
    atomic_write_json(path, metrics)
    # the same evaluation as SAEBench's core result JSON, beside metrics.json
    from sae_lightning.evaluate.saebench import write_core_result

    keep_previous(out_dir / "saebench_core.json")
    write_core_result(out_dir / "saebench_core.json", metrics, result.feature_density, sae, train_cfg, cfg,
                      result.consistent_activation)
    return path
