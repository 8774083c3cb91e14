"""Training text: an offline corpus of bytes, split into training and validation.

The default corpus is **the source code of the Python standard library** of the
interpreter running the code. It needs no download, so it is there wherever
Python runs (CI included). It is built deterministically:

1. every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, skipping the
   directories in :data:`STDLIB_EXCLUDED_DIRS` (installed packages, and the test
   suites, which some Linux distributions ship separately);
2. sorted by relative POSIX path;
3. each file as a header line ``# ==== <relative path> ====`` then its raw bytes
   and a newline, concatenated;
4. cut at :data:`DEFAULT_MAX_BYTES` (8 MiB) bytes.

Tokens are the bytes themselves (a vocabulary of 256). The last
:data:`VAL_FRACTION` (10%) of the tokens is the validation split.

Different Python versions ship different standard libraries, so the corpus (and
every loss measured on it) depends on the version: its SHA-256 is recorded with
each run, and a changed corpus shows up as a changed hash. On Colab (a different
Python) the hash, and the losses, differ from the book's. Any other text file
works too (``--corpus PATH``); nothing is ever downloaded here.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

__all__ = [
    "STDLIB_EXCLUDED_DIRS",
    "DEFAULT_MAX_BYTES",
    "VAL_FRACTION",
    "VOCAB_SIZE",
    "Corpus",
    "stdlib_files",
    "stdlib_corpus",
    "text_corpus",
    "load_corpus",
    "split_tokens",
    "TokenWindows",
]

STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")
DEFAULT_MAX_BYTES = 8 * 1024 * 1024  # 8 MiB
VAL_FRACTION = 0.1
VOCAB_SIZE = 256  # byte tokens
FILE_HEADER = "# ==== {path} ====\n"


@dataclass(frozen=True)
class Corpus:
    """A byte corpus and where it came from.

    Attributes
    ----------
    data:
        The raw bytes.
    name:
        ``"python-stdlib-3.11"`` or the file name.
    source:
        The directory or file it was read from.
    n_files:
        Number of source files concatenated.
    sha256:
        Hex SHA-256 of ``data``: two corpora with equal hashes are the same bytes.
    """

    data: bytes
    name: str
    source: str
    n_files: int
    sha256: str

    def __len__(self) -> int:
        return len(self.data)

    def tokens(self) -> torch.Tensor:
        """The bytes as a uint8 tensor of shape ``(len(self),)``."""
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8)

    def info(self) -> dict:
        """Name, source, size, file count and hash, for run metadata."""
        return {"name": self.name, "source": self.source, "bytes": len(self.data), "n_files": self.n_files,
                "sha256": self.sha256}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stdlib_files(root: Optional[str] = None) -> List[Path]:
    """The standard library's ``.py`` files in corpus order (sorted relative paths).

    ``root`` defaults to ``sysconfig.get_paths()["stdlib"]``.
    """
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root_path):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        for f in filenames:
            if f.endswith(".py"):
                files.append(Path(dirpath, f))
    return sorted(files, key=lambda p: p.relative_to(root_path).as_posix())


@functools.lru_cache(maxsize=4)
def stdlib_corpus(max_bytes: Optional[int] = DEFAULT_MAX_BYTES) -> Corpus:
    """The default corpus: the standard library's source, concatenated (see the module docs).

    ``max_bytes``: cut the concatenation there (``None``: keep everything).

    Examples
    --------
    >>> c = stdlib_corpus(4096)
    >>> len(c), c.data.startswith(b"# ==== ")
    (4096, True)
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size, n_files = [], 0, 0
    for path in stdlib_files(str(root)):
        chunk = FILE_HEADER.format(path=path.relative_to(root).as_posix()).encode() + path.read_bytes() + b"\n"
        parts.append(chunk)
        size += len(chunk)
        n_files += 1
        if max_bytes is not None and size >= max_bytes:
            break
    data = b"".join(parts)
    if max_bytes is not None:
        data = data[:max_bytes]
    version = "{}.{}".format(*__import__("sys").version_info[:2])
    return Corpus(data=data, name=f"python-stdlib-{version}", source=str(root), n_files=n_files, sha256=_sha256(data))


def text_corpus(path: str, max_bytes: Optional[int] = None) -> Corpus:
    """Any file read as bytes (e.g. a downloaded book), optionally cut at ``max_bytes``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"corpus path {str(path)!r} is not a file")
    data = p.read_bytes()
    if max_bytes is not None:
        data = data[:max_bytes]
    return Corpus(data=data, name=p.name, source=str(p.resolve()), n_files=1, sha256=_sha256(data))


def load_corpus(path: Optional[str] = None, max_bytes: Optional[int] = DEFAULT_MAX_BYTES) -> Corpus:
    """The standard-library corpus (``path=None``) or a text file."""
    return stdlib_corpus(max_bytes) if path is None else text_corpus(path, max_bytes)


def split_tokens(tokens: torch.Tensor, val_fraction: float = VAL_FRACTION) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split 1-D tokens into (train, validation): the validation split is the last ``val_fraction``.

    Examples
    --------
    >>> import torch
    >>> train, val = split_tokens(torch.arange(100))
    >>> len(train), len(val), int(val[0])
    (90, 10, 90)
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    n_val = int(round(len(tokens) * val_fraction))
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


class TokenWindows:
    """Random windows of ``block_size + 1`` tokens from a 1-D token tensor.

    ``sample(batch_size, generator)`` returns ``(x, y)``, both int64 of shape
    ``(batch_size, block_size)``, with ``y`` the next token after each ``x``
    position. Start offsets are drawn uniformly with the given ``torch.Generator``,
    so a saved generator state replays the same batches.

    Examples
    --------
    >>> import torch
    >>> w = TokenWindows(torch.arange(50), block_size=4)
    >>> x, y = w.sample(2, torch.Generator().manual_seed(0))
    >>> x.shape, bool((y - x == 1).all())
    (torch.Size([2, 4]), True)
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, name: str = "tokens"):
        if tokens.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(tokens.shape)}")
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"{name} has {len(tokens)} tokens; at least block_size + 1 = {block_size + 1} are needed "
                "for one training window"
            )
        self.tokens = tokens
        self.block_size = block_size
        self._offsets = torch.arange(block_size + 1)

    def __len__(self) -> int:
        return len(self.tokens)

    def sample(self, batch_size: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.tokens) - self.block_size, (batch_size,), generator=generator)
        windows = self.tokens[starts.unsqueeze(1) + self._offsets].long()  # (B, T + 1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
