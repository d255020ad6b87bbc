"""Train a sparse autoencoder: `python train.py sae.dict_mult=8 l1=1e-3` (see README and conf/train.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sae_lightning.config import register_configs, to_config

log = logging.getLogger("train")
register_configs()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(dict_cfg: DictConfig) -> float | None:
    cfg = to_config(dict_cfg)  # every range check runs here, before any heavy import or work
    from sae_lightning.training import run_training

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = run_training(cfg, run_dir, OmegaConf.to_container(dict_cfg, resolve=True))
    m = summary["metrics"]
    log.info("Run finished: %d steps, %d tokens in %.0f s", summary["steps"], summary["tokens"],
             summary["train_seconds"])
    log.info("  run dir:    %s", summary["run_dir"])
    log.info("  checkpoint: %s", summary["checkpoint"])
    log.info("  metrics:    %s", summary["csv_log"])
    log.info("  val: explained_variance=%.4f nmse=%.4f l0=%.1f",
             m.get("val/explained_variance", float("nan")), m.get("val/nmse", float("nan")),
             m.get("val/l0", float("nan")))
    log.info("Evaluate with: python evaluate.py ckpt_path=%s", summary["checkpoint"])
    return m.get("val/nmse")


if __name__ == "__main__":
    main()
