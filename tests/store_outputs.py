"""Re-execute book chapters in place, storing their outputs (the CPU run).

Usage::

    .venv/bin/python tests/store_outputs.py book/01_fp4_bit_layout.ipynb [...]

With no arguments it runs every ``book/[0-9][0-9]_*.ipynb``. Each notebook runs with
its own directory as the working directory, like the book build, on the ``python3``
kernel of the interpreter running this script. Cell timing metadata is not recorded,
so re-running an unchanged chapter changes nothing but plot bytes. The stored outputs
are what Colab shows before anything runs and what nbval compares against. After each
chapter it rewrites the chapter's Colab edition (``tests/colab_edition.py``), which
carries the same outputs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def store(path: Path, timeout: int = 600) -> float:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    os.environ.pop("MPLBACKEND", None)  # the kernel must use the inline backend
    paths = [Path(p) for p in argv] or sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import colab_edition

    for p in paths:
        print(f"{p}: {store(p.resolve()):.1f} s", flush=True)
        colab_edition.write(p.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
