"""``benchmarks/`` is a package whose every script runs as ``python -m benchmarks.<name>``, and the quality
benchmark's resumable JSONL never reuses a run made with other settings or other code."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in ("__init__", "common"))


def test_the_scripts_are_found() -> None:
    assert {"train_step", "quality_vs_saelens", "ablation", "sparse_kernels"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports_as_a_module_of_the_package(name: str) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main) and module.__doc__


def test_no_script_edits_sys_path() -> None:
    """The scripts, and the tests that use them, import through the package (``benchmarks.common``), never
    through a path pushed on ``sys.path``."""
    users = [f for f in (REPO / "tests").rglob("*.py") if "benchmarks" in f.read_text()]
    users.remove(Path(__file__))
    edits = [f.name for f in [*(REPO / "benchmarks").glob("*.py"), *users] if "sys.path." in f.read_text()]
    assert not edits, edits


def test_every_script_answers_help_as_python_dash_m() -> None:
    """``python -m benchmarks.<name> --help`` for every script, each through ``runpy.run_module`` (what
    ``-m`` runs) in one interpreter, so torch is imported once: usage printed, exit status 0."""
    code = (
        "import contextlib, io, json, runpy, sys\n"
        "out = {}\n"
        f"for name in {SCRIPTS!r}:\n"
        "    sys.argv, buf = [name, '--help'], io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(buf):\n"
        "            runpy.run_module('benchmarks.' + name, run_name='__main__', alter_sys=True)\n"
        "        out[name] = [None, buf.getvalue()]\n"
        "    except SystemExit as e:\n"
        "        out[name] = [e.code, buf.getvalue()]\n"
        "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    for name in SCRIPTS:
        status, text = results[name]
        assert status == 0 and text.startswith("usage: "), (name, status, text[:300])
    assert "{penalised,batchtopk,auxk}" in results["sparse_kernels"][1]


def test_a_subcommand_answers_help_as_a_real_python_dash_m() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.sparse_kernels", "auxk", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--dead" in done.stdout and "--out" in done.stdout


def test_report_writes_the_header_and_every_line_whole(tmp_path: Path, capsys) -> None:
    from benchmarks.common import Report

    say = Report("benchmarks.sparse_kernels", ["auxk", "--k", "4"])
    say("first")
    say("second")
    out = tmp_path / "sub" / "report.txt"
    say.write(out)
    say.write(out)  # a rerun replaces the file, it does not append
    lines = out.read_text().splitlines()
    keys = [line.split(":")[0] for line in lines[:7]]
    assert keys == ["# command", "# commit", "# date", "# versions", "# threads", "# fp32 GEMM",
                    "# load average"]
    assert lines[0] == "# command: python -m benchmarks.sparse_kernels auxk --k 4"
    assert re.fullmatch(r"# fp32 GEMM: \d+ GFLOP/s \(2048\^3, median of 5\)", lines[5])
    assert re.fullmatch(r"# load average: [\d.]+ [\d.]+ [\d.]+ \(1, 5, 15 min\)", lines[6])
    assert lines[7:] == ["first", "second"]
    assert capsys.readouterr().out == "first\nsecond\n"


# ---------------------------------------------------------------- the quality benchmark's fingerprints
@pytest.fixture
def q():
    """The quality benchmark (it needs SAELens for its settings and curves)."""
    pytest.importorskip("sae_lens")
    from benchmarks import quality_vs_saelens

    return quality_vs_saelens

TINY = ["--d-in", "16", "--features", "64", "--mean-active", "4", "--d-sae", "32", "--train-rows", "2000",
        "--eval-rows", "300", "--batch", "100", "--steps", "3", "--b-dec-sample", "300",
        "--curve-points", "1", "--l1", "3"]


def test_settings_record_the_real_width_and_the_cache_key_not_the_path(q, tmp_path: Path) -> None:
    """With ``--acts`` the settings hold the data's real width (not the synthetic default 64) and the file's
    or cache's name (a cache's name is its key), never the machine's path; with generated data, its
    parameters."""
    acts = tmp_path / "deep" / "acts.npy"
    acts.parent.mkdir()
    np.save(acts, np.zeros((10, 24), np.float32))
    real = q.settings(q.parse_args(["--acts", str(acts)]))
    assert real["acts"] == "acts.npy" and real["d_in"] == 24
    assert real["features"] is None and real["mean_active"] is None
    generated = q.settings(q.parse_args(TINY))
    assert generated["acts"] is None and (generated["d_in"], generated["features"]) == (16, 64)


def test_the_code_hash_follows_what_a_curve_measures(q, tmp_path: Path, monkeypatch) -> None:
    """Each of our curves hashes its preset and architecture code: editing ``conf/sae/topk.yaml`` changes
    the TopK curves' hash and not relu's; SAELens's curves do not depend on our presets."""
    before = {name: q.measured_code(name) for name in q.CURVES}
    assert before["ours topk"] != before["ours relu"] != before["saelens standard"]
    assert before["ours jumprelu"] == before["ours jumprelu target"]  # one preset, one architecture
    presets = tmp_path / "sae"
    presets.mkdir()
    for f in (REPO / "conf" / "sae").glob("*.yaml"):
        (presets / f.name).write_text(f.read_text())
    (presets / "topk.yaml").write_text((presets / "topk.yaml").read_text() + "aux_k: 64\n")
    monkeypatch.setattr(q.common, "PRESETS", presets)
    after = {name: q.measured_code(name) for name in q.CURVES}
    changed = {name for name in q.CURVES if after[name] != before[name]}
    assert changed == {"ours topk"}


