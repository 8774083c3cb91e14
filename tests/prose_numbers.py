"""Every number in the book's prose has a source: the scan behind ``test_book_text.py``.

A number typed in a chapter's markdown is read with its sign (``+``, ``-`` or
the Unicode minus), its thousands separators, and a ``%`` or ratio mark
(``0.42x``, ``2.47×``). It passes when it is

* **printed nearby**: it appears, with its sign and at the precision typed, in
  the stored outputs (text or glued values) of a code cell in its *scope*.
  The scope of a markdown cell is every code cell of its section (the cells
  from the last markdown cell with a heading, or that opens an exercise or a
  solution, at or before it up to the next such cell) together with the
  :data:`NEARBY` code cells just before it. The prose
  may round (``0.0148`` matches a printed ``0.014812``); a percentage matches
  the same number printed as a percentage or as a fraction (``1%`` and
  ``0.0102``); a ratio matches the number printed with or without its ``x``.
  A number typed with a sign needs the same sign printed; an unsigned one
  states a magnitude and matches either sign.
* **glued**: inside a ``{glue}`` role, so the build writes it from a variable;
* **allowed**: it matches an entry of :data:`ALLOWED` (definitions: format
  constants, bit widths, years, small counts, ...), each with its reason, or
  an entry of :data:`ALLOWED_TEXT` that names the exact sentence and the cell
  that prints the value.

Citations (``{cite:p}`...```) are removed before the scan; the rest of a cited
sentence is scanned like any other. Inline code, code blocks, links'
targets, labels, directive options and HTML comments are not prose and are not
scanned.

Run ``python tests/prose_numbers.py`` to list every number without a source.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Set, Tuple

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: How many code cells just before a markdown cell are in its scope, besides
#: the code cells of its own section.
NEARBY = 2

# (pattern over the number as written, reason). A number matching the whole
# pattern needs no other source. The patterns see the token as typed, sign and
# ``%`` included, so a signed number or a percentage never passes as a
# "definition" unless an entry says so.
ALLOWED = [
    (r"[0-9]", "single digits: counts, bit widths, small exponents, list and chapter numbers"),
    (r"1[0-9]|20", "small counts (bits in a float16, blocks in an example, ...) that the text itself defines"),
    (r"(32|64|128|256|512|1024|2048|4096|8192)",
     "powers of two: block sizes, widths and shapes that the adjacent code sets"),
    (r"(16|24|48)x(16|24|48)|1x(16|32)", "tile and block shapes of the formats, set by the adjacent code"),
    (r"0\.5|1\.5|0\.25|0\.75|2\.5|3\.5", "E2M1 grid points and their midpoints (printed in chapter 1's table)"),
    (r"[-−](1|6)", "ends of the E2M1 range [-6, 6] and of the normalized range [-1, 1]"),
    (r"448|192", "format constants: the largest E4M3 value; bitsandbytes fp4's smallest step is 1/192"),
    (r"754", "the number of the IEEE 754 floating-point standard"),
    (r"[-−]?(126|127|149|1022|1023)", "IEEE 754 float32/float64 exponent limits and biases"),
    (r"(19|20)\d\d", "years in citations and dates"),
    (r"(2\d\d\d)\.(\d{4,5})", "arXiv identifiers of cited papers"),
    (r"100%|50%|0%", "whole and half shares, as words ('all', 'half', 'none')"),
    (r"95%", "the confidence level of every interval the statistics code prints"),
]

# Numbers allowed in one sentence only: (chapter stem, number as typed, a piece
# of the sentence, reason). The reason says where the number comes from: a
# definition, a cited paper (the sentence's citation), or the cell that prints
# it out of the sentence's scope (such a number should be glued from that cell
# when the notebook is next executed).
ALLOWED_TEXT: List[Tuple[str, str, str, str]] = [
    # definitions and configuration
    ("01_fp4_bit_layout", "0.9677083", "evenly spaced probabilities from 0.5 out to",
     "cited: the last probability in bitsandbytes' NF4 construction"),
    ("02_blockwise_quantization", "0.02", "the weights of a GPT start out around",
     "definition: the GPT initialization standard deviation, 0.02"),
    ("03_four_panel_analysis", "50", "draw 50 weights from",
     "configuration of the tutorial experiment; cell 6 prints the shape (1, 50)"),
    ("04_fp4_training_numerics", "24", "entries below 1/24 of their block maximum",
     "definition: the E2M1 dead zone, 0.25 / 6 of the block maximum"),
    ("05_fp4_pretraining_run", "1%", 'equivalence tests for "within 1%" claims',
     "definition: the equivalence margin the chapter's tests use"),
    ("05_fp4_pretraining_run", "96", "continues the same 96 bytes of held-out code",
     "configuration: the sampling cell (cell 15) takes val_windows.tokens[:96]"),
    ("05_fp4_pretraining_run", "0.8", "sampled with the same random draws at temperature 0.8",
     "configuration: the sampling cell (cell 15) passes temperature=0.8"),
    ("05_fp4_pretraining_run", "100", r"d_i = 100\left(",
     "definition: the difference is written in percent"),
    ("05_fp4_pretraining_run", "0.5%", "a true effect of a chosen size, 0.5% or 1%",
     "definition: the effect sizes the power estimates are computed for"),
    ("05_fp4_pretraining_run", "60", "the same 60-step run made with",
     "configuration: the repro study's step count, printed by cell 17"),
    ("06_distributed_and_interop", "24", "far from 24 bits",
     "definition: the 24-bit significand of FP32"),
    # cited results of papers
    ("04_fp4_training_numerics", "62", "the last 8 of their 62 blocks in BF16", "cited: nvidia2025nvfp4"),
    ("05_fp4_pretraining_run", "62", "last 8 of 62 blocks in BF16", "cited: nvidia2025nvfp4"),
    ("05_fp4_pretraining_run", "10\ntrillion", "Mamba-Transformer on 10", "cited: nvidia2025nvfp4"),
    ("05_fp4_pretraining_run", "1 trillion", "model over 1 trillion tokens",
     "cited: nvidia2025nvfp4 (both uses in the sentence)"),
    ("05_fp4_pretraining_run", "30", "Quartet fitted its scaling law on", "cited: castro2025quartet"),
    ("05_fp4_pretraining_run", "200 million", "Quartet fitted its scaling law on", "cited: castro2025quartet"),
    ("05_fp4_pretraining_run", "0.95", "with efficiencies of 0.65 and 0.95", "cited: castro2025quartet"),
    # printed by a cell outside the sentence's scope (summaries and introductions)
    ("00_introduction", "87.5%", "4-bit elements need 87.5% less memory than FP32",
     "printed by cell 8 (memory table, FP4 element alone, saving vs FP32 (%) 87.5)"),
    ("00_introduction", "75%", "and 75% less than BF16",
     "printed by cell 8 (memory table, FP4 element alone, saving vs BF16 (%) 75.0)"),
    ("02_blockwise_quantization", "4.13", "brings the cost down to about 4.13 bits",
     "printed by cell 42 (bits per element, NF4, block 64, double quant.: 4.127)"),
    ("02_blockwise_quantization", "30%", "Gaussian data, in about 30% of blocks",
     "printed by cell 29 (clipped blocks, reported by quantize: 29.36%), rounded to tens"),
    ("02_blockwise_quantization", "30%", "with the OCP rule about 30% of Gaussian blocks clip",
     "printed by cell 29 (clipped blocks, reported by quantize: 29.36%), rounded to tens"),
    ("03_four_panel_analysis", "94%", "sits either just under 94% or at 100%",
     "printed by cell 25 (median max relative error ... (bound 93.94%))"),
    ("03_four_panel_analysis", "94%", "Most seeds lie just under 94%",
     "printed by cell 25 (median max relative error ... (bound 93.94%))"),
    ("03_four_panel_analysis", "93.9", r"\tfrac{31}{33} = 93.9",
     "printed by cell 25 (bound 93.94%)"),
    ("03_four_panel_analysis", "22.6%", "and 22.6% of the seeds have such a weight",
     "printed by cell 25 (seeds at 100% (a weight rounded to zero): 22.6%)"),
    ("02_blockwise_quantization", "100", "with one weight of 100 among",
     "configuration: the outlier cell 4 adds (N(0,1) + one weight = 100)"),
    ("02_blockwise_quantization", "4.5", "absmax per 64 elements, 4.5 bits per element",
     "printed by cell 42 (bits per element, bitsandbytes fp4, block 64: 4.500)"),
    ("02_blockwise_quantization", "4.5", "an FP32 scale per tensor, 4.5 bits",
     "printed by cell 42 (bits per element, NVFP4 (E4M3 per 16 + FP32): 4.500)"),
    ("02_blockwise_quantization", "4.25", "scale per 32 costs 4.25 bits",
     "printed by cell 42 (bits per element, MXFP4 (E8M0 per 32): 4.250)"),
    ("05_fp4_pretraining_run", "400", "its 400-step loss shows",
     "configuration: the study's step count, printed by cell 6 (400 steps in the study)"),
    ("03_four_panel_analysis", "92.91%", "Seed 0's maximum, 92.91%",
     "printed by cell 17 (max_rel_error, seed 0: 92.91%)"),
    ("05_fp4_pretraining_run", "a million", "this model has about a million parameters",
     "printed by cell 6 (model: ..., 836,736 parameters)"),
]

_SKIP_PATTERNS = [
    r"```.*?```",  # fenced code and directives' bodies that are code
    r"~~~.*?~~~",
    r"<!--.*?-->",
    r"\{cite(?::\w+)?\}`[^`]*`",  # citations: removed, the sentence is still scanned
    r"`[^`\n]*`",  # inline code and role targets
    r"\]\([^)]*\)",  # link targets
    r"^\([\w:.-]+\)=\s*$",  # MyST labels
    r"^:[\w-]+:.*$",  # directive options
    r"https?://\S+",
    r"\\(label|ref|eqref|cite)\{[^}]*\}",
]
_MINUS = "−"
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_NUMBER = re.compile(
    r"(?<![\w.\\^_{+\-" + _MINUS + r"])[-+" + _MINUS + r"]?(?:" + _NUM + r")(?:[eE][-+]?\d+)?"
    r"(?:x\d+(?![\w.])|%|[x×](?![\w.])(?!\s*\d))?(?![\w])"
    r"(?:\s+(?:thousand|million|billion|trillion)\b)?"
    r"|\b(?:a|one|a few|several|many)\s+(?:thousand|million|billion|trillion)\b")
_MAGNITUDE = re.compile(r"(thousand|million|billion|trillion)$")
_PRINTED_NUMBER = re.compile(r"(?<![\w.])[-+" + _MINUS + r"]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_PRINTED_THOUSANDS = re.compile(r"(?<![\w.,])[-+" + _MINUS + r"]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w,])")
_GLUE = re.compile(r"\{glue(?::\w+)?\}`[^`]*`")
_HEADING = re.compile(r"^#{1,6}\s|^[`:]{3,}\{(exercise|solution-start|solution)\}", re.M)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(*_])|\n\s*\n|\n[-*] ")
_GLUED_MIME = "application/papermill.record/"


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
    """What a code cell shows, plus the values it glues (shown or not)."""
    tags = set(cell.metadata.get("tags", []))
    parts = []
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        for mime, value in data.items():
            if mime.startswith(_GLUED_MIME + "text/plain"):
                parts.append(value if isinstance(value, str) else "".join(value))
        if tags & {"remove-output", "remove-cell"}:
            continue
        if "text" in out:
            parts.append(out["text"])
        for mime in ("text/plain", "text/markdown", "text/html", "text/latex"):
            value = data.get(mime)
            if value:
                parts.append(value if isinstance(value, str) else "".join(value))
    return "\n".join(parts)


def _parse(token: str) -> Optional[Decimal]:
    try:
        return Decimal(token.replace(",", "").replace(_MINUS, "-"))
    except InvalidOperation:
        return None


def printed_numbers(cells) -> Set[Decimal]:
    """Every number the given code cells print, with its sign."""
    found = set()
    for cell in cells:
        if cell.cell_type == "code":
            text = _output_text(cell)
            for token in _PRINTED_NUMBER.findall(text) + _PRINTED_THOUSANDS.findall(text):
                value = _parse(token)
                if value is not None:
                    found.add(value)
    return found


def prose(source: str) -> str:
    """The markdown with code, citations, link targets, labels and options blanked out."""
    for pattern in _SKIP_PATTERNS:
        source = re.sub(pattern, " ", source, flags=re.S | re.M)
    return source


def _decimals(text: str) -> int:
    digits = text.split("e")[0].split("E")[0]
    return len(digits.split(".")[1]) if "." in digits else 0


def _rounds_to(value: Decimal, target: Decimal, places: int) -> bool:
    quantum = Decimal(1).scaleb(-places)
    try:
        return any(value.quantize(quantum, rounding=r) == target for r in (ROUND_HALF_UP, ROUND_HALF_EVEN))
    except InvalidOperation:
        return False


def _matches_printed(token: str, printed: Set[Decimal]) -> bool:
    """True when ``token`` is a number in ``printed``, as written or rounded, with its sign."""
    if _MAGNITUDE.search(token):
        return False
    text = token.replace(",", "").replace(_MINUS, "-")
    signed = text[0] in "+-"
    percent = text.endswith("%")
    text = text.rstrip("%×x")
    if "x" in text:  # a shape such as 16x16
        return False
    value = _parse(text)
    if value is None:
        return False
    places = _decimals(text)
    candidates = [(value, places)]
    if percent:
        candidates.append((value / 100, places + 2))
    for target, p in candidates:
        for v in printed:
            if not signed:  # an unsigned number may state a magnitude ("shrunk by 1%")
                v = abs(v)
                target = abs(target)
            if _rounds_to(v, target, p) or (abs(target) >= 1000 and v == target):
                return True
    return False


def _allowed(token: str) -> bool:
    if _MAGNITUDE.search(token):
        return False
    return any(re.fullmatch(p, token) for p, _ in ALLOWED)


def _allowed_text(chapter: str, token: str, sentence: str, used: Optional[Set[int]] = None) -> bool:
    for k, (c, n, piece, _) in enumerate(ALLOWED_TEXT):
        if c == chapter and n == token and piece in sentence:
            if used is not None:
                used.add(k)
            return True
    return False


def scopes(nb) -> List[List[int]]:
    """For each cell, the indices of the code cells whose outputs may source its numbers."""
    section, sections = 0, []
    for cell in nb.cells:
        if cell.cell_type == "markdown" and _HEADING.search(cell.source):
            section += 1
        sections.append(section)
    result = []
    for i in range(len(nb.cells)):
        same = [j for j, c in enumerate(nb.cells) if c.cell_type == "code" and sections[j] == sections[i]]
        before = [j for j in range(i) if nb.cells[j].cell_type == "code"][-NEARBY:]
        result.append(sorted(set(same) | set(before)))
    return result


def scan_notebook(nb, chapter: str, used: Optional[Set[int]] = None) -> List[Finding]:
    """Every number in one notebook's prose that has no source, in order.

    ``used`` collects the indices of the :data:`ALLOWED_TEXT` entries that let a
    number through."""
    findings: List[Finding] = []
    for i, (cell, scope) in enumerate(zip(nb.cells, scopes(nb))):
        if cell.cell_type != "markdown":
            continue
        printed = printed_numbers(nb.cells[j] for j in scope)
        text = _GLUE.sub(" ", prose(cell.source))
        for sentence in _SENTENCE_END.split(text):
            context = " ".join(sentence.split())
            for m in _NUMBER.finditer(sentence):
                token = m.group(0)
                if _allowed(token) or _matches_printed(token, printed) or _allowed_text(chapter, token, context, used):
                    continue
                findings.append(Finding(chapter, token, context[:160]))
    return findings


def scan(chapters: Sequence[Path] = (), used: Optional[Set[int]] = None) -> List[Finding]:
    """Every number in the chapters' prose that has no source, in book order."""
    findings: List[Finding] = []
    for path in chapters or toc_chapters():
        findings += scan_notebook(nbformat.read(path, as_version=4), path.stem, used)
    return findings


def unused_allowed_text(chapters: Sequence[Path] = ()) -> List[Tuple[str, str, str, str]]:
    """The :data:`ALLOWED_TEXT` entries that no number of the chapters needs."""
    used: Set[int] = set()
    scan(chapters, used)
    return [e for k, e in enumerate(ALLOWED_TEXT) if k not in used]


def main(argv: Iterable[str] = ()) -> int:
    findings = scan()
    for f in findings:
        print(f)
    print(f"{len(findings)} numbers without a source")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
