"""fp4lib's version: the one place it is written (pyproject.toml and CITATION.cff read or check it)."""

__version__ = "0.2.0"
