"""W&B without a server: every job of a sweep is its own offline run, grouped by sweep and tagged with its
swept values, with the metrics inside the run file that ``wandb sync`` uploads later; the sweep's
comparison is one more run of the group; a failed job's run is marked failed.

wandb 0.31 ships no reader for its ``.wandb`` files, so ``read_offline_run`` parses the format: a 7-byte
header (``:W&B``, magic, version) then a LevelDB-style log of 32 KiB blocks; each record fragment has a
7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and the joined fragments are
``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from sae_lightning.sweep.multirun import sweep_group
from tests.sweep.test_sweep import SMALL, _array, train_py

BLOCK, HEADER = 32 * 1024, struct.Struct("<IHB")


def read_offline_run(path: Path) -> list:
    """Every protobuf ``Record`` of an offline run file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, parts, pos = [], [], 7
    while pos + HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < HEADER.size:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = HEADER.unpack_from(data, pos)
        parts.append(data[pos + HEADER.size: pos + HEADER.size + length])
        pos += HEADER.size + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def run_contents(path: Path) -> dict:
    """The run's identity (id, group, tags, name, job type), its config and its logged history values."""
    out = {"config": {}, "history": {}, "exit_code": None}
    for r in read_offline_run(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, group=r.run.run_group, tags=list(r.run.tags), name=r.run.display_name,
                       job_type=r.run.job_type)
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "history":
            for item in r.history.item:
                out["history"].setdefault(item.key or "/".join(item.nested_key), []).append(item.value_json)
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


def _only_run_file(run_dir: Path) -> Path:
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


@pytest.mark.slow
def test_sweep_jobs_are_separate_grouped_offline_runs(tmp_path):
    x = _array(tmp_path / "x.npy")
    sweep = tmp_path / "sweep"
    overrides = [o for o in SMALL if o != "logger=csv"]
    train_py("-m", "activations=file", f"activations.path={x}", *overrides, "logger=wandb",
             "trainer.log_every_n_steps=4", "lr=1e-3,1e38", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
             env={"WANDB_MODE": "offline"})
    ok, bad = (run_contents(_only_run_file(sweep / name)) for name in ("000_lr=0.001", "001_lr=1e+38"))
    comparison = run_contents(_only_run_file(sweep))

    assert len({ok["id"], bad["id"], comparison["id"]}) == 3  # wandb.finish() between jobs
    assert ok["group"] == bad["group"] == comparison["group"] == sweep_group(sweep, None)
    assert ok["tags"] == ["lr=0.001"] and bad["tags"] == ["lr=1e+38"]
    assert ok["name"] == "000_lr=0.001" and comparison["job_type"] == "comparison"
    assert ok["config"]["lr"] == 0.001 and ok["config"]["sae"]["architecture"] == "relu"

    summary = json.loads((sweep / "000_lr=0.001" / "summary.json").read_text())
    logged = float(ok["history"]["val/nmse"][-1])
    assert logged == pytest.approx(summary["metrics"]["val/nmse"], rel=1e-6)
    assert "train/loss" in ok["history"] and "val/l0" in ok["history"]
    assert ok["exit_code"] == 0 and bad["exit_code"] == 1  # the diverged job's run is marked failed
    assert "comparison/table/path" in comparison["history"]
    assert "comparison/frontier/path" in comparison["history"]
