"""The chapter cells whose outputs nbval does not compare (a pytest plugin: ``-p nbval_cells``
with ``tests/`` on the path; the Makefile's notebook checks load it).

Their outputs depend on the machine: timings, a package's own messages, CPU bf16 kernels,
the live training runs' last digits. The cells still run, and their assertions still hold
everywhere. Listed here by notebook and cell id, so that the chapters carry no test markup.
"""

from __future__ import annotations

from pathlib import Path

IGNORE_OUTPUT = {
    "00_introduction.ipynb": {"ch0-16"},
    "02_blockwise_quantization.ipynb": {"c2c443ac", "ch2-35"},
    "04_fp4_training_numerics.ipynb": {"109d4771"},
    "05_fp4_pretraining_run.ipynb": {"ch5-08", "ch5-11", "ch5-13", "ch5-gf-live"},
    "06_distributed_and_interop.ipynb": {"5f554a9c"},
}


def ignores_output(notebook: str, cell_id: str) -> bool:
    return cell_id in IGNORE_OUTPUT.get(Path(notebook).name, set())


def pytest_collection_modifyitems(items):
    for item in items:
        cell, options = getattr(item, "cell", None), getattr(item, "options", None)
        if cell is not None and options is not None and ignores_output(str(item.fspath), cell.get("id", "")):
            options["check"] = False
