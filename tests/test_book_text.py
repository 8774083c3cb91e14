"""The chapters' prose: numbers with a source, terms linked to the glossary, exercises with solutions.

Reads files only (no kernel). ``tests/prose_numbers.py`` holds the number scan and
lists what it finds when run as a script.
"""

import re
from pathlib import Path

import nbformat
import pytest

from prose_numbers import ALLOWED, scan, toc_chapters

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = toc_chapters()
GLOSSARY = (ROOT / "book" / "glossary.md").read_text()

# Terms a chapter links to the glossary where it first uses them: (glossary entry,
# pattern of a plain use in the prose).
LINKED_TERMS = {
    "GEMM": r"\bGEMMs?\b",
    "E4M3": r"\bE4M3\b",
    "E8M0": r"\bE8M0\b",
    "relative MSE": r"\brelative MSE\b",
    "SQNR": r"\bSQNR\b",
    "dead zone": r"\bdead zone\b",
    "ci preset": r"\bci\b[\"”]? preset|\bpreset [\"“]?ci\b",
    "nats per byte": r"\bnats per byte\b",
    "final stretch in high precision": r"\bfinal stretch\b",
    "Quartet": r"\bQuartet\b",
    "binade": r"\bbinades?\b",
    "backend": r"\b(fused|auto)[\"”]? backends?\b|\bbackends?\b",
    "epilogue": r"\bepilogues?\b",
    "ulp": r"\bulps?\b",
    "tiny preset": r"\btiny\b[\"”]? preset|\bpreset [\"“]?tiny\b",
}
_TERM_ROLE = re.compile(r"\{term\}`([^`<]*?)\s*(?:<([^>]+)>)?`")


def _markdown(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    text = "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    return re.sub(r"```.*?```|<!--.*?-->", lambda m: " " * len(m.group(0)), text, flags=re.S)


def _blank(text: str, pattern: str) -> str:
    return re.sub(pattern, lambda m: " " * len(m.group(0)), text)


# ----------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------
def test_every_number_in_the_prose_has_a_source():
    findings = scan(CHAPTERS)
    assert not findings, "numbers with no printing cell, glue or citation:\n" + "\n".join(map(str, findings))


def test_the_allow_list_gives_a_reason_for_each_entry():
    for pattern, reason in ALLOWED:
        re.compile(pattern)
        assert len(reason.split()) >= 3, pattern


def test_the_scan_finds_an_unsourced_number(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(0.1234)", outputs=[
                    nbformat.v4.new_output("stream", name="stdout", text="0.1234\n")]),
                nbformat.v4.new_markdown_cell("The error is 0.123, and 0.7321 is typed in. "
                                              "Papers report 1.5% {cite}`x`. A glued value {glue:text}`v`.")]
    path = tmp_path / "chapter.ipynb"
    nbformat.write(nb, path)
    assert [f.number for f in scan([path])] == ["0.7321", "1.5%"]  # a citation vouches for nothing


# ----------------------------------------------------------------------------
# Glossary
# ----------------------------------------------------------------------------
def _glossary_entries():
    body = GLOSSARY.split("```{glossary}", 1)[1].split("```", 1)[0]
    return {line.strip() for line in body.splitlines() if line and not line.startswith(" ")}


def test_the_glossary_defines_every_linked_term():
    entries = _glossary_entries()
    missing = [t for t in LINKED_TERMS if t not in entries]
    assert not missing, f"glossary.md lacks {missing}"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_each_chapter_links_a_term_where_it_first_uses_it(path):
    text = _markdown(path)
    links = {}
    for m in _TERM_ROLE.finditer(text):
        target = (m.group(2) or m.group(1)).strip()
        links.setdefault(target, m.start())
    plain = _blank(_blank(text, r"\{term\}`[^`]*`"), r"`[^`\n]*`|\]\([^)]*\)")
    late = []
    for term, pattern in LINKED_TERMS.items():
        use = re.search(pattern, plain)
        if use is None:
            continue
        if term not in links or links[term] > use.start():
            late.append(f"{term!r} first used at {' '.join(plain[use.start():use.start() + 60].split())!r}")
    assert not late, f"{path.stem} uses terms before linking them to the glossary: " + "; ".join(late)


# ----------------------------------------------------------------------------
# Exercises
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_every_exercise_has_an_executed_solution(path):
    nb = nbformat.read(path, as_version=4)
    exercises, solutions, open_solution = [], {}, None
    for cell in nb.cells:
        src = cell.source
        if cell.cell_type == "markdown":
            exercises += re.findall(r"```\{exercise\}[^\n]*\n:label:\s*(\S+)", src)
            start = re.search(r"```\{solution-start\}\s*(\S+)", src)
            if start:
                assert open_solution is None, f"solution {open_solution} is not closed"
                open_solution = start.group(1)
                solutions[open_solution] = 0
            if "```{solution-end}" in src:
                assert open_solution is not None, "solution-end without solution-start"
                open_solution = None
        elif open_solution is not None:
            assert cell.get("outputs") or "skip-execution" not in cell.metadata.get("tags", []), open_solution
            solutions[open_solution] += 1
    assert open_solution is None, f"solution {open_solution} is not closed"
    assert exercises, f"{path.stem} has no exercises"
    for label in exercises:
        assert label in solutions, f"{path.stem}: exercise {label} has no solution"
        assert solutions[label] >= 1, f"{path.stem}: the solution of {label} runs no code"
    assert set(solutions) <= set(exercises), f"{path.stem}: solutions without an exercise"
