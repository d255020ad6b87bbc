"""``evaluate.py ... export=<formats>``: what each format can hold, checked before any work, and where it
is written (``<run>/eval/<format>/``, or ``<group>/eval/circuit_tracer/`` for a group's transcoder set).

- ``saelens``: one SAE or transcoder (``sae_lightning.evaluate.saelens``; ``hub_repo_id`` also pushes it);
- ``circuit_tracer``: a per-layer transcoder set (``sae_lightning.evaluate.circuit_tracer``): a group folder's
  members (``layers=[0,...,n-1]`` with ``target.name=mlp_out``), or one run that is a set of one (layer 0);
- ``neuronpedia``: one SAE's or transcoder's feature dashboards (``evaluate/neuronpedia.py``), from the
  evaluation's held-out text contexts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_lightning.checks import UnsupportedFormatError
from sae_lightning.config import LM_SOURCES, EvalConfig, TrainConfig
from sae_lightning.saes import SAE

SET_FORMATS = ("circuit_tracer",)  # formats that hold several runs (a group's members) in one folder
CLT_CONFIG = Path("clt") / "clt.json"  # what a clt=true run writes instead of sae/ (docs/cross-layer-...)


def is_clt_run(path: str | Path) -> bool:
    """Whether ``path`` (a run folder or a file in it) is a cross-layer transcoder run (``clt=true``)."""
    from sae_lightning.train.rundir import RunDir

    return (RunDir.of(path).path / CLT_CONFIG).is_file()


def refuse_clt(cfg: EvalConfig) -> None:
    """``UnsupportedFormatError`` for any export of a cross-layer transcoder run: its latents decode into
    every later layer, which none of these formats holds (circuit-tracer's CLT layout has its own command)."""
    if cfg.exports and is_clt_run(cfg.ckpt_path):
        raise UnsupportedFormatError(
            f"export={','.join(cfg.exports)}: {cfg.ckpt_path} is a cross-layer transcoder (clt=true), whose "
            f"latents decode into every later layer; {' and '.join(cfg.exports)} hold(s) one SAE or "
            "transcoder per hook, or a set of per-layer transcoders. A CLT goes to circuit-tracer's CLT "
            "layout with `python -m sae_lightning.circuits.export <run>/clt <out dir>`")


def check_run_exports(cfg: EvalConfig, sae: SAE, train_cfg: TrainConfig, formats: list[str]) -> None:
    """Raise ``UnsupportedFormatError`` naming the format and the architecture unless every one of
    ``formats`` can hold this run (called before any work)."""
    if "saelens" in formats:
        from sae_lightning.evaluate.saelens import saelens_architecture

        saelens_architecture(sae)
    if "circuit_tracer" in formats:
        check_set([(sae, train_cfg)])
    if "neuronpedia" in formats:
        has_text = cfg.activations is None and train_cfg.activations.source in LM_SOURCES
        if not has_text:
            source = "file" if cfg.activations is not None else train_cfg.activations.source
            raise UnsupportedFormatError(
                f"export=neuronpedia writes feature dashboards from held-out text contexts, but this "
                f"evaluation reads activations={source}, which has no text: evaluate on the run's own "
                f"activations (drop activations=...) of a run trained on an LM")


def check_set(members: list[tuple[SAE, TrainConfig]]) -> None:
    """circuit-tracer's checks of a transcoder set, with the hint to export a group folder."""
    from sae_lightning.evaluate.circuit_tracer import check_plt_set

    try:
        check_plt_set(members)
    except UnsupportedFormatError as err:
        if len(members) == 1 and members[0][1].layer != 0 and "every layer" in str(err):
            raise UnsupportedFormatError(
                f"{err}; a set of several layers is exported from the group folder of a layers=[...] run: "
                "evaluate.py ckpt_path=<group folder> export=circuit_tracer") from None
        raise


def write_run_exports(cfg: EvalConfig, sae: SAE, train_cfg: TrainConfig, formats: list[str],
                      out_dir: Path, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Write ``formats`` for one run into ``out_dir/<format>``; ``evaluation`` holds what the Neuronpedia
    export reads (``result``, ``lm``, ``dm``). Returns the metrics.json entries (``export_paths``, and
    ``export_path`` for the SAELens folder as before)."""
    paths: dict[str, str] = {}
    if "saelens" in formats:
        from sae_lightning.evaluate.saelens import export_trained, push_to_hub

        paths["saelens"] = str(export_trained(sae, train_cfg, out_dir / "saelens"))
        if cfg.hub_repo_id:
            push_to_hub(paths["saelens"], cfg.hub_repo_id)
    if "circuit_tracer" in formats:
        from sae_lightning.evaluate.circuit_tracer import export_circuit_tracer

        paths["circuit_tracer"] = str(export_circuit_tracer([(sae, train_cfg)], out_dir / "circuit_tracer"))
    if "neuronpedia" in formats:
        from sae_lightning.evaluate.neuronpedia import export_neuronpedia
        from sae_lightning.evaluate.saelens import saelens_metadata

        result, dm, meta = evaluation["result"], evaluation["dm"], saelens_metadata(train_cfg)
        paths["neuronpedia"] = str(export_neuronpedia(
            out_dir / "neuronpedia", sae, train_cfg, result.latents, evaluation["lm"], dm.context,
            n_prompts=len(result.docs), dataset=str(meta["dataset_path"]), prepend_bos=meta["prepend_bos"],
            sae_path=str(Path(cfg.ckpt_path).resolve()), batch_size=train_cfg.data.lm_batch_size))
    entries: dict[str, Any] = {"export_paths": paths} if paths else {}
    if "saelens" in paths:
        entries["export_path"] = paths["saelens"]
    return entries


def write_set_exports(formats: list[str], members: list[tuple[SAE, TrainConfig]],
                      out_dir: Path) -> dict[str, str]:
    """The set formats of a group's members into ``out_dir/<format>``; returns their paths."""
    from sae_lightning.evaluate.circuit_tracer import export_circuit_tracer

    return {"circuit_tracer": str(export_circuit_tracer(members, out_dir / "circuit_tracer"))
            } if "circuit_tracer" in formats else {}
