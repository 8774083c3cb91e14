"""Structural checks of the book: configuration, table of contents and every chapter notebook.

These read files only (no kernel), so they are fast. They pin down the conventions the
book relies on: the repository URL is configured once in _config.yml and every Colab
install cell uses it; install cells are hidden and inert off Colab; stored outputs are
complete and clean; every chapter follows the chapter template.
"""

import ast
import re
from pathlib import Path

import nbformat
import pytest
import yaml
from nbval_cells import IGNORE_OUTPUT, ignores_output

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())


def _toc_files():
    files = [TOC["root"]]
    for part in TOC.get("parts", []):
        for chapter in part.get("chapters", []):
            files.append(chapter["file"])
            files += [s["file"] for s in chapter.get("sections", [])]
    return files


CHAPTERS = [ROOT / f"{f}.ipynb" for f in _toc_files() if (ROOT / f"{f}.ipynb").exists()]
CHAPTER_IDS = [p.stem for p in CHAPTERS]


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _markdown(nb):
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


@pytest.fixture(params=CHAPTERS, ids=CHAPTER_IDS)
def notebook(request):
    return request.param, nbformat.read(request.param, as_version=4)


# ----------------------------------------------------------------------------
# Configuration and table of contents
# ----------------------------------------------------------------------------
def test_every_toc_entry_exists():
    for f in _toc_files():
        assert any((ROOT / f"{f}{ext}").exists() for ext in (".ipynb", ".md")), f


def test_config_executes_and_fails_on_errors():
    execute = CONFIG["execute"]
    assert execute["execute_notebooks"] == "force"
    assert execute["raise_on_error"] is True
    assert CONFIG["only_build_toc_files"] is True


def test_config_has_colab_and_repository():
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    repo = CONFIG["repository"]
    assert repo["url"].startswith("https://github.com/")
    assert repo["branch"]


def test_part_one_chapters_are_in_the_toc():
    stems = {Path(f).name for f in _toc_files()}
    for name in ("00_introduction", "01_fp4_bit_layout", "02_blockwise_quantization", "03_four_panel_analysis"):
        assert name in stems


# ----------------------------------------------------------------------------
# The Colab install cell
# ----------------------------------------------------------------------------
def _assignments(source):
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if isinstance(node.value, ast.Constant):
                found[node.targets[0].id] = node.value.value
    return found


def test_install_cell_uses_the_configured_repository(notebook):
    path, nb = notebook
    cell = _code_cells(nb)[0]
    assert "remove-cell" in cell.metadata.get("tags", []), "the install cell is hidden on the website"
    names = _assignments(cell.source)
    assert names.get("FP4LIB_REPOSITORY") == CONFIG["repository"]["url"], "configured once, in _config.yml"
    assert names.get("FP4LIB_BRANCH") == CONFIG["repository"]["branch"]
    assert "bitsandbytes" in cell.source


# What Colab's kernel has without installing anything; the rest a chapter imports, its
# setup cell installs. Import names (bitsandbytes, torchao) are also the package names.
COLAB_SHIPS = {"torch", "numpy", "matplotlib", "scipy", "pandas", "tqdm", "IPython", "ipykernel"}
#: The chapters that ask Colab for a GPU: the ones with GPU code worth running on Colab's.
GPU_CHAPTERS = {"02_blockwise_quantization", "05_fp4_pretraining_run"}


def _pins():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if m:
            pins[m.group(1)] = m.group(2)
    return pins


def _imported_modules(nb):
    import sys

    found = set()
    for cell in _code_cells(nb)[1:]:
        code = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names}


def test_install_cell_installs_what_the_chapter_imports(notebook):
    path, nb = notebook
    cell = _code_cells(nb)[0]
    strings = [n.value for n in ast.walk(ast.parse(cell.source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    installed = {re.split(r"[=<>!~\[]", s)[0]: s for s in strings if re.match(r"^[A-Za-z0-9_.-]+(==|>=|<|~=)", s)}
    pins = _pins()
    for module in _imported_modules(nb) - COLAB_SHIPS - {"fp4lib"}:
        assert module in installed, f"{path.name} imports {module}, which its setup cell does not install"
    for name, spec in installed.items():
        assert name in pins and spec == f"{name}=={pins[name]}", f"{spec}: requirements.txt pins {name}=={pins.get(name)}"
    assert "torch" not in installed, "Colab's CUDA torch stays"


def test_chapters_need_no_book_tooling(notebook):
    path, nb = notebook
    for module in ("myst_nb", "jupyter_book", "sphinx"):
        assert module not in _imported_modules(nb), f"{path.name} imports {module}: use fp4lib.display.notebook"


def test_only_gpu_chapters_ask_colab_for_a_gpu(notebook):
    path, nb = notebook
    if path.stem in GPU_CHAPTERS:
        assert nb.metadata.get("accelerator") == "GPU" and nb.metadata["colab"].get("gpuType"), path.name
        code = "\n".join(c.source for c in _code_cells(nb))
        assert "torch.cuda.is_available()" in code, f"{path.name} asks for a GPU it does not use"
    else:
        assert "accelerator" not in nb.metadata and "gpuType" not in nb.metadata.get("colab", {}), path.name


def test_install_cell_does_nothing_off_colab(notebook):
    path, nb = notebook
    cell = _code_cells(nb)[0]
    tree = ast.parse(cell.source)
    # Top level: only imports and one `if "google.colab" in sys.modules:` block.
    top = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))]
    assert len(top) == 1 and isinstance(top[0], ast.If), "everything that acts is guarded"
    assert ast.unparse(top[0].test) == "'google.colab' in sys.modules"
    assert cell.outputs == [], "off Colab it prints nothing"


