"""The README's performance table is what the committed benchmark results render."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.common import RESULTS_DIR, Report
from bench.report import (
    BEGIN,
    END,
    README,
    readme_section,
    render_markdown,
    report_doc,
    sync_readme,
)

LATEST = RESULTS_DIR / "latest.json"


def test_readme_table_is_the_committed_results() -> None:
    doc = json.loads(LATEST.read_text())
    assert doc["mode"] == "full"
    assert readme_section(README.read_text()) == render_markdown(doc)


def test_committed_results_cover_every_benchmark() -> None:
    doc = json.loads(LATEST.read_text())
    keys = [r["key"] for r in doc["reports"]]
    assert keys == ["aggregation", "precision", "ingest", "release", "memory", "egress"]
    for r in doc["reports"]:
        assert r["rows"] and r["checks"], r["key"]  # a table and PASS/FAIL lines each


def _doc(report: Report) -> dict[str, object]:
    machine = {"cpu": "test CPU", "cpus": 2, "memory_gib": 1.0, "python": "3", "load_average": [0]}
    return {"mode": "full", "repeats": 3, "machine": machine, "reports": [report_doc(report)]}


def test_sync_rewrites_only_the_marked_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{BEGIN}\nold table\n{END}\nafter\n")
    report = Report("x", "A | title")
    report.rows = [["what", "MB/s"], ["a|b", "12"]]
    report.check("floor", False, "7 < 9")
    sync_readme(readme, _doc(report))
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n") and text.endswith(f"{END}\nafter\n")
    assert "old table" not in text
    assert "| a\\|b | 12 |" in text  # a pipe inside a cell cannot break the table
    assert "- **FAIL** floor: 7 < 9" in text
    assert readme_section(text) == render_markdown(_doc(report))


def test_sync_refuses_a_readme_without_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="bench:begin"):
        sync_readme(readme, _doc(Report("x", "t", rows=[["a"]])))
    assert readme.read_text() == "# no markers\n"
