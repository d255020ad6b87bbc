"""What ``evaluate.py`` runs: trained SAE -> held-out activations -> metrics.json (+ SAEBench core JSON),
HTML report, export.

``ckpt_path`` may name a run folder, its ``sae/`` folder, or a ``.ckpt`` file; the run's final weights are
read from ``<run>/sae`` (``SAE.load``), an intermediate checkpoint from the checkpoint itself. Cheap checks
first (the SAE, then the activations it will be applied to), then the one streamed pass over held-out
rows, then the LM-based numbers (downstream loss, logit effects) and the report.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sae_lightning.cache.datamodule import ActivationDataModule, datamodule_from_config
from sae_lightning.checks import UnsupportedFormatError
from sae_lightning.config import LM_SOURCES, ConfigError, EvalConfig, TrainConfig, train_config_from_dict
from sae_lightning.evaluate.halves import keep_half
from sae_lightning.evaluate.pipeline import RowsResult, evaluate_rows, track_candidates
from sae_lightning.evaluate.prefixes import has_prefixes, prefix_metrics
from sae_lightning.io import atomic_write_json, keep_previous
from sae_lightning.saes import SAE
from sae_lightning.train.checkpoints import CheckpointError
from sae_lightning.train.rundir import RunDir

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
        from sae_lightning.train.checkpoints import load_sae_checkpoint

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


def held_out_rows(cfg: EvalConfig, dm: Any) -> Iterator[Any]:
    """The held-out rows evaluated: every one, or those of one half of the contexts (``cfg.contexts``)."""
    return keep_half(dm.eval_rows(cfg.max_tokens, cfg.batch_size), cfg.contexts, cfg.context_split_seed)


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


def eval_lm(cfg: EvalConfig, train_cfg: TrainConfig, dm: Any) -> Any:
    """The LM of the downstream numbers, the report and the Neuronpedia export: a live run's evaluation data
    already runs it (kept unless ``device`` asks for another), else loaded."""
    from sae_lightning.lm import load_lm

    live_lm = getattr(dm, "lm", None)
    return live_lm if live_lm is not None and cfg.device == "auto" else load_lm(
        train_cfg.model, None if cfg.device == "auto" else cfg.device)


def lm_metrics_and_report(cfg: EvalConfig, train_cfg: TrainConfig, sae: SAE,
                          dm: Any, result: RowsResult, metrics: dict[str, float],
                          out_dir: Path, lm: Any) -> dict[str, float]:
    """Downstream LM loss with the SAE spliced in, then the report (contexts, logit effects, scores)."""
    from sae_lightning.evaluate.downstream import downstream_metrics
    from sae_lightning.evaluate.monosemanticity import Uncertainty, load_embedder
    from sae_lightning.evaluate.pipeline import LMParts, build_report_data
    from sae_lightning.evaluate.report import write_report
    from sae_lightning.lm import HookPoint
    from sae_lightning.lm.text import special_token_mask

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
    beside it). A group folder (``group.json``) goes to :func:`run_group_evaluation`. Every export asked
    for (``export``) is checked against what its format can hold before any work."""
    from sae_lightning.evaluate.exports import check_run_exports, is_clt_run, refuse_clt, write_run_exports
    from sae_lightning.group.run import GROUP_FILE

    if (Path(cfg.ckpt_path) / GROUP_FILE).is_file():
        return run_group_evaluation(cfg)
    refuse_clt(cfg)
    if is_clt_run(cfg.ckpt_path):
        return run_clt_evaluation(cfg)
    sae, train_cfg = load_trained(cfg.ckpt_path)
    check_run_exports(cfg, sae, train_cfg, cfg.exports)
    dm = open_eval_data(cfg, train_cfg, sae)
    out_dir = eval_dir_for(cfg.ckpt_path, cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_text = cfg.activations is None and train_cfg.activations.source in LM_SOURCES
    n_track = 4 * max(cfg.report_latents, cfg.report_neurons)
    letter_rows = absorption_rows(cfg, train_cfg, sae) if has_text else None
    t0 = time.perf_counter()
    result = evaluate_rows(held_out_rows(cfg, dm), sae, n_top=cfg.top_contexts,
                           track_latents=track_candidates(sae.d_sae, n_track, cfg.seed),
                           track_neurons=track_candidates(sae.d_in, n_track, cfg.seed),
                           neurons=has_text and train_cfg.hook.name == "mlp_post",
                           dense_threshold=train_cfg.latents.dense_threshold,
                           observe=None if letter_rows is None else letter_rows.observe)
    metrics: dict[str, Any] = dict(result.metrics)
    metrics["eval_split"] = "file" if cfg.activations is not None else dm.eval_split
    if cfg.contexts != "all":
        metrics["eval_contexts"] = f"{cfg.contexts} half (context_split_seed={cfg.context_split_seed})"
    log.info("reconstruction metrics on %d held-out tokens in %.1f s", metrics["n_tokens"],
             time.perf_counter() - t0)
    if cfg.activations is None and train_cfg.activations.source == "synthetic":
        from sae_lightning.evaluate.recovery import feature_recovery
        metrics |= feature_recovery(sae.W_dec, torch.from_numpy(dm.source.dictionary))
    if letter_rows is not None:
        metrics |= absorption(cfg, sae, letter_rows)
    if has_prefixes(sae):  # nested (Matryoshka) SAEs: each prefix's reconstruction, a second pass
        metrics |= prefix_metrics(held_out_rows(cfg, dm), sae)
    lm = eval_lm(cfg, train_cfg, dm) if has_text and (cfg.downstream or cfg.report
                                                      or "neuronpedia" in cfg.exports) else None
    if has_text and (cfg.downstream or cfg.report):
        metrics |= lm_metrics_and_report(cfg, train_cfg, sae, dm, result, metrics, out_dir, lm)
    metrics |= write_run_exports(cfg, sae, train_cfg, cfg.exports, out_dir,
                                 {"result": result, "lm": lm, "dm": dm})
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


def held_out_contexts(dm: Any, n: int, max_tokens: int, batch_size: int) -> torch.Tensor:
    """The first ``n`` held-out contexts ``[n, ctx]`` the evaluation rows come from (their token ids)."""
    docs: set[int] = set()
    for rows in dm.eval_rows(max_tokens, batch_size):
        docs.update(d for d in rows.doc.unique().tolist() if d >= 0)
        if len(docs) >= n:
            break
    if not docs:
        raise ConfigError("no held-out contexts to run the LM on (the evaluation rows name no context)")
    return torch.stack([torch.as_tensor(dm.context(d), dtype=torch.long) for d in sorted(docs)[:n]])


def run_group_evaluation(cfg: EvalConfig) -> Path:
    """A group folder (``layers=[...]``): each finished member evaluated in its own ``eval/`` with the
    per-run exports (``group_members``); when the members are transcoders of their layers' MLPs, the
    replacement model (``evaluate/replacement.py``: every MLP replaced at once, and each alone) on
    ``downstream_contexts`` held-out contexts; then the set exports (circuit-tracer's transcoder set) of all
    members into ``<group>/eval/``. Every export of every member and the replaced layers are checked before
    any work. Writes ``<group>/eval/metrics.json`` (the replacement numbers, each member's metrics path,
    the set exports' paths) and ``report.html`` (the table); returns the former."""
    from sae_lightning.evaluate.exports import SET_FORMATS, check_run_exports, check_set, write_set_exports
    from sae_lightning.evaluate.replacement import NotMLPTranscoders, PLTSet, group_members

    group_dir = Path(cfg.ckpt_path)
    if cfg.hub_repo_id:
        raise ConfigError(f"hub_repo_id={cfg.hub_repo_id}: {group_dir} is a group of runs; push one member's "
                          "export (ckpt_path=<member run>)")
    out_dir = eval_dir_for(cfg.ckpt_path, cfg.out_dir)
    members = group_members(group_dir)
    set_formats = [f for f in cfg.exports if f in SET_FORMATS]
    member_cfg = dataclasses.replace(cfg, export=[f for f in cfg.exports if f not in SET_FORMATS],
                                     out_dir=None)
    loaded = {name: load_trained(folder) for name, folder in members
              if (folder / "sae" / "cfg.json").is_file()}
    if set_formats:
        untrained = [name for name, _ in members if name not in loaded]
        if untrained:
            raise UnsupportedFormatError(
                f"export={','.join(set_formats)}: members {untrained} of {group_dir} have no trained SAE "
                "(failed or unfinished): a transcoder set needs every layer")
        check_set(list(loaded.values()))
    if cfg.group_members:
        for sae, train_cfg in loaded.values():
            check_run_exports(member_cfg, sae, train_cfg, member_cfg.exports)
    plts, lm, dm, train_cfg = None, None, None, None
    if cfg.replacement:
        try:
            plts, train_cfg = PLTSet.from_group(group_dir)
        except NotMLPTranscoders as err:
            log.info("no replacement-model evaluation: %s", err)
    if plts is not None:
        lm, dm = replacement_inputs(cfg, train_cfg, plts.layers)
    metrics: dict[str, Any] = {"ckpt_path": str(group_dir.resolve()), "members": {}}
    links = {}
    for name, folder in members:
        if not cfg.group_members:
            break
        if name not in loaded:
            log.warning("%s has no trained SAE (%s): not evaluated", name, folder)
            continue
        log.info("evaluating %s", name)
        path = run_evaluation(dataclasses.replace(member_cfg, ckpt_path=str(folder)))
        metrics["members"][name] = str(path)
        if (path.parent / "report.html").is_file():
            links[f"{name}: report"] = os.path.relpath(path.parent / "report.html", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if plts is not None:
        metrics |= replacement_report(
            cfg, plts, lm, dm, train_cfg, out_dir,
            {"group": str(group_dir.resolve()), "model": train_cfg.model.name,
             "architecture": train_cfg.sae.architecture, "skip": train_cfg.sae.skip}, links)
    exported = write_set_exports(set_formats, list(loaded.values()), out_dir)
    if exported:
        metrics["export_paths"] = exported
    path = out_dir / "metrics.json"
    keep_previous(path)
    atomic_write_json(path, metrics)
    return path


def replacement_inputs(cfg: EvalConfig, train_cfg: TrainConfig, layers: list[int]) -> tuple[Any, Any]:
    """The LM (the live datamodule's own, or loaded on ``cfg.device``) and the datamodule whose held-out
    contexts the replacement model runs on, after checking that every layer has an MLP to replace."""
    from sae_lightning.evaluate.replacement import check_replaceable
    from sae_lightning.lm import load_lm

    dm = datamodule_from_config(train_cfg)
    live_lm = getattr(dm, "lm", None)
    lm = live_lm if live_lm is not None and cfg.device == "auto" else load_lm(
        train_cfg.model, None if cfg.device == "auto" else cfg.device)
    check_replaceable(lm, layers)
    return lm, dm


def replacement_report(cfg: EvalConfig, transcoders: Any, lm: Any, dm: Any, train_cfg: TrainConfig,
                       out_dir: Path, details: dict[str, Any], links: dict[str, str]) -> dict[str, Any]:
    """The replacement model of ``transcoders`` (a PLT set or a CLT: ``evaluate/replacement.py``) on
    ``downstream_contexts`` held-out contexts: its metrics, and ``out_dir/report.html`` with its table."""
    from sae_lightning.evaluate.replacement import TABLE_NOTE, replacement_metrics, replacement_table
    from sae_lightning.evaluate.report import write_table_report
    from sae_lightning.lm.text import special_token_mask

    layers = list(transcoders.layers)
    contexts = held_out_contexts(dm, cfg.downstream_contexts, cfg.max_tokens, cfg.batch_size)
    t0 = time.perf_counter()
    metrics = replacement_metrics(lm, list(contexts.split(train_cfg.data.lm_batch_size)),
                                  transcoders.to(lm.device),
                                  exclude=lambda t: special_token_mask(t, lm.tokenizer))
    log.info("replacement model (layers %s) on %d contexts in %.1f s: CE loss recovered %.3f, KL %.4f",
             layers, len(contexts), time.perf_counter() - t0,
             metrics["replacement/ce_loss_recovered"], metrics["replacement/kl_div"])
    metrics["layers"] = layers
    columns, rows = replacement_table(metrics, layers)
    report = out_dir / "report.html"
    keep_previous(report)
    write_table_report(
        report, f"Replacement model: {train_cfg.model.name}, MLPs of layers {layers}",
        {**details, "contexts": len(contexts), "counted predictions": metrics["n_tokens_downstream"],
         "clean LM loss": metrics["replacement/ce_loss_clean"]},
        columns, rows, TABLE_NOTE, links)
    log.info("report: %s", report)
    return metrics


def run_clt_evaluation(cfg: EvalConfig) -> Path:
    """A cross-layer transcoder run (``clt=true``): its replacement model (every MLP of its layers replaced
    at once, and each alone) on ``downstream_contexts`` held-out contexts of its first layer's stream (the
    held-out contexts are the same at every layer). Writes ``<run>/eval/metrics.json`` and
    ``report.html``; returns the former."""
    from sae_lightning.circuits.clt import load_clt

    run = RunDir.of(cfg.ckpt_path).path
    clt = load_clt(run / "clt")
    config = clt.metadata["train_config"]
    train_cfg = train_config_from_dict({**config, "clt": False, "layers": None, "layer": clt.layers[0]})
    lm, dm = replacement_inputs(cfg, train_cfg, clt.layers)
    out_dir = eval_dir_for(cfg.ckpt_path, cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"ckpt_path": str(run.resolve())}
    metrics |= replacement_report(cfg, clt, lm, dm, train_cfg, out_dir,
                                  {"run": str(run.resolve()), "model": train_cfg.model.name,
                                   "architecture": f"clt ({config['sae']['architecture']})"}, {})
    path = out_dir / "metrics.json"
    keep_previous(path)
    atomic_write_json(path, metrics)
    return path