# ----------------------------------------------------------------------------
# Stored outputs
# ----------------------------------------------------------------------------
MACHINE_PATH = re.compile(r"(/work/|/home/|/root/|/tmp/|site-packages|C:\\\\)")


def _output_text(output):
    if output.output_type == "stream":
        return output.text
    if output.output_type == "error":
        return "\n".join(output.traceback)
    return "\n".join(v for k, v in output.get("data", {}).items() if k.startswith("text/"))


def test_outputs_are_stored_and_clean(notebook):
    path, nb = notebook
    cells = _code_cells(nb)
    for cell in cells[1:]:
        assert cell.execution_count is not None, f"{path.name}: a cell was not executed: {cell.source[:60]!r}"
        for out in cell.outputs:
            assert out.output_type != "error", f"{path.name}: stored error in {cell.source[:60]!r}"
            if out.output_type == "stream":
                assert out.name == "stdout", f"{path.name}: stderr output (warnings, logs) in {cell.source[:60]!r}"
            text = _output_text(out)
            assert not MACHINE_PATH.search(text), f"{path.name}: machine path in output: {text[:200]!r}"
            assert "Warning" not in text, f"{path.name}: a warning in the output: {text[:200]!r}"
    counts = [c.execution_count for c in cells[1:]]
    assert counts == sorted(counts), "executed top to bottom in one run"


def test_every_chapter_has_a_figure_or_table(notebook):
    path, nb = notebook
    pngs = sum("image/png" in o.get("data", {}) for c in _code_cells(nb) for o in c.outputs)
    assert pngs >= 1, f"{path.name} has no figure"


def test_timing_cells_are_not_compared(notebook):
    path, nb = notebook
    for cell in _code_cells(nb):
        if re.search(r"\b(time\.(perf_counter|time|monotonic)|%%?timeit|%%?time)\b", cell.source):
            assert ignores_output(path.name, cell.get("id", "")), cell.source[:60]


def test_cells_listed_as_not_compared_exist():
    # A renamed or deleted cell id would silently bring a machine-dependent output back into the comparison.
    for name, ids in IGNORE_OUTPUT.items():
        nb = nbformat.read(ROOT / "book" / name, as_version=4)
        missing = ids - {c.get("id") for c in nb.cells if c.cell_type == "code"}
        assert not missing, (name, missing)


def test_notebook_metadata(notebook):
    path, nb = notebook
    assert nb.metadata["kernelspec"]["name"] == "python3"
    nbformat.validate(nb)


# ----------------------------------------------------------------------------
# The chapter template
# ----------------------------------------------------------------------------
def test_chapter_template(notebook):
    path, nb = notebook
    md = _markdown(nb)
    headings = re.findall(r"^(#{1,6}) (.+)$", md, flags=re.M)
    assert sum(1 for level, _ in headings if level == "#") == 1, "one title per chapter"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    titles = [t.strip() for _, t in headings]
    for section in ("What you will learn", "Summary", "Exercises", "References"):
        assert section in titles, f"{path.name} lacks '{section}'"
    order = [titles.index(s) for s in ("What you will learn", "Summary", "Exercises", "References")]
    assert order == sorted(order)
    levels = [len(level) for level, _ in headings]
    assert all(b <= a + 1 for a, b in zip(levels, levels[1:])), "no skipped heading levels"


def test_chapter_cites_the_bibliography(notebook):
    path, nb = notebook
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = set(re.findall(r"@\w+\{([^,]+),", bib))
    cited = set()
    for group in re.findall(r"\{cite(?::[pt])?\}`([^`]+)`", _markdown(nb)):
        cited.update(k.strip() for k in group.split(","))
    assert cited, f"{path.name} cites nothing"
    assert cited <= keys, f"unknown keys {cited - keys}"


def test_bibliography_has_the_required_works():
    bib = (ROOT / "book" / "references.bib").read_text()
    for needle in ("Microscaling", "NVFP4", "Quartet", "Optimizing Large Language Model Training Using {FP4}",
                   "Training {LLMs} with {MXFP4}", "QLoRA"):
        assert needle in bib, needle


def test_bitsandbytes_is_imported_through_the_bridge(notebook):
    path, nb = notebook
    for cell in _code_cells(nb)[1:]:
        lines = cell.source.splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*(import bitsandbytes|from bitsandbytes)", line):
                before = "\n".join(c.source for c in _code_cells(nb)[1:]) .split(line)[0]
                assert "import_bitsandbytes()" in before, f"{path.name}: bitsandbytes imported before silencing"


def test_figures_use_the_inline_backend_whatever_the_environment(notebook):
    # CI exports MPLBACKEND=Agg for the unit tests; the kernel would inherit it and
    # show no figures. The setup cell selects the inline backend explicitly.
    path, nb = notebook
    setup = _code_cells(nb)[1].source
    assert setup.splitlines()[0].strip() == "%matplotlib inline", path.name


# ----------------------------------------------------------------------------
# Offline math and publishing
# ----------------------------------------------------------------------------
def test_mathjax_is_served_from_the_build():
    path = CONFIG["sphinx"]["config"]["mathjax_path"]
    assert "://" not in path and not path.startswith("//"), path
    makefile = (ROOT / "Makefile").read_text()
    assert f"MATHJAX := book/_static/{path}" in makefile
    assert "book/_static" in CONFIG["sphinx"]["config"]["html_static_path"]


def test_pages_workflow_builds_and_deploys_the_book():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "pages.yml").read_text())
    steps = [s for job in workflow["jobs"].values() for s in job["steps"]]
    runs = " ".join(s.get("run", "") for s in steps)
    uses = [s.get("uses", "") for s in steps]
    assert "make book" in runs
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    assert any(u.startswith("actions/deploy-pages") for u in uses)
