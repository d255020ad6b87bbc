"""Train a sparse autoencoder: `python train.py sae.dict_mult=8 l1=1e-3` (see README and conf/train.yaml).

Sweeps: `python train.py -m sae.dict_mult=4,8,16 l1=2,5,10` or a preset `python train.py sweep=l1_x_dict`;
each job of a multirun is run by `sae_lightning.sweep.multirun.run_sweep_job` (a failed job is recorded, the
sweep goes on) and the sweep ends with a comparison page (`sae_lightning.sweep.compare`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sae_lightning.config import TrainConfig, check_sparsity_override, register_configs, to_config
from sae_lightning.console import quiet_console, report_user_errors
from sae_lightning.sweep.multirun import is_multirun, register_resolvers, run_sweep_job

log = logging.getLogger("train")
register_configs()
register_resolvers()


def train(dict_cfg: DictConfig) -> float:
    """Validate, train, log where everything went; returns the sweep objective (``objective.*``, by default
    the final validation NMSE)."""
    cfg = to_config(dict_cfg)  # every range check runs here, before any heavy import or work
    check_sparsity_override(cfg, list(HydraConfig.get().overrides.task))
    quiet_console()
    from sae_lightning.evaluate.after import evaluate_finished
    from sae_lightning.train.callbacks.preemption import pass_on_signal
    from sae_lightning.train.run import TrainingPreempted, run_training

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(dict_cfg, resolve=True)
    try:
        if cfg.grouped:
            return train_group(cfg, run_dir, config)
        summary = run_training(cfg, run_dir, config)
    except TrainingPreempted as stopped:
        pass_on_signal(stopped.signum)  # under submitit: requeue this job (it resumes with ckpt_path=auto)
        raise
    m = summary.metrics
    log.info("Run finished: %d steps, %d tokens in %.0f s", summary.steps, summary.tokens,
             summary.train_seconds)
    log.info("  run dir:    %s", summary.run_dir)
    if cfg.clt:
        log.info("  CLT:        %s   (sae_lightning.circuits.clt.load_clt(path))", summary.sae_dir)
        log.info("  val: mean over layers explained_variance=%.4f nmse=%.4f; total l0=%.1f",
                 m.get("val/explained_variance", float("nan")), m.get("val/nmse", float("nan")),
                 m.get("val/l0", float("nan")))
        log.info("Export for circuit-tracer: python -m sae_lightning.circuits.export %s <out dir>",
                 summary.sae_dir)
        return cfg.objective.value(m)
    log.info("  SAE:        %s   (SAE.load(path))", summary.sae_dir)
    log.info("  val: explained_variance=%.4f nmse=%.4f l0=%.1f",
             m.get("val/explained_variance", float("nan")), m.get("val/nmse", float("nan")),
             m.get("val/l0", float("nan")))
    if evaluate_finished(summary, cfg) is None:
        log.info("Evaluate with: python evaluate.py ckpt_path=%s", summary.checkpoint)
    return cfg.objective.value(m)


def train_group(cfg: TrainConfig, run_dir: Path, config: dict) -> float:
    """``layers=[...]``/``hooks=[...]``: one SAE per entry, all from one stream, each in its own folder under
    ``run_dir``; returns the mean objective (NaN when one failed)."""
    from sae_lightning.evaluate.after import evaluate_finished
    from sae_lightning.group.members import members_of_lists
    from sae_lightning.group.run import run_group

    members = members_of_lists(config, run_dir)
    summaries = run_group(members, run_dir)
    for member, summary in zip(members, summaries, strict=True):
        evaluate_finished(summary, member.cfg)
    for s in summaries:
        m = s.metrics
        log.info("  %-28s %-8s val nmse=%.4f l0=%.1f  %s", Path(s.run_dir).name, s.status,
                 m.get("val/nmse", float("nan")), m.get("val/l0", float("nan")), s.error or s.sae_dir)
    log.info("Compare with: python -m sae_lightning.sweep.compare %s ; evaluate every SAE (and the "
             "replacement model of MLP transcoders) with: python evaluate.py ckpt_path=%s", run_dir, run_dir)
    values = [cfg.objective.value(s.metrics) if s.status == "finished" else float("nan") for s in summaries]
    return sum(values) / len(values)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@report_user_errors
def main(dict_cfg: DictConfig) -> float | None:
    if is_multirun():
        return run_sweep_job(dict_cfg, train, script=__file__)
    return train(dict_cfg)


if __name__ == "__main__":
    main()
