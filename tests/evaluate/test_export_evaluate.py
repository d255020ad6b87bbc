"""``evaluate.py ... export=<formats>`` end to end on the tiny GPT-2: a group of per-layer transcoders (every
layer, ``mlp_in -> mlp_out``) exported as one circuit-tracer set and per member to SAELens and Neuronpedia,
an SAE to Neuronpedia; each read back by the tool's own code. The Neuronpedia files are read by SAEDashboard
0.8.0's own classes (``NeuronpediaDashboardBatch``, which builds every feature and activation from the
file's keys, and ``NeuronpediaRunnerConfig`` for ``run_settings.json``) and checked against a JSON schema
derived from those classes' constructors (every key, of the type of its default)."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from sae_lightning.checks import UnsupportedFormatError
from sae_lightning.config import EvalConfig
from sae_lightning.evaluate.run import run_evaluation
from sae_lightning.group.run import run_group
from sae_lightning.saes import SAE
from sae_lightning.train.run import run_training
from tests.group.test_group import member
from tests.live.test_live import BATCH, live_overrides, text  # noqa: F401  (the module-scoped text fixture)
from tests.train.test_resume import configure

try:  # installed --no-deps by `make setup-dev` (its own pins conflict with transformers 5): its readers
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from sae_dashboard.neuronpedia.neuronpedia_dashboard import (
        NeuronpediaDashboardActivation,
        NeuronpediaDashboardBatch,
        NeuronpediaDashboardFeature,
    )
    from sae_dashboard.neuronpedia.neuronpedia_runner_config import NeuronpediaRunnerConfig
except ImportError as error:
    raise ImportError("these tests read our exports with circuit-tracer and SAEDashboard themselves: run "
                      "`make setup-dev`, which installs them with `pip install --no-deps "
                      "circuit-tracer==0.5.0 sae-dashboard==0.8.0`") from error
import sae_lens

QUICK = {"monosemanticity": False, "downstream_contexts": 4, "report_latents": 2, "report_neurons": 2,
         "max_tokens": 4096}


def _schema(cls: type, nested: dict[str, dict] | None = None) -> dict:
    """A JSON schema from a SAEDashboard class's constructor: every parameter a required key of the JSON type
    of its default (a list of numbers or strings, a number, a string; ``Optional`` ones may be absent or
    null), nothing else allowed."""
    props, required = {}, []
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self":
            continue
        default = param.default
        if nested and name in nested:
            props[name] = {"type": "array", "items": nested[name]}
        elif isinstance(default, list):
            props[name] = {"type": "array", "items": {"type": ["number", "string"]}}
        elif isinstance(default, bool):
            props[name] = {"type": "boolean"}
        elif isinstance(default, (int, float)):
            props[name] = {"type": "number"}
        elif isinstance(default, str):
            props[name] = {"type": "string"}
        if default is None or "Optional" in str(param.annotation):
            props[name] = {"anyOf": [props.get(name, {}), {"type": "null"}]}
        else:
            required.append(name)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


BATCH_SCHEMA = _schema(NeuronpediaDashboardBatch, {"features": _schema(
    NeuronpediaDashboardFeature, {"activations": _schema(NeuronpediaDashboardActivation)})})


def _check_neuronpedia(folder: Path, sae: SAE, metrics: dict) -> None:
    """The files as SAEDashboard's own classes read them, and what they say against our evaluation."""
    settings = json.loads((folder / "run_settings.json").read_text())
    runner = NeuronpediaRunnerConfig(**settings)
    assert runner.n_tokens_in_prompt == 32 and runner.n_prompts_total > 0 and runner.prepend_bos is not None
    batches = sorted(folder.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    seen, fired = [], 0
    for path in batches:
        data = json.loads(path.read_text())
        jsonschema.validate(data, BATCH_SCHEMA)
        batch = NeuronpediaDashboardBatch(**data)
        assert batch.to_dict() == data  # every key known to the tool, none it writes missing
        for feature in batch.features:
            seen.append(feature.feature_index)
            assert feature.n_tokens_in_prompt == 32 and 0 <= feature.frac_nonzero <= 1
            values = [a.values[a.qualifying_token_index] for a in feature.activations]
            assert values == sorted(values, reverse=True)
            for activation in feature.activations:
                assert len(activation.tokens) == len(activation.values) == 32
                assert activation.values[activation.qualifying_token_index] > 0
            fired += bool(feature.activations)
            if values:  # the recomputed row's value at the activating token is the evaluation's top one
                assert feature.activations[0].bin_max == pytest.approx(values[0], abs=2e-3)
    assert seen == list(range(sae.d_sae))
    assert fired == round(sae.d_sae * (1 - metrics["dead_fraction"]))


@pytest.fixture(scope="module")
def plt_group(tmp_path_factory, tiny_gpt2_dir, text) -> Path:  # noqa: F811
    """A group of JumpReLU skip-transcoders, one per layer of the tiny GPT-2 (3), trained from one pass."""
    root = tmp_path_factory.mktemp("plt")
    base = live_overrides(tiny_gpt2_dir, text, train_tokens=6 * BATCH)
    transcoder = ["hook=mlp_in", "target.name=mlp_out", "sae=jumprelu", "sae.skip=true"]
    members = [member(root / "group", f"layer{layer}", [*base, f"layer={layer}", *transcoder])
               for layer in range(3)]
    assert [s.status for s in run_group(members, root / "group")] == ["finished"] * 3
    return root / "group"


@torch.no_grad()
def test_a_group_exports_one_circuit_tracer_set_and_each_member(plt_group: Path) -> None:
    path = run_evaluation(EvalConfig(ckpt_path=str(plt_group), export="saelens,circuit_tracer,neuronpedia",
                                     **QUICK))
    group_metrics = json.loads(path.read_text())
    folder = Path(group_metrics["export_paths"]["circuit_tracer"])
    assert folder == plt_group / "eval" / "circuit_tracer"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    theirs = load_transcoder_set({i: str(folder / f"layer_{i}.safetensors") for i in range(3)}, scan="test",
                                 feature_input_hook=config["feature_input_hook"],
                                 feature_output_hook=config["feature_output_hook"],
                                 device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False,
                                 lazy_decoder=False)
    assert theirs.skip_connection and theirs.n_layers == 3
    for layer in range(3):
        name = f"layer{layer}"
        ours = SAE.load(plt_group / name / "sae")
        x = torch.randn(50, ours.d_in, generator=torch.Generator().manual_seed(layer))
        x = x / float(ours.input_scale)
        z = ours.encode(x)
        torch.testing.assert_close(theirs[layer].encode(x), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs[layer].decode(z, x), ours.decode(z, x), rtol=1e-5, atol=1e-5)
        metrics = json.loads(Path(group_metrics["members"][name]).read_text())
        assert set(metrics["export_paths"]) == {"saelens", "neuronpedia"}
        loaded = sae_lens.SAE.load_from_disk(metrics["export_paths"]["saelens"])
        assert loaded.cfg.architecture() == "jumprelu_skip_transcoder"
        torch.testing.assert_close(loaded(x), ours.decode(z, x), rtol=1e-5, atol=1e-5)
        _check_neuronpedia(Path(metrics["export_paths"]["neuronpedia"]), ours, metrics)


def test_a_group_export_is_refused_before_any_member_is_evaluated(plt_group: Path, tmp_path: Path) -> None:
    """The second member is a TopK transcoder, which SAELens cannot hold: the first is not evaluated."""
    from sae_lightning.saes import build_sae, config_from_dict

    good, topk = tmp_path / "good", tmp_path / "topk"
    shutil.copytree(plt_group / "layer0" / "sae", good / "sae")
    layer0 = SAE.load(good / "sae")
    sae_cfg = {"architecture": "topk", "d_sae": 8, "k": 2}
    sae = build_sae(config_from_dict(sae_cfg), layer0.d_in, d_out=layer0.d_out)
    sae.metadata = {"train_config": {**layer0.metadata["train_config"], "sae": sae_cfg}}
    sae.save(topk / "sae")
    group = tmp_path / "group"
    group.mkdir()
    (group / "group.json").write_text(json.dumps({"members": [{"name": "good", "run_dir": str(good)},
                                                              {"name": "topk", "run_dir": str(topk)}]}))
    with pytest.raises(UnsupportedFormatError, match="SAELens format has no 'topk' transcoder"):
        run_evaluation(EvalConfig(ckpt_path=str(group), export="saelens", **QUICK))
    with pytest.raises(UnsupportedFormatError, match="'topk' transcoder"):
        run_evaluation(EvalConfig(ckpt_path=str(group), export="circuit_tracer", **QUICK))
    assert not (good / "eval").exists() and not (group / "eval").exists()


def test_an_sae_exports_its_neuronpedia_features(tmp_path: Path, tiny_gpt2_dir, text) -> None:  # noqa: F811
    cfg, config = configure(live_overrides(tiny_gpt2_dir, text, train_tokens=6 * BATCH,
                                           **{"sae.dict_mult": 2}))
    summary = run_training(cfg, tmp_path / "run", config)
    path = run_evaluation(EvalConfig(ckpt_path=str(tmp_path / "run"), export=["neuronpedia"], **QUICK))
    metrics = json.loads(path.read_text())
    folder = Path(metrics["export_paths"]["neuronpedia"])
    assert folder == tmp_path / "run" / "eval" / "neuronpedia" and summary.status == "finished"
    _check_neuronpedia(folder, SAE.load(tmp_path / "run" / "sae"), metrics)
    feature = json.loads((folder / "batch-0.json").read_text())["features"][0]
    assert len(feature["pos_str"]) == 10
    assert feature["pos_values"] == sorted(feature["pos_values"], reverse=True)


def test_neuronpedia_needs_text(tmp_path: Path) -> None:
    from sae_lightning.saes import build_sae, config_from_dict

    sae = build_sae(config_from_dict({"architecture": "relu", "d_sae": 4}), 3)
    sae.metadata = {"train_config": {"activations": {"source": "synthetic", "synthetic": {}}}}
    sae.save(tmp_path / "sae")
    with pytest.raises(UnsupportedFormatError, match=r"export=neuronpedia .* activations=synthetic"):
        run_evaluation(EvalConfig(ckpt_path=str(tmp_path / "sae"), export="neuronpedia"))


@pytest.mark.parametrize("export", ["saelens", "circuit_tracer", "neuronpedia"])
def test_a_cross_layer_transcoder_run_is_refused_naming_the_format(tmp_path: Path, export: str) -> None:
    (tmp_path / "run" / "clt").mkdir(parents=True)
    (tmp_path / "run" / "clt" / "clt.json").write_text("{}")
    with pytest.raises(UnsupportedFormatError, match=f"export={export}: .* cross-layer transcoder"):
        run_evaluation(EvalConfig(ckpt_path=str(tmp_path / "run"), export=export))


def test_window_values_runs_each_context_row_once() -> None:
    """Latents ``z[b, t, u] = token * (u + 1)``: each (unit, row) pair gets its unit's column of its row."""
    from sae_lightning.evaluate.neuronpedia import window_values

    rows = {0: [5, 6, 7], 3: [1, 2, 3]}
    batches = []

    def latent_acts(tokens: torch.Tensor) -> torch.Tensor:
        batches.append(tokens.tolist())
        return tokens[..., None].float() * torch.arange(1, 4).float()

    top_doc = torch.tensor([[3, 0], [-1, -1], [0, -1]])
    got = window_values(latent_acts, rows.__getitem__, top_doc, batch_size=1)
    assert got == {(0, 3): [1.0, 2.0, 3.0], (0, 0): [5.0, 6.0, 7.0], (2, 0): [15.0, 18.0, 21.0]}
    assert batches == [[[5, 6, 7]], [[1, 2, 3]]]
