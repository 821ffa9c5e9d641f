"""The docs name only things that exist: tests, result files, job files, docs pages, benchmark scripts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w/.-])((?:tests|benchmarks|jobs|docs|dtrain|cluster|examples)/[\w./-]*\w)(?:::(\w+))?")


def references(text: str) -> list[tuple[str, str | None]]:
    refs = []
    for m in PATH.finditer(text):
        if text[m.end():m.end() + 1] in ("*", "<", "{"):  # a pattern (trackers*.json), not a path
            continue
        refs.append((m.group(1), m.group(2)))
    return refs


def missing(doc: Path) -> list[str]:
    text = doc.read_text()
    out = []
    for path, name in references(text):
        target = ROOT / path
        if not target.exists() and not (ROOT / "examples" / "user_project" / path).exists():
            out.append(path)
        elif name and target.is_file() and not re.search(rf"^\s*(async )?def {name}\b|^class {name}\b",
                                                         target.read_text(), re.M):
            out.append(f"{path}::{name}")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_and_test_a_doc_names_exists(doc):
    assert missing(doc) == []


def test_the_check_sees_a_renamed_test_and_a_missing_result_file(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("`tests/unit/test_docs.py::test_gone` and `benchmarks/results/dev/nothing.json` and "
                   "`tests/unit/test_docs.py::test_every_path_and_test_a_doc_names_exists`")
    assert missing(doc) == ["tests/unit/test_docs.py::test_gone", "benchmarks/results/dev/nothing.json"]


def test_the_readmes_catalog_table_is_the_rendering_of_the_recorded_runs():
    """`make catalog` writes both; a hand edit of either shows here."""
    import json

    from benchmarks.catalog import BEGIN, END, RESULT, render

    readme = (ROOT / "README.md").read_text()
    table = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == render(json.loads(RESULT.read_text()))
