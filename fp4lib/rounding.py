"""Rounding onto a grid of representable values: round-to-nearest and stochastic.

Chapter 1 of the book introduces both modes; chapter 4 shows why gradients need the
stochastic one. The format-specific tie rules (ties to even for E2M1, ties to the
lower value for bitsandbytes' tables) live in :mod:`fp4lib.formats`.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["ROUNDING_MODES", "check_rounding", "stochastic_round_index", "cheap_uniform"]

ROUNDING_MODES = ("nearest", "stochastic")


def check_rounding(rounding: str) -> None:
    """Raise ``ValueError`` unless ``rounding`` is one of :data:`ROUNDING_MODES`."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")


def stochastic_round_index(x: torch.Tensor, grid: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index into the sorted ``grid`` after stochastic rounding of ``x``.

    ``x`` is clamped to ``[grid[0], grid[-1]]``. A value between ``grid[i]`` and
    ``grid[i+1]`` goes up with probability ``(x - grid[i]) / (grid[i+1] - grid[i])``,
    decided by the uniform draws ``u`` in [0, 1) (same shape as ``x``); a value on a
    grid point stays there. The expected rounded value therefore equals ``x``.

    Returns an int64 index tensor of ``x``'s shape.

    Examples
    --------
    >>> import torch
    >>> grid = torch.tensor([0.0, 1.0, 2.0])
    >>> stochastic_round_index(torch.tensor([0.25, 0.25, 2.0]), grid, torch.tensor([0.1, 0.3, 0.9])).tolist()
    [1, 0, 2]
    """
    x = x.clamp(float(grid[0]), float(grid[-1]))
    lo_idx = (torch.bucketize(x, grid, right=True) - 1).clamp(0, grid.numel() - 2)
    lo = grid[lo_idx]
    hi = grid[lo_idx + 1]
    p_up = (x - lo) / (hi - lo)
    return lo_idx + (u < p_up).to(lo_idx.dtype)


def cheap_uniform(shape, seed: int, device: Optional[torch.device] = None, offset: int = 0) -> torch.Tensor:
    """Uniform [0, 1) float32 draws from a counter-based integer hash.

    A deterministic alternative to ``torch.rand`` for stochastic rounding inside
    training: the draw for element ``i`` depends only on ``(seed, offset + i)``, so
    it needs no generator state and can be recomputed anywhere. The hash is a
    32-bit xorshift-multiply finaliser (the "lowbias32" constants); the top 24 bits
    become the float.

    Examples
    --------
    >>> u = cheap_uniform((2, 3), seed=7)
    >>> u.shape, bool(((u >= 0) & (u < 1)).all()), torch.equal(u, cheap_uniform((2, 3), seed=7))
    (torch.Size([2, 3]), True, True)
    """
    n = 1
    for s in shape:
        n *= int(s)
    idx = torch.arange(offset, offset + n, device=device, dtype=torch.int64)
    h = (idx * 0x9E3779B1 + seed * 0x85EBCA77) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return ((h >> 8).to(torch.float32) * (1.0 / (1 << 24))).reshape(tuple(shape))
