"""Curves and colours for the stored training study (chapter 5 of the book).

The study's result records (:func:`fp4lib.experiments.load_results`) hold, per
run, the training loss of every step and the validation loss every few steps.
These helpers pick out the runs of one recipe, average their curves over seeds,
and give every recipe the same colour in every figure (the four main recipes use
their format's colour from :data:`fp4lib.plotting.FORMAT_COLORS`).

A record, as far as these helpers read it::

    {"definition": {"recipe": "nvfp4", "seed": 0, "steps": 400, "study": "main", ...},
     "train_losses": [5.31, 5.02, ...],          # one per step, step 1 first
     "val_losses": [[50, 2.72], [100, 2.50], ...],  # (step, loss) pairs
     ...}
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .plotting import BOOK_COLORS, FORMAT_COLORS

__all__ = ["RECIPE_COLORS", "recipe_color", "moving_average", "runs_of", "train_curve_stats", "val_curve_stats"]

RECIPE_COLORS: Dict[str, str] = {
    "bf16": FORMAT_COLORS["bf16"],
    "fp4_naive": FORMAT_COLORS["e2m1"],
    "mxfp4": FORMAT_COLORS["mxfp4"],
    "nvfp4": FORMAT_COLORS["nvfp4"],
    "nvfp4_all_fp4": BOOK_COLORS["vermillion"],
    "nvfp4_no_sr": BOOK_COLORS["sky"],
    "nvfp4_no_rht": BOOK_COLORS["green"],
    "nvfp4_no_tiles": BOOK_COLORS["black"],
    "nvfp4_fwd_only": BOOK_COLORS["blue"],
    "nvfp4_bwd_only": BOOK_COLORS["green"],
    "nvfp4_hp_final": BOOK_COLORS["sky"],
}
"""The colour of each preset recipe in chapter 5's figures."""


def recipe_color(recipe: str) -> str:
    """The colour (hex string) of a preset recipe in the book's figures.

    Examples
    --------
    >>> recipe_color("nvfp4") == FORMAT_COLORS["nvfp4"]
    True
    """
    try:
        return RECIPE_COLORS[recipe]
    except KeyError:
        raise ValueError(f"recipe must be one of {tuple(RECIPE_COLORS)}, got {recipe!r}") from None


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """Trailing mean over ``window`` values; the first ``window - 1`` average what precedes them.

    Same length as ``values``.

    Examples
    --------
    >>> moving_average([1.0, 2.0, 3.0, 4.0], 2)
    [1.0, 1.5, 2.5, 3.5]
    """
    if not isinstance(window, int) or window <= 0:
        raise ValueError(f"window must be a positive int, got {window!r}")
    x = torch.tensor(list(values), dtype=torch.float64)
    if x.numel() == 0:
        return []
    c = torch.cat([torch.zeros(1, dtype=torch.float64), x.cumsum(0)])
    idx = torch.arange(1, x.numel() + 1)
    lo = (idx - window).clamp(min=0)
    return ((c[idx] - c[lo]) / (idx - lo)).tolist()


def runs_of(results: Dict[str, dict], recipe: str, study: str = "main", steps: Optional[int] = None) -> List[dict]:
    """The records of ``recipe`` in ``study`` (and with ``steps`` steps, if given), sorted by seed.

    Examples
    --------
    >>> rec = {"definition": {"recipe": "bf16", "seed": 1, "steps": 4, "study": "main"}}
    >>> [r["definition"]["seed"] for r in runs_of({"a": rec}, "bf16")]
    [1]
    """
    found = [r for r in results.values()
             if r["definition"]["recipe"] == recipe and r["definition"]["study"] == study
             and (steps is None or r["definition"]["steps"] == steps)]
    return sorted(found, key=lambda r: r["definition"]["seed"])


def _stats(rows: torch.Tensor) -> Tuple[List[float], List[float], List[float]]:
    return rows.mean(0).tolist(), rows.min(0).values.tolist(), rows.max(0).values.tolist()


def train_curve_stats(records: Sequence[dict], window: int = 1) -> Tuple[List[int], List[float], List[float], List[float]]:
    """Steps, and the mean, minimum and maximum over ``records`` of their smoothed training losses.

    Each record's curve is smoothed with :func:`moving_average` first. The
    records must have the same number of steps.

    Examples
    --------
    >>> recs = [{"train_losses": [3.0, 2.0]}, {"train_losses": [5.0, 4.0]}]
    >>> train_curve_stats(recs)
    ([1, 2], [4.0, 3.0], [3.0, 2.0], [5.0, 4.0])
    """
    if not records:
        raise ValueError("records is empty: no run to average")
    lengths = {len(r["train_losses"]) for r in records}
    if len(lengths) != 1:
        raise ValueError(f"records have different numbers of steps: {sorted(lengths)}")
    rows = torch.tensor([moving_average(r["train_losses"], window) for r in records], dtype=torch.float64)
    return (list(range(1, rows.shape[1] + 1)), *_stats(rows))


def val_curve_stats(records: Sequence[dict]) -> Tuple[List[int], List[float], List[float], List[float]]:
    """Evaluation steps, and the mean, minimum and maximum validation loss over ``records``.

    The records must have been evaluated at the same steps.

    Examples
    --------
    >>> recs = [{"val_losses": [[50, 2.0], [100, 1.0]]}, {"val_losses": [[50, 4.0], [100, 3.0]]}]
    >>> val_curve_stats(recs)
    ([50, 100], [3.0, 2.0], [2.0, 1.0], [4.0, 3.0])
    """
    if not records:
        raise ValueError("records is empty: no run to average")
    steps = [[int(s) for s, _ in r["val_losses"]] for r in records]
    if any(s != steps[0] for s in steps):
        raise ValueError("records were evaluated at different steps")
    rows = torch.tensor([[v for _, v in r["val_losses"]] for r in records], dtype=torch.float64)
    return (steps[0], *_stats(rows))
