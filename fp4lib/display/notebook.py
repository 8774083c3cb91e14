"""What the book's chapters need from a notebook kernel, wherever they run.

A chapter runs in Jupyter, in VS Code, on Colab, or in the book's build, and only the
build has Jupyter Book. This module keeps the chapters' code the same in all of them:

* :func:`glue` stores a value for the book's text. It is ``myst_nb.glue`` when myst-nb
  is installed; elsewhere it writes the very same output (a display that no front end
  shows), so a chapter runs, and its stored outputs compare, with or without myst-nb.
* :class:`Progress` is a progress bar for long cells. It draws into one display that
  it updates in place and empties when it closes, so it is visible while a cell runs
  and leaves no trace in the outputs stored with the notebook. Outside a kernel it is
  an ordinary ``tqdm`` bar on stderr.
* :func:`run_watched` runs a command (e.g. ``torchrun``) while a callable reports how
  far it got, for the bar.

:func:`colab_edition_path` names a chapter's Colab edition (``book/colab/``), which the
book's Colab buttons open.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

__all__ = ["glue", "Progress", "run_watched", "in_kernel", "colab_edition_path"]

#: Prefix of the MIME types under which myst-nb stores a glued value without showing it.
GLUE_PREFIX = "application/papermill.record/"


def in_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (a notebook, Colab, VS Code)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def glue(name: str, value: Any, display: bool = True) -> None:
    """Store ``value`` under ``name`` for the book's text (``{glue:text}`` roles).

    ``myst_nb.glue`` when myst-nb is installed. Without it, the same display output
    is written: under MIME types no front end shows when ``display`` is False, the
    value itself when it is True. Outside a kernel it does nothing.
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        myst_glue = None
    if myst_glue is not None:
        myst_glue(name, value, display=display)
        return
    if not in_kernel():
        return
    from IPython.core.formatters import format_display_data
    from IPython.display import display as ipy_display

    bundle, metadata = format_display_data(value)
    prefix = "" if display else GLUE_PREFIX
    metadata["scrapbook"] = dict(name=name, mime_prefix=prefix)
    ipy_display({prefix + k: v for k, v in bundle.items()}, raw=True, metadata=metadata)


class Progress:
    """A progress bar for a notebook cell that leaves no output behind.

    >>> with Progress(3, "steps", enabled=False) as bar:
    ...     for _ in range(3):
    ...         bar.update(1, loss=2.5)
    >>> bar.n
    3

    In a kernel it shows ``tqdm``'s text bar in a display that is updated in place (at
    most every ``interval`` seconds) and emptied by :meth:`close`; outside one it is a
    ``tqdm`` bar on stderr that clears itself. ``enabled=False`` shows nothing.
    """

    def __init__(self, total: int, desc: str = "", *, enabled: bool = True, interval: float = 0.5):
        self.total, self.desc, self.n = int(total), desc, 0
        self.postfix: dict = {}
        self.interval = interval
        self._start = time.perf_counter()
        self._drawn = 0.0
        self._handle = self._tqdm = None
        if not enabled:
            return
        if in_kernel():
            from IPython.display import display

            self._handle = display({}, raw=True, display_id=True)
        else:
            from tqdm import tqdm

            self._tqdm = tqdm(total=self.total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._tqdm is not None:
            self._tqdm.set_description(desc, refresh=False)
        self._draw()

    def update(self, n: int = 1, **postfix) -> None:
        """Advance by ``n``; keyword arguments are shown after the bar (e.g. ``loss=2.31``)."""
        self.update_to(self.n + n, **postfix)

    def update_to(self, n: int, **postfix) -> None:
        """Set the count to ``n`` (e.g. the steps a run has logged so far)."""
        step, self.n = n - self.n, n
        self.postfix.update(postfix)
        if self._tqdm is not None:
            self._tqdm.set_postfix(self.postfix, refresh=False)
            self._tqdm.update(step)
        self._draw()

    def trainer_hook(self, offset: int = 0) -> Callable:
        """A :class:`~fp4lib.training.loop.Trainer` hook: before step ``s`` the bar shows
        ``offset + s - 1`` steps done and the last training loss. It only reads the
        trainer, so the run is the same with or without it."""

        def hook(trainer, step):
            losses = trainer.train_losses
            self.update_to(offset + step - 1, **({"loss": f"{losses[-1]:.4f}"} if losses else {}))

        return hook

    def _draw(self, force: bool = False) -> None:
        if self._handle is None:
            return
        now = time.perf_counter()
        if not force and now - self._drawn < self.interval:
            return
        self._drawn = now
        from tqdm import tqdm

        postfix = ", ".join(f"{k}={v}" for k, v in self.postfix.items()) or None
        line = tqdm.format_meter(self.n, self.total, now - self._start, ncols=100, prefix=self.desc, postfix=postfix)
        self._handle.update({"text/plain": line}, raw=True)

    def close(self) -> None:
        """Remove the bar: the display is emptied, the stderr bar cleared."""
        if self._handle is not None:
            self._handle.update({}, raw=True)
            self._handle = None
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None


def run_watched(cmd: Sequence[str], progress: Optional[Callable[[], None]] = None, *, poll: float = 0.5,
                **popen) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **popen)``, calling
    ``progress()`` every ``poll`` seconds while the command runs.

    >>> run_watched([sys.executable, "-c", "print(6 * 7)"]).stdout
    '42\\n'
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=poll)
            break
        except subprocess.TimeoutExpired:
            if progress is not None:
                progress()
    return subprocess.CompletedProcess(list(cmd), proc.returncode, stdout, stderr)


# ----------------------------------------------------------------------------
# The book's build: Colab buttons open the chapters' Colab editions
# ----------------------------------------------------------------------------
COLAB_EDITIONS = "colab"  # folder of the Colab editions, next to the chapters


def colab_edition_path(path: str) -> str:
    """Repository path of a chapter's Colab edition: ``book/01_x.ipynb`` -> ``book/colab/01_x.ipynb``.

    >>> colab_edition_path("book/01_fp4_bit_layout.ipynb")
    'book/colab/01_fp4_bit_layout.ipynb'
    """
    folder, _, name = path.rpartition("/")
    return f"{folder}/{COLAB_EDITIONS}/{name}" if folder else f"{COLAB_EDITIONS}/{name}"
