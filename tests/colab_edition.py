"""Write the Colab edition of each chapter: ``book/NN_x.ipynb`` -> ``book/colab/NN_x.ipynb``.

Usage::

    python tests/colab_edition.py [book/01_fp4_bit_layout.ipynb ...]   # no argument: every chapter
    python tests/colab_edition.py --check                              # exit 1 if an edition is stale

Why editions. A chapter's Markdown is MyST, written for the book's build: the build
pastes glued numbers into the text (``{glue:text}``), links terms to the glossary
(``{term}``), formats citations from ``book/references.bib`` (``{cite:p}``,
``{cite:t}``), names API objects (``{py:func}`` ...), and shows the library code a
chapter explains (``literalinclude`` of ``fp4lib/*.py``). A plain notebook front end
such as Colab renders none of that: roles appear raw and included code is missing.
The edition is the same notebook with that Markdown resolved at write time:

* ``{glue:text}`name:fmt``` becomes the value the chapter's stored outputs hold,
  formatted as the build formats it;
* ``{term}`text <target>``` becomes ``text``;
* ``{cite:t}`key``` becomes ``Author et al. (Year)`` and ``{cite:p}`` ``(Author et al.,
  Year)``, linked to the work where the bibliography gives a URL;
* ``{py:func}`~fp4lib.x.name``` becomes ```name()```;
* a ``literalinclude`` becomes a fenced code block of the included lines (``:pyobject:``,
  ``:lines:``, ``:start-after:``, ``:end-before:`` as Sphinx reads them);
* ``exercise`` and ``solution`` blocks become plain **Exercise** / **Solution** paragraphs.

Code cells, their stored outputs and the notebook metadata (GPU request included) are
copied unchanged, so an edition runs exactly as its chapter does and shows the same
outputs before it runs. The book's Colab buttons open the editions (the Sphinx hook in
``book/_ext/colab_buttons.py``). Editions are generated, never edited: ``tests/store_outputs.py``
rewrites a chapter's edition after storing its outputs, and
``tests/test_colab_editions.py`` fails when an edition differs from what this script
writes. A directive or role this script does not know is an error, not raw text.
"""

from __future__ import annotations

import ast
import copy
import re
import sys
from ast import literal_eval
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
EDITIONS = BOOK / "colab"
BIB = BOOK / "references.bib"
GLUE_PREFIX = "application/papermill.record/"


# ----------------------------------------------------------------------------
# Bibliography
# ----------------------------------------------------------------------------
def _braced(text: str, start: int) -> tuple[str, int]:
    """The content of the brace group opening at ``text[start]`` and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    raise ValueError("unbalanced braces in the bibliography")


def read_bib(path: Path = BIB) -> dict[str, dict[str, str]]:
    """``{key: {field: value}}`` of a BibTeX file (brace-delimited values, bare months)."""
    text = path.read_text()
    entries = {}
    for m in re.finditer(r"@\w+\s*\{\s*([^,\s]+)\s*,", text):
        body, _ = _braced(text, m.end() - len(m.group(0)) + m.group(0).index("{"))
        fields = {}
        for f in re.finditer(r"(\w+)\s*=\s*", body):
            if body[:f.start()].count("{") != body[:f.start()].count("}"):
                continue  # "name =" inside another field's value
            rest = f.end()
            if body[rest] == "{":
                value, _ = _braced(body, rest)
            else:
                value = re.match(r"[^,\n]*", body[rest:]).group(0).strip()
            fields[f.group(1).lower()] = value
        entries[m.group(1)] = fields
    return entries


def _latex_to_text(s: str) -> str:
    s = re.sub(r"\\['`^\"~=.]\{?([A-Za-z])\}?", r"\1", s)  # accents: keep the letter
    s = re.sub(r"\\url\{([^}]*)\}", r"\1", s)
    return s.replace("{", "").replace("}", "").strip()


def _surname(author: str) -> str:
    author = author.strip()
    if author.startswith("{") and author.endswith("}"):
        return _latex_to_text(author)  # an institution
    if "," in author:
        return _latex_to_text(author.split(",")[0])
    return _latex_to_text(author.split()[-1])


def cite_label(entry: dict[str, str]) -> tuple[str, str]:
    """``("Castro et al.", "2025")``: author_year labels as the book's build makes them."""
    authors = [a for a in re.split(r"\s+and\s+", entry.get("author", "").replace("\n", " ")) if a.strip()]
    names = [_surname(a) for a in authors if a.strip() != "others"]
    if len(authors) >= 3 or "others" in authors:
        who = f"{names[0]} et al."
    elif len(names) == 2:
        who = f"{names[0]} and {names[1]}"
    else:
        who = names[0] if names else _latex_to_text(entry.get("title", "?"))
    return who, entry.get("year", "n.d.")


