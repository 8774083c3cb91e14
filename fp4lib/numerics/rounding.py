"""Rounding onto a grid of representable values, and the random draws of stochastic rounding.

Chapter 1 of the book introduces both modes; chapter 4 shows why gradients need the
stochastic one. The format-specific tie rules (ties to even for E2M1, ties to the
lower value for bitsandbytes' tables) live in :mod:`fp4lib.numerics.formats`.

Stochastic rounding draws its uniforms either from a ``torch.Generator``
(:meth:`fp4lib.numerics.formats.ElementFormat.encode`) or, inside training, from
:func:`hash_uniform`: a counter-based hash of the element index and a seed, which
needs no generator state, can be recomputed anywhere, and fuses into a compiled
kernel. :func:`cheap_uniform` lays those draws out for a whole tensor.
"""

from __future__ import annotations

from typing import Optional

import torch

from .schemes import ROUNDING_MODES

__all__ = ["check_rounding", "stochastic_round_index", "seed_term", "hash_uniform",
           "cheap_uniform"]


# The "lowbias32" integer hash finaliser; the top 24 bits of the hash become the float.
_GOLDEN = 0x9E3779B1  # multiplies the element index
_SEED_MUL = 0x85EBCA77  # multiplies the seed
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B
_MASK32 = 0xFFFFFFFF
_U24 = 2.0**-24
MAX_HASH_INDEX = 2**31  # element indices are int32


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


def _wrap32(c: int) -> int:
    """A 32-bit constant as the int32 with the same bits."""
    c &= _MASK32
    return c - (1 << 32) if c >= (1 << 31) else c


def seed_term(seed: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The seed's share of the hash, ``seed * 0x85EBCA77 mod 2**32``, as an int32 0-d tensor on ``device``.

    Computed once per call in Python, so that a compiled kernel is not
    re-specialised for every step's seed and needs no 64-bit multiplies. Made
    on ``device`` by a fill (``torch.full``), not copied there from the host: a
    GPU step calls this for every operand, and a host-to-device copy each time
    would cost more than the quantization it seeds.
    """
    return torch.full((), _wrap32(int(seed) * _SEED_MUL), dtype=torch.int32, device=device)


def hash_uniform(index: torch.Tensor, seed_t: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 draws for int32 element indices.

    ``index``: int32 tensor of element indices (any shape, values below 2**31);
    ``seed_t``: :func:`seed_term` of the seed. The draw for element ``i`` depends
    only on ``(seed, i)``: a 32-bit xorshift-multiply finaliser in wrapping int32
    arithmetic (logical shifts written as arithmetic shifts plus masks), which
    vectorizes without 64-bit multiplies and fuses into the kernel that uses it.

    Examples
    --------
    >>> import torch
    >>> u = hash_uniform(torch.arange(4, dtype=torch.int32), seed_term(5))
    >>> bool(((u >= 0) & (u < 1)).all()), torch.equal(u, hash_uniform(torch.arange(4, dtype=torch.int32), seed_term(5)))
    (True, True)
    """
    # The multiplier is a run-time tensor: a constant would be folded into a compiled kernel's
    # index arithmetic, whose products overflow Triton's int32 constants on a GPU.
    golden = (seed_t & 0) + _wrap32(_GOLDEN)
    h = index * golden + seed_t
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _wrap32(_MUL1)
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _wrap32(_MUL2)
    h = h ^ ((h >> 16) & 0xFFFF)
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * _U24


def cheap_uniform(shape, seed: int, device: Optional[torch.device] = None, offset: int = 0) -> torch.Tensor:
    """:func:`hash_uniform` draws for a whole tensor: element ``i`` (row-major) gets index ``offset + i``.

    A deterministic alternative to ``torch.rand`` for stochastic rounding inside
    training (no generator state). ``offset + numel`` must stay below 2**31.

    Examples
    --------
    >>> u = cheap_uniform((2, 3), seed=7)
    >>> u.shape, bool(((u >= 0) & (u < 1)).all()), torch.equal(u, cheap_uniform((2, 3), seed=7))
    (torch.Size([2, 3]), True, True)
    """
    n = 1
    for s in shape:
        n *= int(s)
    if not (0 <= offset and offset + n < MAX_HASH_INDEX):
        raise ValueError(f"offset + numel = {offset + n} must lie in [0, 2**31): the hash indexes elements with int32")
    idx = torch.arange(offset, offset + n, device=device, dtype=torch.int32)
    return hash_uniform(idx, seed_term(seed, idx.device)).reshape(tuple(shape))
