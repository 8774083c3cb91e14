"""Write one named section of benchmarks/RESULTS.md, leaving the others alone."""

from __future__ import annotations

import re
from pathlib import Path

from fp4lib.study import machine_info

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section is rewritten by the script named in it; numbers are medians.\n"


def machine() -> str:
    """One line naming the CPU, core count, OS, Python and torch versions."""
    m = machine_info()
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}, {m['os']}{gpu}"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section delimited by ``<!-- name:start/end -->``."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    block = f"<!-- {name}:start -->\n{body.rstrip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
