"""Training text: an offline corpus of bytes, split into training and validation.

The default corpus is **the source code of CPython 3.11.7's standard library**, shipped
with fp4lib (``fp4lib/corpora/``, gzip, 2.8 MB for 12.1 MB of text) under the Python
Software Foundation License (``LICENSE-python.txt`` beside it). Every interpreter,
every operating system and every Colab kernel trains on the same bytes, and loading
checks them against :data:`BUNDLED_SHA256`. It was built by :func:`stdlib_corpus`
from that interpreter:

1. every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, skipping the
   directories in :data:`STDLIB_EXCLUDED_DIRS` (installed packages, and the test
   suites, which some Linux distributions ship separately);
2. sorted by relative POSIX path;
3. each file as a header line ``# ==== <relative path> ====`` then its raw bytes
   and a newline, concatenated.

A preset reads the first ``corpus_bytes`` of it (the book's ``ci`` preset
:data:`DEFAULT_MAX_BYTES`, 8 MiB). Tokens are the bytes themselves (a vocabulary of
256). The last :data:`VAL_FRACTION` (10%) of the tokens is the validation split.

Any other text file works too (``--corpus PATH``), and :func:`stdlib_corpus` builds
the corpus from the running interpreter's own library (other Python versions give
other text). Its SHA-256 is recorded with every run; nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import gzip
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
    "BUNDLED_CORPUS",
    "BUNDLED_SHA256",
    "bundled_corpus",
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
BUNDLED_CORPUS = Path(__file__).resolve().parents[1] / "corpora" / "python-stdlib-3.11.7.txt.gz"
"""The shipped corpus: :func:`stdlib_corpus` of CPython 3.11.7 (Linux), every file, gzip-compressed."""
BUNDLED_SHA256 = "8b10e5f1e8a1308e8496e89fef79e72ec3bb41ebd0be9bb114b02ac6fc465636"
"""SHA-256 of the shipped corpus's 12,142,937 bytes (734 files). The first 8 MiB, the
``ci`` preset's cut, hash to ``e25e71053e02...``."""


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
    """The running interpreter's standard library, concatenated as the shipped corpus was (see the module docs).

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


@functools.lru_cache(maxsize=1)
def _bundled_bytes() -> bytes:
    try:
        data = gzip.decompress(BUNDLED_CORPUS.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"the shipped corpus {BUNDLED_CORPUS} is missing: reinstall fp4lib, or train on a text file "
                         "with --corpus PATH") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"the shipped corpus {BUNDLED_CORPUS} cannot be read ({e}): reinstall fp4lib") from None
    digest = _sha256(data)
    if digest != BUNDLED_SHA256:
        raise ValueError(f"the shipped corpus {BUNDLED_CORPUS} has SHA-256 {digest[:16]}..., not the expected "
                         f"{BUNDLED_SHA256[:16]}...: the file was changed or damaged; reinstall fp4lib")
    return data


def bundled_corpus(max_bytes: Optional[int] = DEFAULT_MAX_BYTES) -> Corpus:
    """The default corpus: the shipped standard-library text (see the module docs), its first ``max_bytes``.

    ``max_bytes``: where to cut (``None``: all 12.1 MB). Raises ``ValueError`` when the
    shipped file is missing or its bytes are not the expected ones.

    Examples
    --------
    >>> c = bundled_corpus()
    >>> c.name, len(c), c.n_files, c.sha256[:12]
    ('python-stdlib-3.11', 8388608, 571, 'e25e71053e02')
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes!r}")
    data = _bundled_bytes()
    if max_bytes is not None:
        data = data[:max_bytes]
    header = FILE_HEADER.split("{")[0].encode()  # b"# ==== "
    n_files = data.count(b"\n" + header) + data.startswith(header)
    return Corpus(data=data, name="python-stdlib-3.11", source=f"fp4lib/corpora/{BUNDLED_CORPUS.name}",
                  n_files=n_files, sha256=_sha256(data))


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
    """The shipped standard-library corpus (``path=None``, :func:`bundled_corpus`) or a text file."""
    return bundled_corpus(max_bytes) if path is None else text_corpus(path, max_bytes)


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
