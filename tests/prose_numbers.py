"""Every number in the book's prose has a source: the scan behind ``test_prose_numbers.py``.

A number in a chapter's markdown passes when it is

* **printed**: a cell of this chapter shows it in its stored output (the prose
  may round it: ``0.0148`` matches a printed ``0.014812``; a percentage matches
  the same number printed as a fraction or as a percentage), or a cell of an
  earlier chapter printed exactly this number;
* **glued**: inside a ``{glue}`` role, so the build writes it from a variable;
* **cited**: its sentence carries a ``{cite}`` role;
* **allowed**: it matches an entry of :data:`ALLOWED`, each with its reason.

Inline code, code blocks, links' targets, labels, directive options and HTML
comments are not prose and are not scanned.

Run ``python tests/prose_numbers.py`` to list every number without a source.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Iterable, List, Sequence, Set

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]

# (pattern over the number as written, reason). A number matching the whole
# pattern needs no other source.
ALLOWED = [
    (r"[0-9]", "single digits: counts, bit widths, small exponents, list and chapter numbers"),
    (r"1[0-9]|20", "small counts (bits in a float16, blocks in an example, ...) that the text itself defines"),
    (r"(32|64|128|256|512|1024|2048|4096|8192)",
     "powers of two: block sizes, widths and shapes that the adjacent code sets"),
    (r"(16|24|48)x(16|24|48)|(\d+)x(\d+)", "tensor shapes, set by the adjacent code"),
    (r"0\.5|1\.5|0\.25|0\.75|2\.5|3\.5", "E2M1 grid points and their midpoints (printed in chapter 1's table)"),
    (r"-?(126|127|149|1022|1023)", "IEEE 754 float32/float64 exponent limits and biases"),
    (r"(19|20)\d\d", "years in citations and dates"),
    (r"(2\d\d\d)\.(\d{4,5})", "arXiv identifiers of cited papers"),
    (r"100%|50%|0%", "whole and half shares, as words ('all', 'half', 'none')"),
]

_SKIP_PATTERNS = [
    r"```.*?```",  # fenced code and directives' bodies that are code
    r"~~~.*?~~~",
    r"<!--.*?-->",
    r"`[^`\n]*`",  # inline code and role targets
    r"\]\([^)]*\)",  # link targets
    r"^\([\w:.-]+\)=\s*$",  # MyST labels
    r"^:[\w-]+:.*$",  # directive options
    r"https?://\S+",
    r"\\(label|ref|eqref|cite)\{[^}]*\}",
]
_NUMBER = re.compile(r"(?<![\w.\\^_{])[-−]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?(?:x\d+)?%?(?![\w])"
                     r"(?:\s+(?:thousand|million|billion|trillion)\b)?"
                     r"|\b(?:a|one|a few|several|many)\s+(?:thousand|million|billion|trillion)\b")
_MAGNITUDE = re.compile(r"(thousand|million|billion|trillion)$")
_PRINTED_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_GLUE = re.compile(r"\{glue(?::\w+)?\}`[^`]*`")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(*_])|\n\s*\n|\n[-*] ")


@dataclass(frozen=True)
class Finding:
    chapter: str
    number: str
    context: str

    def __str__(self) -> str:
        return f"{self.chapter}: {self.number!r} in: {self.context}"


def toc_chapters() -> List[Path]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc.get("parts", []) for c in part.get("chapters", [])]
    return [ROOT / f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").exists()]


def _output_text(cell) -> str:
    tags = set(cell.metadata.get("tags", []))
    if tags & {"remove-output", "remove-cell"}:
        return ""
    parts = []
    for out in cell.get("outputs", []):
        if "text" in out:
            parts.append(out["text"])
        for mime in ("text/plain", "text/markdown", "text/html", "text/latex"):
            data = out.get("data", {}).get(mime)
            if data:
                parts.append(data if isinstance(data, str) else "".join(data))
    return "\n".join(parts)


def printed_numbers(nb) -> Set[Decimal]:
    found = set()
    for cell in nb.cells:
        if cell.cell_type == "code":
            for token in _PRINTED_NUMBER.findall(_output_text(cell)):
                try:
                    found.add(Decimal(token))
                except InvalidOperation:
                    pass
    return found


def prose(source: str) -> str:
    """The markdown with code, link targets, labels and options blanked out."""
    for pattern in _SKIP_PATTERNS:
        source = re.sub(pattern, " ", source, flags=re.S | re.M)
    return source


def _decimals(token: str) -> int:
    digits = token.split("e")[0].split("E")[0]
    return len(digits.split(".")[1]) if "." in digits else 0


def _matches_printed(token: str, printed: Set[Decimal], exact: Set[Decimal]) -> bool:
    """True when ``token`` is a printed number of this chapter (``printed``), as
    written or rounded, or exactly a number printed in an earlier one (``exact``)."""
    if _MAGNITUDE.search(token):
        return False
    text = token.replace(",", "").replace("−", "-")
    percent = text.endswith("%")
    text = text.rstrip("%")
    if "x" in text:
        return False
    try:
        value = Decimal(text)
    except InvalidOperation:
        return False
    places = _decimals(text)
    candidates = [(value, places)]
    if percent:
        candidates.append((value / 100, places + 2))
    for target, p in candidates:
        if target in exact:
            return True
        quantum = Decimal(1).scaleb(-p)
        for v in printed:
            for w in (v, -v):
                try:
                    if w.quantize(quantum) == target or (abs(target) >= 1000 and w == target):
                        return True
                except InvalidOperation:
                    continue
    return False


def _allowed(token: str) -> bool:
    if _MAGNITUDE.search(token):
        return False
    bare = token.replace("−", "-")
    return any(re.fullmatch(p, bare) or re.fullmatch(p, bare.lstrip("-")) for p, _ in ALLOWED)


def scan(chapters: Sequence[Path] = ()) -> List[Finding]:
    """Every number in the chapters' prose that has no source, in book order."""
    findings: List[Finding] = []
    earlier: Set[Decimal] = set()
    for path in chapters or toc_chapters():
        nb = nbformat.read(path, as_version=4)
        printed = printed_numbers(nb)
        for cell in nb.cells:
            if cell.cell_type != "markdown":
                continue
            text = _GLUE.sub(" ", prose(cell.source))
            for sentence in _SENTENCE_END.split(text):
                if "{cite" in sentence:
                    continue
                for m in _NUMBER.finditer(sentence):
                    token = m.group(0)
                    if _allowed(token) or _matches_printed(token, printed, earlier):
                        continue
                    context = " ".join(sentence.split())
                    findings.append(Finding(path.stem, token, context[:160]))
        earlier |= printed
    return findings


def main(argv: Iterable[str] = ()) -> int:
    findings = scan()
    for f in findings:
        print(f)
    print(f"{len(findings)} numbers without a source")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
