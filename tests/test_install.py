"""fp4lib installed as a plain (non-editable) package and used from another directory."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    source = tmp_path_factory.mktemp("source")  # a copy, so that the build leaves the checkout alone
    for name in ("pyproject.toml", "README.md", "LICENSE", "LICENSE-BOOK.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "fp4lib", source / "fp4lib", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-cache-dir", "--target", str(target), str(source)], check=True, capture_output=True)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = dict(os.environ, PYTHONPATH=str(target))
    return target, elsewhere, env


def _run(args, cwd, env):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_every_module_imports_from_the_installed_package(installed):
    target, elsewhere, env = installed
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "fp4lib").rglob("*.py") if p.name != "__main__.py"
    )
    code = ("import importlib, fp4lib; "
            f"[importlib.import_module(m) for m in {modules!r}]; print(fp4lib.__file__)")
    out = _run(["-c", code], elsewhere, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))


def test_the_installed_cli_trains_and_the_study_takes_its_results_path(installed):
    target, elsewhere, env = installed
    out = _run(["-m", "fp4lib.train", "--recipe", "nvfp4", "--preset", "tiny", "--steps", "3", "--backend", "fused",
                "--out", "run", "--no-progress", "--threads", "1"], elsewhere, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("final val_loss: ")
    listing = _run(["-m", "fp4lib.study", "--results", str(ROOT / "experiments" / "results"), "list"], elsewhere, env)
    assert listing.returncode == 0, listing.stderr
    assert "repro_nvfp4_hp_final_s0" in listing.stdout


def test_the_installed_package_carries_its_corpus_types_version_and_licenses(installed):
    target, elsewhere, env = installed
    assert (target / "fp4lib" / "py.typed").is_file()
    assert (target / "fp4lib" / "corpora" / "LICENSE-python.txt").is_file()
    code = ("import fp4lib, importlib.metadata as m; from fp4lib.training.data import load_corpus; "
            "print(fp4lib.__version__, m.version('fp4lib'), load_corpus(None).sha256)")
    out = _run(["-c", code], elsewhere, env)
    assert out.returncode == 0, out.stderr
    version, meta_version, sha = out.stdout.split()
    assert version == meta_version and sha.startswith("e25e71053e02")
    dist = next(target.glob("fp4lib-*.dist-info"))
    licenses = {p.name for p in dist.rglob("LICENSE*")}
    assert {"LICENSE", "LICENSE-BOOK.md", "LICENSE-python.txt"} <= licenses, licenses


def test_citation_names_the_package_version():
    import re

    import fp4lib

    cff = (ROOT / "CITATION.cff").read_text()
    assert re.search(r'^version: "([^"]+)"$', cff, re.M).group(1) == fp4lib.__version__
    assert (ROOT / "LICENSE").read_text().count("Apache License") >= 2 and (ROOT / "LICENSE-BOOK.md").is_file()
