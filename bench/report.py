"""Results as JSON and markdown, and the README's performance table kept in sync with them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bench.common import Report

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- bench:begin (written by `make bench` from bench/results/latest.json) -->"
END = "<!-- bench:end -->"


def report_doc(report: Report) -> dict[str, Any]:
    return {
        "key": report.key,
        "title": report.title,
        "rows": report.rows,
        "notes": report.notes,
        "checks": [dataclasses.asdict(c) for c in report.checks],
        "data": report.data,
    }


def _table(rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---"] + ["---:"] * (len(rows[0]) - 1)
    return [line(rows[0]), "| " + " | ".join(align) + " |", *(line(r) for r in rows[1:])]


def render_markdown(doc: dict[str, Any]) -> str:
    """The whole result as markdown: a line on the machine, then per benchmark its table,
    notes and PASS/FAIL lines. Deterministic: the same JSON gives the same text."""
    m = doc["machine"]
    out = [
        f"`make bench` ({doc['mode']} run, medians of {doc['repeats']}) on {m['cpu']}, "
        f"{m['cpus']} CPUs, {m['memory_gib']} GiB RAM, Python {m['python']}. Each benchmark "
        "compares with its peers and the machine's limit in the same run.",
    ]
    for r in doc["reports"]:
        out += ["", f"**{r['title']}**", "", *_table(r["rows"]), ""]
        if "date" in r:
            rm = r["machine"]
            out.append(f"- measured {r['date']}, load average after it {rm['load_average']}")
        out += [f"- {note}" for note in r["notes"]]
        for cell in r["data"].get("cells", []) if isinstance(r["data"], dict) else []:
            if "skipped" in cell:  # a measurement that could not run says why
                where = f"P={cell['P'] / 1e6:g}M, N={cell['N']}"
                out.append(f"- not run: {cell['method']} at {where}: {cell['skipped']}")
        out += [
            f"- **{'PASS' if c['ok'] else 'FAIL'}** {c['name']}: {c['detail']}" for c in r["checks"]
        ]
    return "\n".join(out) + "\n"


def readme_section(text: str) -> str:
    """What lies between the bench markers of a README."""
    try:
        start = text.index(BEGIN) + len(BEGIN)
        end = text.index(END, start)
    except ValueError:
        raise ValueError(f"README has no {BEGIN!r} ... {END!r} section") from None
    return text[start:end].strip("\n") + "\n"


def sync_readme(path: Path, doc: dict[str, Any]) -> None:
    text = path.read_text()
    readme_section(text)  # both markers present, in order
    start = text.index(BEGIN) + len(BEGIN)
    end = text.index(END, start)
    path.write_text(text[:start] + "\n" + render_markdown(doc) + text[end:])
