"""Fast quantize-to-packed paths, compiled with ``torch.compile``.

:func:`fp4lib.quantize` is the plain-PyTorch reference: obviously correct, one
tensor operation at a time. Here the same arithmetic is written as one fused
pass per tensor (absmax, scale, compare-and-count against the format's midpoints,
pack), which ``torch.compile`` turns into a single loop nest. The results are
bit-identical to the reference (``tests/test_kernels.py`` checks it with
``torch.equal``); ``benchmarks/quantize.py`` measures the speed.

Only ``rounding="nearest"`` without double quantization takes the fast path;
anything else -- and any input with NaN or Inf, so that the reference raises its
detailed error -- is handed to :func:`fp4lib.quantize`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from .fast import compile_works
from .formats import BNB_FP4, NF4
from .scaling import QuantizedTensor, _check_block_size, _check_input, quantize

__all__ = ["quantize_fast", "compile_available"]

_FORMATS = {"bnb_fp4": BNB_FP4, "nf4": NF4}


def _bnb_blocks(a: torch.Tensor, mids: tuple, order: torch.Tensor):
    """a: (blocks, block_size) float32 -> (packed (blocks * block_size / 2,), absmax (blocks,))."""
    absmax = a.abs().amax(dim=-1)
    scaled = torch.clamp(a * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1), -1, 1)
    # bucketize(right=False) == number of midpoints strictly below the value.
    idx = (scaled > mids[0]).to(torch.int32)
    for m in mids[1:]:
        idx = idx + (scaled > m).to(torch.int32)
    codes = order[idx].reshape(-1, 2)
    packed = (codes[:, 0] << 4) | codes[:, 1]
    return packed, absmax


@functools.lru_cache(maxsize=None)
def _compiled_bnb():
    return torch.compile(_bnb_blocks, dynamic=True)


@functools.lru_cache(maxsize=None)
def compile_available() -> bool:
    """True when ``torch.compile`` works here (it needs a C++ compiler on CPU)."""
    return compile_works()


def quantize_fast(
    x: torch.Tensor, scheme: str, *, block_size: Optional[int] = None, compile: bool = True
) -> QuantizedTensor:
    """Bit-identical to ``fp4lib.quantize(x, scheme, block_size=...)``, faster.

    Fast path: schemes ``"bnb_fp4"`` and ``"nf4"`` with round-to-nearest. Other
    schemes go to the reference. ``compile=False`` runs the fused formulation
    eagerly (useful to check it without a compiler).

    Examples
    --------
    >>> import torch
    >>> from fp4lib import quantize
    >>> x = torch.randn(4096)
    >>> torch.equal(quantize_fast(x, "nf4", compile=False).packed, quantize(x, "nf4").packed)
    True
    """
    _check_input(x, scheme, "nearest", "raise")
    bs = _check_block_size(scheme, block_size)
    if scheme not in _FORMATS:
        return quantize(x, scheme, block_size=block_size)
    flat = x.contiguous().reshape(-1).float()
    n = flat.numel()
    full = n - n % bs
    if full == 0:
        return quantize(x, scheme, block_size=bs)
    fmt = _FORMATS[scheme]
    mids = tuple(float(m) for m in fmt._midpoints)
    order = fmt._on(flat.device, "_order")
    fn = _compiled_bnb() if compile and compile_available() else _bnb_blocks
    if compile and not compile_available():
        warnings.warn("torch.compile is unavailable here; quantize_fast runs its eager formulation")
    packed, absmax = fn(flat[:full].reshape(-1, bs), mids, order)
    if not bool(torch.isfinite(absmax).all()):
        return quantize(x, scheme, block_size=bs)  # raises the detailed non-finite error
    if full < n:
        if not bool(torch.isfinite(flat[full:]).all()):
            return quantize(x, scheme, block_size=bs)
        tail = quantize(flat[full:], scheme, block_size=bs)
        packed = torch.cat([packed, tail.packed.reshape(-1)])
        absmax = torch.cat([absmax, tail.scale])
    return QuantizedTensor(
        packed=packed.unsqueeze(1), scale=absmax, shape=x.shape, dtype=x.dtype, scheme=scheme, block_size=bs
    )
