"""The package's text explains the code; the evidence behind defaults lives in docs/decisions.md.

Docstrings and comments under ``sae_lightning/`` say what the code does and why, never what was measured
when: no results files, no dates, no history of defaults. Every default's evidence is a dated entry of
``docs/decisions.md`` that names files that exist. Class docstrings say what the class is. Every field of
every config dataclass is documented where it is defined, and ``docs/config.md`` is generated from those
comments, so the key reference cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import shlex
from pathlib import Path

from hydra import compose, initialize_config_dir

from sae_lightning.config import check_sparsity_override, register_configs, to_config
from sae_lightning.configdoc import FieldDoc, field_doc, field_docs, render, source_file
from sae_lightning.saes import SAE_REGISTRY

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sae_lightning"
DECISIONS = REPO / "docs" / "decisions.md"

# What a lab notebook leaves in code: a results file, a date, the history of a default.
HISTORY = re.compile(
    r"benchmarks/results"
    r"|\b\d{4}-\d{2}-\d{2}\b"
    r"|\bused to\b|\bwas the default\b|\bold default\b|\bprevious default\b|\bformerly\b"
    r"|\bbefore (?:\d{4}-\d{2}-\d{2}|commit|the change)\b",
    re.IGNORECASE,
)


def _package_files() -> list[Path]:
    """Every file under ``sae_lightning/`` but compiled bytecode."""
    return sorted(p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def history_lines(paths: list[Path], root: Path = REPO) -> list[str]:
    """``file:line: text`` (file relative to ``root``) of every line in ``paths`` that matches ``HISTORY``."""
    found = []
    for path in paths:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    return found


def test_package_has_no_experiment_history() -> None:
    found = history_lines(_package_files())
    assert not found, ("results, dates or history of defaults in the package (move the evidence to "
                       "docs/decisions.md):\n" + "\n".join(found))


def test_history_check_catches_each_pattern(tmp_path: Path) -> None:
    lines = ["see benchmarks/results/x.txt", "measured 2026-12-05", "thresholds used to start at 0.01",
             "0.01 was the default", "the old default", "as before 2026-12-06", "the default is 0.01"]
    path = tmp_path / "m.py"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    found = history_lines([path], root=tmp_path)
    assert [f.split(":")[:2] for f in found] == [["m.py", str(n)] for n in range(1, 7)]


def test_class_docstrings_say_what_the_class_is() -> None:
    bad = []
    for path in _package_files():
        if path.suffix != ".py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            doc = ast.get_docstring(node) if isinstance(node, ast.ClassDef) else None
            if doc is not None and doc.lower().startswith("see module docstring"):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: class {node.name}")
    assert not bad, "class docstrings that only point to the module docstring:\n" + "\n".join(bad)


def test_decisions_entries_are_dated_and_name_existing_files() -> None:
    text = DECISIONS.read_text(encoding="utf-8")
    entries = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    assert len(entries) >= 10
    for entry in entries:
        heading = entry.splitlines()[0]
        assert re.match(r"\d{4}-\d{2}-\d{2}: ", heading), heading
        assert "Command:" in entry, heading
        assert re.search(r"\bcommits? [0-9a-f]{7}", entry.replace("Commit", "commit")), heading
    named = set(re.findall(r"`((?:benchmarks|tests)/[\w./-]+\.(?:txt|py|jsonl))`", text))
    assert named, "no file named"
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"docs/decisions.md names files that do not exist: {missing}"


def test_field_docs_sees_comments_and_string_literals_only() -> None:
    source = (
        "class A:\n"
        "    x: int = 1  # beside\n"
        "    y: int = 2\n"
        '    """Under it."""\n'
        "    z: int = 3\n"
        "\n"
        '    """Not right under z."""\n'
        "    w: str = '# not a comment'\n"
    )
    assert field_docs(source) == {"A": {"x": FieldDoc(2, "beside"), "y": FieldDoc(3, "Under it."),
                                        "z": FieldDoc(5, None), "w": FieldDoc(8, None)}}


def config_dataclasses() -> list[type]:
    """The dataclasses defined in ``sae_lightning/config.py`` and ``sae_lightning/saes/*.py``."""
    saes = sorted(p.stem for p in (PACKAGE / "saes").glob("*.py") if not p.stem.startswith("_"))
    names = ["sae_lightning.config"] + [f"sae_lightning.saes.{stem}" for stem in saes]
    modules = [importlib.import_module(name) for name in names]
    return [obj for m in modules for obj in vars(m).values()
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == m.__name__]


def test_every_config_field_is_documented_where_it_is_defined() -> None:
    classes = config_dataclasses()
    names = {c.__name__ for c in classes}
    assert {"TrainConfig", "ActivationsConfig", "SAEConfig", "JumpReLUConfig"} <= names
    missing = set()
    for cls in classes:
        for f in dataclasses.fields(cls):
            owner, doc = field_doc(cls, f.name)
            if not doc.text:
                missing.add(f"{source_file(owner).relative_to(REPO)}:{doc.line}: {owner.__name__}.{f.name}")
    assert not missing, ("config fields without a comment beside them or a string literal under them:\n"
                         + "\n".join(sorted(missing)))


def test_config_reference_is_generated_from_the_dataclasses() -> None:
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert text == render(), "docs/config.md is stale: python -m sae_lightning.configdoc > docs/config.md"


def test_config_reference_lists_exactly_each_architectures_fields() -> None:
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    for name, sae_cls in SAE_REGISTRY.items():
        table = text.split(f"### `sae={name}`\n", 1)[1].split("\n### ", 1)[0]
        listed = re.findall(r"^\| `sae\.(\w+)` \|", table, flags=re.MULTILINE)
        fields = [f.name for f in dataclasses.fields(sae_cls.config_class) if f.name != "architecture"]
        assert listed == fields, name


README = REPO / "README.md"
README_MAX_LINES = 200
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(doc: Path, root: Path = REPO) -> list[str]:
    """``doc: link (why)`` (doc relative to ``root``) of each relative link of ``doc`` (``](path)``,
    ``](path#anchor)``, ``](#anchor)``) whose file does not exist or whose Markdown file has no heading
    with that anchor."""
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{doc.relative_to(root)}: {target} (no such file)")
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), flags=re.MULTILINE)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(f"{doc.relative_to(root)}: {target} (no such heading)")
    return broken


def test_every_relative_link_in_the_docs_resolves() -> None:
    docs = [README, *sorted((REPO / "docs").glob("*.md"))]
    broken = [b for doc in docs for b in broken_links(doc)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_check_catches_missing_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n## Loss scaling (read `l1`)\n", encoding="utf-8")
    doc = tmp_path / "b.md"
    doc.write_text("[ok](a.md) [ok](a.md#loss-scaling-read-l1) [web](https://x.org/y) [self](#b)\n"
                   "[gone](c.md) [bad](a.md#nothing)\n# B\n", encoding="utf-8")
    assert broken_links(doc, root=tmp_path) == ["b.md: c.md (no such file)",
                                                "b.md: a.md#nothing (no such heading)"]


def test_readme_is_short_and_names_the_command_ci_runs() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    two_commands = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^make test\b", two_commands, flags=re.MULTILINE)
    assert re.search(r"^make test\b", (REPO / ".ci" / "run").read_text(encoding="utf-8"), flags=re.MULTILINE)


def train_commands(doc: Path) -> list[list[str]]:
    """The overrides of every ``python train.py`` line in ``doc``'s bash blocks, one job each: a sweep
    (``-m``) as its first job (each comma list's first value); lines with ``<placeholders>`` left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("python train.py") and "<" not in line.split("#")[0]:
                words = shlex.split(line, comments=True)[2:]
                commands.append([re.sub(r"=([^\[,]+),.*", r"=\1", w) for w in words if w != "-m"])
    return commands


def test_every_documented_train_command_composes() -> None:
    """Each ``python train.py`` command of the README and docs/ composes and passes the config's checks
    (what ``train.py`` does before any work), so a renamed key or preset breaks this test, not a reader."""
    register_configs()
    docs = [README, *sorted((REPO / "docs").glob("*.md"))]
    commands = [(doc.name, c) for doc in docs for c in train_commands(doc)]
    assert len(commands) >= 30
    failed = []
    for name, overrides in commands:
        try:
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                cfg = to_config(compose("train", overrides=overrides))
            check_sparsity_override(cfg, overrides)
        except Exception as err:  # every failure is reported with its command
            failed.append(f"{name}: python train.py {' '.join(overrides)}\n    {type(err).__name__}: {err}")
    assert not failed, "documented commands that do not compose:\n" + "\n".join(failed)


# A page may point at the results README (or the folder), never quote a results file.
RESULTS_README = re.compile(r"benchmarks/results/(?:README\.md)?(?![\w.])")


def page_history(paths: list[Path], root: Path = REPO) -> list[str]:
    """``file:line: text`` of every line of these Markdown pages that matches ``HISTORY`` once links to
    the results README are left out."""
    return [f"{path.relative_to(root)}:{n}: {line.strip()}"
            for path in paths for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if HISTORY.search(RESULTS_README.sub("", line))]


def test_readme_and_docs_pages_hold_no_experiment_history() -> None:
    """Dates, results files and retired defaults belong in docs/decisions.md; the other pages link."""
    pages = [README, *sorted(p for p in (REPO / "docs").glob("*.md") if p != DECISIONS)]
    found = page_history(pages)
    assert not found, "history in README.md or docs/ (move it to docs/decisions.md):\n" + "\n".join(found)


def test_page_history_allows_the_results_readme_only(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("[r](benchmarks/results/README.md) and `benchmarks/results/`\n"
                    "see benchmarks/results/x.txt\nmeasured 2026-12-05\n", encoding="utf-8")
    assert [f.split(":")[1] for f in page_history([page], root=tmp_path)] == ["2", "3"]
