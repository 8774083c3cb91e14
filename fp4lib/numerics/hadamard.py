"""Orthonormal block Hadamard transforms, optionally with random signs.

Used to spread outliers across a block before quantization (chapter 4; the NVFP4
recipe applies a random 16x16 Hadamard to the Wgrad inputs). For block size ``b``
the transform of each block ``v`` (a row vector) is ``v @ (diag(s) H_b / sqrt(b))``
with ``H_b`` the Sylvester Hadamard matrix and ``s`` a vector of +-1 signs; the
inverse is ``y @ (H_b diag(s) / sqrt(b))``, since the matrix is orthogonal.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .rounding import cheap_uniform
from .schemes import HADAMARD_SIZES

__all__ = ["hadamard_matrix", "random_signs", "block_hadamard", "inverse_block_hadamard",
           "hadamard_signs", "hadamard_along"]



def _check_size(block_size: int) -> None:
    if block_size not in HADAMARD_SIZES:
        raise ValueError(f"block_size must be one of {HADAMARD_SIZES}, got {block_size!r}")


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(block_size: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix ``H / sqrt(block_size)``.

    Examples
    --------
    >>> hadamard_matrix(16).shape
    torch.Size([16, 16])
    >>> import torch
    >>> bool(torch.allclose(hadamard_matrix(16) @ hadamard_matrix(16).T, torch.eye(16), atol=1e-6))
    True
    """
    return _cached_matrix(block_size, dtype, device).clone()


def _cached_matrix(block_size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """:func:`hadamard_matrix`, made once per (size, dtype, device) and shared: callers must not modify it."""
    _check_size(block_size)
    return _matrix_on(block_size, dtype, torch.device("cpu" if device is None else device))


@functools.lru_cache(maxsize=None)
def _matrix_on(block_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Always computed on the CPU in float32 (the same bits for every device), then cast and moved once.
    return (_sylvester(block_size) / block_size**0.5).to(dtype=dtype, device=device)


def random_signs(block_size: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """A float32 vector of ``block_size`` random +-1 signs drawn from ``generator``.

    Examples
    --------
    >>> import torch
    >>> random_signs(16, torch.Generator().manual_seed(0)).abs().sum().item()
    16.0
    """
    _check_size(block_size)
    bits = torch.randint(0, 2, (block_size,), generator=generator, device=device)
    return (bits * 2 - 1).to(torch.float32)


def _check_tensor(x) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        got = x.dtype if torch.is_tensor(x) else type(x).__name__
        raise TypeError(f"x must be a floating-point torch.Tensor, got {got}")


def _transform_matrix(block_size, signs, dtype, device, inverse):
    h = _cached_matrix(block_size, dtype, device)
    if signs is None:
        return h
    if signs.shape != (block_size,):
        raise ValueError(f"signs must have shape ({block_size},), got {tuple(signs.shape)}")
    s = signs.to(dtype=dtype, device=device)
    return h * s.unsqueeze(0) if inverse else s.unsqueeze(1) * h


def _apply(x: torch.Tensor, block_size: int, m: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] % block_size:
        raise ValueError(f"the last axis of x must be a multiple of block_size={block_size}, got shape {tuple(x.shape)}")
    shape = x.shape
    y = x.reshape(*shape[:-1], shape[-1] // block_size, block_size) @ m
    return y.reshape(shape)


def block_hadamard(x: torch.Tensor, block_size: int = 16, signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Apply the (signed) orthonormal Hadamard transform to each block of the last axis.

    ``x``: floating tensor whose last axis is a multiple of ``block_size`` (16 to
    128, a power of two). ``signs``: optional (block_size,) +-1 vector from
    :func:`random_signs`. Returns a tensor of ``x``'s shape and dtype.

    Examples
    --------
    >>> import torch
    >>> block_hadamard(torch.tensor([4.0] + [0.0] * 15)).unique().tolist()
    [1.0]
    """
    _check_size(block_size)
    _check_tensor(x)
    return _apply(x, block_size, _transform_matrix(block_size, signs, x.dtype, x.device, inverse=False))


def inverse_block_hadamard(y: torch.Tensor, block_size: int = 16, signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Undo :func:`block_hadamard` with the same ``block_size`` and ``signs``.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(4, 32)
    >>> s = random_signs(16, torch.Generator().manual_seed(1))
    >>> bool(torch.allclose(inverse_block_hadamard(block_hadamard(x, 16, s), 16, s), x, atol=1e-6))
    True
    """
    _check_size(block_size)
    _check_tensor(y)
    return _apply(y, block_size, _transform_matrix(block_size, signs, y.dtype, y.device, inverse=True))


def hadamard_signs(block_size: int, seed: int, device=None) -> torch.Tensor:
    """A float32 vector of ``block_size`` +-1 signs from a hash of ``seed`` (no RNG state).

    Examples
    --------
    >>> hadamard_signs(16, 3).abs().sum().item()
    16.0
    """
    u = cheap_uniform((block_size,), seed, device=device)
    return torch.where(u < 0.5, -1.0, 1.0)


def hadamard_along(x: torch.Tensor, axis: int, block_size: int, signs: torch.Tensor) -> torch.Tensor:
    """Apply :func:`fp4lib.numerics.hadamard.block_hadamard` to blocks along ``axis`` (0 or 1) of a 2-D tensor.

    ``x``: float32 ``(rows, cols)``; the transformed axis must be a multiple of
    ``block_size``. Along axis 1 this is ``block_hadamard(x, block_size, signs)``;
    along axis 0 it equals ``block_hadamard(x.T, ...).T`` without the transposed
    copies. Applying it to both operands of a GEMM along the reduction axis, with
    the same signs, leaves the product unchanged (the matrix is orthogonal).

    Examples
    --------
    >>> import torch
    >>> a, b = torch.randn(32, 8), torch.randn(32, 4)
    >>> s = hadamard_signs(16, 0)
    >>> ha, hb = hadamard_along(a, 0, 16, s), hadamard_along(b, 0, 16, s)
    >>> bool(torch.allclose(ha.T @ hb, a.T @ b, atol=1e-5))
    True
    """
    if axis == 1:
        return block_hadamard(x, block_size, signs)
    rows, cols = x.shape
    if rows % block_size:
        raise ValueError(f"axis 0 of x (size {rows}) must be a multiple of the Hadamard block size {block_size}")
    # Row-vector transform v -> v @ M with M = diag(signs) H / sqrt(b), applied to
    # each column block: M^T @ block.
    m = signs.to(x.dtype).unsqueeze(1) * _cached_matrix(block_size, x.dtype, x.device)
    return torch.matmul(m.t(), x.view(rows // block_size, block_size, cols)).view(rows, cols)
