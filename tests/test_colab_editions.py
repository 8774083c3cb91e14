"""The Colab editions (book/colab/) are what tests/colab_edition.py writes from the chapters.

An edition is a generated file: after a chapter changes (text or stored outputs), run
``python tests/colab_edition.py`` (``tests/store_outputs.py`` does it for the chapters
it executes). These checks read files only.
"""

import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "book" / "_ext"))

import colab_edition  # noqa: E402
from browser_check import colab_url  # noqa: E402

from fp4lib.display.notebook import colab_edition_path  # noqa: E402

CHAPTERS = colab_edition.chapters()


@pytest.fixture(params=CHAPTERS, ids=[c.stem for c in CHAPTERS])
def chapter(request):
    return request.param


def test_every_chapter_has_an_edition_and_no_other():
    assert colab_edition.stale() == [], "run: python tests/colab_edition.py"


def test_edition_is_current(chapter):
    path = colab_edition.edition_path(chapter)
    assert path.exists(), f"no Colab edition of {chapter.name}: run python tests/colab_edition.py"
    assert path.read_text() == colab_edition.edition_text(chapter), (
        f"{path.relative_to(ROOT)} is stale: run python tests/colab_edition.py {chapter.relative_to(ROOT)}")


def test_edition_reads_as_plain_markdown(chapter):
    nb = nbformat.read(colab_edition.edition_path(chapter), as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        assert not re.search(r"\{[a-z][a-z0-9:_-]*\}`", cell.source), f"a raw role: {cell.source[:200]!r}"
        assert not re.search(r"^(`{3,}|:{3,})\{", cell.source, re.M), f"a raw directive: {cell.source[:200]!r}"


def test_edition_keeps_code_outputs_and_metadata(chapter):
    ours = nbformat.read(chapter, as_version=4)
    theirs = nbformat.read(colab_edition.edition_path(chapter), as_version=4)
    assert [c for c in theirs.cells if c.cell_type == "code"] == [c for c in ours.cells if c.cell_type == "code"]
    assert theirs.metadata == ours.metadata


def test_literalincludes_become_the_library_code(chapter):
    ours = "\n".join(c.source for c in nbformat.read(chapter, as_version=4).cells if c.cell_type == "markdown")
    theirs = "\n".join(c.source for c in nbformat.read(colab_edition.edition_path(chapter), as_version=4).cells
                       if c.cell_type == "markdown")
    for name in re.findall(r"^:pyobject: (\S+)$", ours, re.M):
        assert re.search(rf"^(def|class) {re.escape(name.split('.')[-1])}\b", theirs, re.M), name


def test_citations_and_glue_are_resolved():
    md = "{cite:t}`castro2025quartet` and {cite:p}`ocp2023mx,tseng2025mxfp4`; {term}`E2M1`, " \
         "{term}`blocks <block scale>`, {py:func}`~fp4lib.engines.torchao.to_torchao`, {glue:text}`n:,d`"
    out = colab_edition.convert_markdown(md, CHAPTERS[0], {"n": "4096"}, colab_edition.read_bib())
    assert out == ("[Castro et al. (2025)](https://arxiv.org/abs/2505.14669) and ([Open Compute Project, 2023]"
                   "(https://www.opencompute.org/documents/ocp-microscaling-formats-mx-v1-0-spec-final-pdf); "
                   "[Tseng et al., 2025](https://arxiv.org/abs/2502.20586)); E2M1, blocks, `to_torchao()`, 4,096")


def test_unknown_markup_is_an_error():
    bib = colab_edition.read_bib()
    with pytest.raises(ValueError):
        colab_edition.convert_markdown("{numref}`fig-x`", CHAPTERS[0], {}, bib)
    with pytest.raises(ValueError):
        colab_edition.convert_markdown("```{note}\nhi\n```\n", CHAPTERS[0], {}, bib)


def test_colab_buttons_open_the_editions(chapter):
    # the book's Sphinx hook (book/_ext/colab_buttons.py) and the browser check agree, and the file exists
    page = chapter.relative_to(ROOT).with_suffix("").as_posix()
    url = colab_url(page)
    assert url.endswith("/" + colab_edition_path(f"{page}.ipynb"))
    assert (ROOT / colab_edition_path(f"{page}.ipynb")).exists()


def test_the_build_hook_rewrites_the_colab_button():
    from colab_buttons import _point_colab_at_editions

    page = "book/01_fp4_bit_layout"
    theme_url = colab_url(page).replace("/book/colab/", "/book/")  # what sphinx-book-theme makes
    context = {"header_buttons": [{"type": "group", "buttons": [
        {"type": "link", "text": "Colab", "url": theme_url},
        {"type": "link", "text": "Binder", "url": "https://mybinder.org/v2/gh/o/r/main?urlpath=book/x.ipynb"}]}]}
    _point_colab_at_editions(None, page, "page.html", context, None)
    buttons = context["header_buttons"][0]["buttons"]
    assert buttons[0]["url"] == colab_url(page)
    assert buttons[1]["url"].endswith("book/x.ipynb")
