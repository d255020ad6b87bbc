"""Evaluate a trained SAE: `python evaluate.py ckpt_path=<run>/checkpoints/final.ckpt`.

Writes metrics.json, saebench_core.json (SAEBench's core result format) and report.html in <run>/eval/ and
prints the path of metrics.json as its last line.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from sae_lightning.config import register_configs, to_config
from sae_lightning.console import quiet_console, report_user_errors
from sae_lightning.evaluate.run import eval_dir_for

register_configs()
if not OmegaConf.has_resolver("eval_dir"):
    OmegaConf.register_new_resolver("eval_dir", lambda ckpt, out=None: str(eval_dir_for(ckpt, out)))


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
@report_user_errors
def main(dict_cfg: DictConfig) -> None:
    cfg = to_config(dict_cfg)
    quiet_console()
    from sae_lightning.evaluate.run import run_evaluation

    print(run_evaluation(cfg), flush=True)


if __name__ == "__main__":
    main()