def _entry_url(entry: dict[str, str]) -> str | None:
    if entry.get("url"):
        return entry["url"]
    m = re.search(r"\\url\{([^}]*)\}", entry.get("howpublished", ""))
    return m.group(1) if m else None


def cite(keys: list[str], textual: bool, bib: dict) -> str:
    parts = []
    for key in keys:
        if key not in bib:
            raise KeyError(f"citation key {key!r} is not in {BIB.name}")
        who, year = cite_label(bib[key])
        label = f"{who} ({year})" if textual else f"{who}, {year}"
        url = _entry_url(bib[key])
        parts.append(f"[{label}]({url})" if url else label)
    return ", ".join(parts) if textual else "(" + "; ".join(parts) + ")"


# ----------------------------------------------------------------------------
# Glued values
# ----------------------------------------------------------------------------
def glued_values(nb) -> dict[str, str]:
    """``{name: text/plain}`` of every value a chapter's stored outputs glue."""
    values = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            meta = out.get("metadata", {}).get("scrapbook")
            if meta:
                data = out.get("data", {})
                key = meta.get("mime_prefix", "") + "text/plain"
                if key in data:
                    values[meta["name"]] = data[key]
    return values


def format_glued(text: str, fmt_spec: str) -> str:
    """myst-nb's formatting of a glued text/plain value (``{glue:text}`name:fmt```)."""
    try:
        value = literal_eval(text)
    except (SyntaxError, ValueError):
        value = text
    if fmt_spec == "":
        return str(value)
    kind = fmt_spec[-1]
    if kind == "s":
        value = str(value)
    elif kind in "bcdoxX":
        value = int(value)
    elif kind in "eEfFgGn%":
        value = float(value)
    return format(value, fmt_spec)


# ----------------------------------------------------------------------------
# Roles
# ----------------------------------------------------------------------------
ROLE = re.compile(r"\{([a-z][a-z0-9:_-]*)\}`([^`]+)`")
TITLE_TARGET = re.compile(r"^(.*?)\s*<([^>]+)>$", re.S)


def resolve_role(name: str, content: str, glued: dict, bib: dict) -> str:
    if name == "term":
        m = TITLE_TARGET.match(content)
        return m.group(1) if m else content
    if name in ("cite", "cite:p", "cite:t"):
        keys = [k.strip() for k in content.split(",")]
        return cite(keys, textual=name == "cite:t", bib=bib)
    if name.startswith("py:"):
        m = TITLE_TARGET.match(content)
        if m:
            return f"`{m.group(1)}`"
        shown = content.lstrip("~").split(".")[-1] if content.startswith("~") else content
        if name in ("py:func", "py:meth") and not shown.endswith(")"):
            shown += "()"
        return f"`{shown}`"
    if name in ("glue", "glue:", "glue:any", "glue:text"):
        key, _, fmt = content.partition(":")
        if key not in glued:
            raise KeyError(f"{{glue}} {key!r} has no stored value: execute the chapter first")
        return format_glued(glued[key], fmt)
    raise ValueError(f"role {{{name}}} is not known to {Path(__file__).name}: add it")


def resolve_roles(text: str, glued: dict, bib: dict) -> str:
    return ROLE.sub(lambda m: resolve_role(m.group(1), m.group(2), glued, bib), text)


# ----------------------------------------------------------------------------
# Directives
# ----------------------------------------------------------------------------
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$\n?", re.M | re.S)


def _options(body: str) -> tuple[dict[str, str], str]:
    """A directive's ``:name: value`` option lines and the content after them."""
    options, lines = {}, body.splitlines()
    while lines and re.match(r"^:[\w-]+:", lines[0]):
        name, _, value = lines.pop(0)[1:].partition(":")
        options[name] = value.strip()
    while lines and not lines[0].strip():
        lines.pop(0)
    return options, "\n".join(lines)


def _pyobject(source: str, name: str) -> tuple[int, int]:
    """First and last line (1-based) of a module's function or class ``name`` (``A.b`` for a method)."""
    scope = ast.parse(source).body
    node = None
    for part in name.split("."):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            raise ValueError(f"no {name} in the included file")
        scope = node.body
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return first, node.end_lineno


def _line_ranges(spec: str, n: int) -> list[int]:
    """Sphinx's ``:lines:`` syntax (``1-3,7,9-``), as 0-based indices."""
    picked = []
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        start = int(lo) if lo else 1
        end = (int(hi) if hi else n) if dash else start
        picked += range(start - 1, min(end, n))
    return picked


