"""Bridge to bitsandbytes: convert QuantizedTensor <-> (packed, QuantState), and run
bitsandbytes' own 4-bit quantize/dequantize on the tensor's device.

bitsandbytes is imported lazily (``import fp4lib`` does not need it) and its
harmless CPU start-up message ("Failed to load CPU gemm_4bit_forward from
kernels-community") is silenced, as is torch's CUDA_HOME notice when its compiles run
in a CUDA build of torch on a machine without a GPU. Chapter 2 of the book uses this module.

The seed tutorial's ``bnb.quantize_fp4`` does not exist: the functions live in
``bitsandbytes.functional`` (``quantize_4bit(x, quant_type="fp4")`` or
``quantize_fp4``).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Tuple

import torch

from ..numerics.compiling import _quiet_cuda_notice
from ..numerics.constants import BNB_NESTED_BLOCK_SIZE
from ..numerics.tensor import NestedAbsmax, QuantizedTensor

__all__ = ["import_bitsandbytes", "to_bnb", "from_bnb", "bnb_quantize", "bnb_dequantize", "bnb_cpu_decode_at_risk"]

_QUANT_TYPE = {"bnb_fp4": "fp4", "nf4": "nf4"}
_SCHEME = {"fp4": "bnb_fp4", "nf4": "nf4"}


def import_bitsandbytes():
    """Import ``bitsandbytes.functional`` with its start-up log messages silenced.

    Also drops the CUDA_HOME notice that a CUDA build of torch logs on a machine without
    a GPU when bitsandbytes' CPU functions compile their kernels (``dequantize_4bit`` of
    a tensor that does not fill its blocks, for one), as fp4lib's own compiles do.

    Raises ``ImportError`` with an install hint when bitsandbytes is missing.
    """
    _quiet_cuda_notice()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as F
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("this needs bitsandbytes: pip install bitsandbytes") from e
    return F


def to_bnb(q: QuantizedTensor):
    """Return bitsandbytes' ``(packed, QuantState)`` for a ``bnb_fp4``/``nf4`` tensor.

    The packed bytes are shared, not copied; ``F.dequantize_4bit(*to_bnb(q))``
    decodes it with bitsandbytes.

    Examples
    --------
    >>> import torch
    >>> from fp4lib import quantize
    >>> q = quantize(torch.randn(3, 64), "nf4")
    >>> packed, state = to_bnb(q)
    >>> state.quant_type, state.blocksize, tuple(state.shape), packed.shape
    ('nf4', 64, (3, 64), torch.Size([96, 1]))
    >>> torch.equal(import_bitsandbytes().dequantize_4bit(packed, state), q.dequantize())
    True
    """
    if q.scheme not in _QUANT_TYPE:
        raise ValueError(f"only 'bnb_fp4' and 'nf4' tensors have a bitsandbytes form, got scheme {q.scheme!r}")
    F = import_bitsandbytes()
    quant_type = _QUANT_TYPE[q.scheme]
    code = F.get_4bit_type(quant_type, device=q.packed.device)
    if q.nested is not None:
        state2 = F.QuantState(
            absmax=q.nested.absmax2, code=q.nested.code, blocksize=q.nested.block_size, dtype=torch.float32
        )
        state = F.QuantState(
            absmax=q.nested.codes, shape=q.shape, dtype=q.dtype, blocksize=q.block_size, code=code,
            quant_type=quant_type, offset=q.nested.offset, state2=state2,
        )
    else:
        state = F.QuantState(
            absmax=q.scale, shape=q.shape, dtype=q.dtype, blocksize=q.block_size, code=code, quant_type=quant_type
        )
    return q.packed, state


def from_bnb(packed: torch.Tensor, state) -> QuantizedTensor:
    """Wrap bitsandbytes' ``(packed, QuantState)`` as a :class:`QuantizedTensor`.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(50)
    >>> q = from_bnb(*bnb_quantize(x, "fp4", 64))
    >>> q.scheme, q.shape, q.bits_per_element
    ('bnb_fp4', torch.Size([50]), 4.64)
    """
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    scheme = _SCHEME.get(state.quant_type)
    if scheme is None:
        raise ValueError(f"QuantState.quant_type must be 'fp4' or 'nf4', got {state.quant_type!r}")
    n = 1
    for s in state.shape:
        n *= int(s)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes; shape {tuple(state.shape)} needs {(n + 1) // 2}")
    nested = None
    if state.nested:
        nested = NestedAbsmax(
            codes=state.absmax, absmax2=state.state2.absmax, code=state.state2.code,
            offset=torch.as_tensor(state.offset, dtype=torch.float32), block_size=state.state2.blocksize,
        )
        if nested.block_size != BNB_NESTED_BLOCK_SIZE:
            raise ValueError(f"nested block size {nested.block_size} is not bitsandbytes' {BNB_NESTED_BLOCK_SIZE}")
    return QuantizedTensor(
        packed=packed.reshape(-1, 1), scale=state.absmax, shape=state.shape, dtype=state.dtype,
        scheme=scheme, block_size=state.blocksize, nested=nested,
    )


def bnb_quantize(x: torch.Tensor, quant_type: str = "fp4", block_size: int = 64, double_quant: bool = False):
    """Run ``bitsandbytes.functional.quantize_4bit`` on ``x``'s device.

    Returns bitsandbytes' ``(packed, QuantState)``: its CUDA kernel on a GPU, its
    CPU code otherwise.

    Examples
    --------
    >>> import torch
    >>> from fp4lib import quantize
    >>> x = torch.randn(4, 100)
    >>> packed, state = bnb_quantize(x, "fp4", 64)
    >>> torch.equal(packed, quantize(x, "bnb_fp4").packed)
    True
    """
    if quant_type not in _SCHEME:
        raise ValueError(f"quant_type must be 'fp4' or 'nf4', got {quant_type!r}")
    F = import_bitsandbytes()
    return F.quantize_4bit(x, blocksize=block_size, compress_statistics=double_quant, quant_type=quant_type)


def bnb_cpu_decode_at_risk(shape, block_size: int) -> bool:
    """True for the shapes bitsandbytes 0.50.2's CPU decode gets wrong on AVX-512 CPUs.

    A tensor with more than one row whose last dimension is a multiple of 16 but not
    of ``block_size``: its AVX-512 ``dequantize_4bit`` multiplies some elements by
    another block's absmax, without an error (chapter 2). :func:`bnb_dequantize`
    never asks bitsandbytes for such a shape.

    Examples
    --------
    >>> bnb_cpu_decode_at_risk((3, 48), 64), bnb_cpu_decode_at_risk((3, 64), 64), bnb_cpu_decode_at_risk((144,), 64)
    (True, False, False)
    """
    shape = tuple(int(s) for s in shape)
    return len(shape) > 1 and math.prod(shape[:-1]) > 1 and shape[-1] % 16 == 0 and shape[-1] % block_size != 0


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """Run ``bitsandbytes.functional.dequantize_4bit``, correct on every shape.

    bitsandbytes 0.50.2's CPU (AVX-512) dequantize returns wrong values for
    multi-row tensors whose last axis is a multiple of 16 but not of the block
    size, e.g. (3, 48) at block size 64. On CPU this decodes the flattened tensor
    (which that kernel gets right) and restores the shape.

    Examples
    --------
    >>> import torch
    >>> from fp4lib import quantize
    >>> x = torch.randn(3, 48)
    >>> torch.equal(bnb_dequantize(*bnb_quantize(x, "fp4", 64)), quantize(x, "bnb_fp4").dequantize())
    True
    """
    F = import_bitsandbytes()
    if packed.device.type != "cpu":
        return F.dequantize_4bit(packed, state)
    flat_state = copy.copy(state)
    n = 1
    for s in state.shape:
        n *= int(s)
    flat_state.shape = torch.Size([n])
    return F.dequantize_4bit(packed, flat_state).reshape(state.shape)


def bnb_roundtrip(x: torch.Tensor, quant_type: str = "fp4", block_size: int = 64) -> Tuple[torch.Tensor, object, torch.Tensor]:
    """``(packed, state, dequantized)`` from bitsandbytes, with the shape-safe decode.

    Examples
    --------
    >>> import torch
    >>> packed, state, x_dq = bnb_roundtrip(torch.randn(50) * 0.5)
    >>> packed.shape, x_dq.shape, state.blocksize
    (torch.Size([25, 1]), torch.Size([50]), 64)
    """
    packed, state = bnb_quantize(x, quant_type, block_size)
    return packed, state, bnb_dequantize(packed, state)