def _row(curve: str, value: float, seed: int, settings: dict) -> dict:
    return {"curve": curve, "value": value, "seed": seed, "l0": 5.0, "nmse": 0.3,
            "curve_points": [[100, 5.0, 0.3]], "settings": settings}


def test_stale_rows_are_told_apart_from_current_and_other_experiments(q, tmp_path: Path) -> None:
    """A row is reused only with the same fingerprint; a row of the same experiment made with other code
    (or by an older version of the script: absolute cache path, ``d_in`` 64 for wider data, no code hash)
    is stale; a row with other settings (another d_sae) belongs to another experiment and is neither."""
    acts = tmp_path / "x.npy"
    np.save(acts, np.zeros((10, 48), np.float32))
    args = q.parse_args(["--acts", str(acts), "--d-sae", "96"])
    fixed = q.settings(args)
    prints = {name: q.fingerprint(name, fixed) for name in q.CURVES}
    old = fixed | {"acts": str(acts.resolve()), "d_in": 64, "features": 512, "mean_active": 8.0}
    other_d_sae = prints["ours relu"] | {"d_sae": 192}
    rows = [_row("ours relu", 3, 0, prints["ours relu"]),                       # current
            _row("ours relu", 6, 0, old),                                       # older script
            _row("ours topk", 32, 0, prints["ours topk"] | {"code": "0" * 12}),  # other code
            _row("ours relu", 3, 1, other_d_sae)]                               # another experiment
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done, stale = q.load_results(path, prints)
    assert [(r["curve"], r["value"]) for r in done] == [("ours relu", 3)]
    assert [(r["curve"], r["value"]) for r in stale] == [("ours relu", 6), ("ours topk", 32)]


def test_a_rerun_trains_only_what_is_missing_or_stale(q, tmp_path: Path, monkeypatch, capsys) -> None:
    """The same command twice trains nothing the second time; once what a curve measures changes, its runs
    are listed as stale and trained again, and the report covers only current runs."""
    results = tmp_path / "runs.jsonl"
    command = [*TINY, "--curves", "ours relu", "saelens standard", "--results", str(results)]
    q.main(command)
    first = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["curve"] for r in first] == ["ours relu", "saelens standard"]
    assert first[0]["settings"]["code"] == q.measured_code("ours relu")
    capsys.readouterr()
    q.main(command)
    assert len(results.read_text().splitlines()) == 2
    assert "stale" not in capsys.readouterr().out
    real = q.measured_code
    monkeypatch.setattr(q, "measured_code", lambda curve: "f" * 12 if curve == "ours relu" else real(curve))
    q.main(command)
    out = capsys.readouterr().out
    assert "1 stale runs" in out and "  ours relu 3 seed 0" in out
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["curve"] for r in rows] == ["ours relu", "saelens standard", "ours relu"]
    assert rows[-1]["settings"]["code"] == "f" * 12
    assert re.search(r"^ours relu\s+3\s+1\s", out, flags=re.MULTILINE)  # one seed: the stale row left out
    q.main(command)  # the stale row has been trained again: nothing to list, nothing to train
    assert "stale" not in capsys.readouterr().out and len(results.read_text().splitlines()) == 3



def test_a_child_s_peak_rss_is_its_own_not_its_parent_s() -> None:
    """A plain ``wait4`` would report this process's 512 MiB (its peak before the child's exec); the
    launcher reports the child's own peak: the interpreter plus the 64 MiB it touches."""
    from benchmarks.common import run_child

    held = np.ones(512 * 2**20 // 8)
    child = "import numpy as np; np.ones(64 * 2**20 // 8).sum()"
    code, run, err = run_child([sys.executable, "-c", child], stderr=subprocess.PIPE, text=True)
    assert code == 0 and err == ""
    assert 64 / 1024 < run.rss_gb < 0.3, run
    assert run.cpu > 0 and run.wall >= run.cpu / 8
    failed, _, _ = run_child([sys.executable, "-c", "raise SystemExit(3)"])
    assert failed == 3 and held.sum() > 0