def literalinclude(argument: str, options: dict, chapter: Path) -> str:
    path = (chapter.parent / argument.strip()).resolve()
    source = path.read_text()
    lines = source.splitlines()
    known = {"pyobject", "lines", "start-after", "end-before", "language", "caption", "dedent", "linenos",
             "emphasize-lines", "name"}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"literalinclude options {sorted(unknown)} are not known to {Path(__file__).name}")
    if "pyobject" in options:
        first, last = _pyobject(source, options["pyobject"])
        lines = lines[first - 1:last]
    if "lines" in options:
        lines = [lines[i] for i in _line_ranges(options["lines"], len(lines))]
    if "start-after" in options:
        at = next(i for i, line in enumerate(lines) if options["start-after"] in line)
        lines = lines[at + 1:]
    if "end-before" in options:
        at = next(i for i, line in enumerate(lines) if options["end-before"] in line)
        lines = lines[:at]
    if "dedent" in options:
        width = int(options["dedent"]) if options["dedent"] else min(
            len(line) - len(line.lstrip()) for line in lines if line.strip())
        lines = [line[width:] for line in lines]
    language = options.get("language") or ("python" if path.suffix == ".py" else "")
    shown = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    head = f"*{options['caption']}* (`{shown}`)\n\n" if options.get("caption") else ""
    return f"{head}```{language}\n# {shown}\n" + "\n".join(lines) + "\n```"


def convert_markdown(text: str, chapter: Path, glued: dict, bib: dict) -> str:
    """A chapter's Markdown cell as plain Markdown (roles resolved, directives replaced)."""
    out, pos = [], 0
    for m in FENCE.finditer(text):
        out.append(resolve_roles(text[pos:m.start()], glued, bib))
        pos = m.end()
        info, body = m.group("info").strip(), m.group("body")
        directive = re.match(r"^\{([\w:-]+)\}\s*(.*)$", info)
        if directive is None:  # an ordinary code block: as it is
            out.append(m.group(0))
            continue
        name, argument = directive.groups()
        options, content = _options(body)
        if name == "literalinclude":
            out.append(literalinclude(argument, options, chapter) + "\n")
        elif name == "exercise":
            out.append("**Exercise.** " + resolve_roles(content, glued, bib).strip() + "\n")
        elif name == "solution-start":
            out.append("**Solution.**\n")
        elif name == "solution-end":
            pass
        else:
            raise ValueError(f"directive {{{name}}} in {chapter.name} is not known to {Path(__file__).name}: add it")
    out.append(resolve_roles(text[pos:], glued, bib))
    return re.sub(r"\n{3,}", "\n\n", "".join(out)).strip("\n")


# ----------------------------------------------------------------------------
# Editions
# ----------------------------------------------------------------------------
def edition_path(chapter: Path) -> Path:
    return chapter.parent / "colab" / chapter.name


def edition(chapter: Path):
    """The Colab edition of ``chapter`` (a notebook node; nothing is written)."""
    import nbformat

    nb = nbformat.read(chapter, as_version=4)
    glued, bib = glued_values(nb), read_bib()
    new = copy.deepcopy(nb)
    cells = []
    for cell in new.cells:
        if cell.cell_type == "markdown":
            cell.source = convert_markdown(cell.source, chapter, glued, bib)
            if not cell.source.strip():
                continue  # e.g. the end of a solution
        cells.append(cell)
    new.cells = cells
    return new


def edition_text(chapter: Path) -> str:
    import nbformat

    return nbformat.writes(edition(chapter)) + "\n"


def chapters() -> list[Path]:
    return sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))


def write(chapter: Path) -> Path:
    path = edition_path(chapter)
    path.parent.mkdir(exist_ok=True)
    path.write_text(edition_text(chapter))
    return path


def stale() -> list[str]:
    """Chapters whose edition is missing or differs from what :func:`write` would write."""
    wrong = [c.name for c in chapters() if not edition_path(c).exists() or edition_path(c).read_text() != edition_text(c)]
    orphans = {p.name for p in EDITIONS.glob("*.ipynb")} - {c.name for c in chapters()}
    return wrong + sorted(f"{o} (no such chapter)" for o in orphans)


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        wrong = stale()
        for name in wrong:
            print(f"stale Colab edition: {name} (run: python tests/colab_edition.py)")
        return 1 if wrong else 0
    for chapter in [Path(a).resolve() for a in argv] or chapters():
        print(write(chapter).relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
