"""Block-scaled FP4 GEMMs on fp4lib's MXFP4 and NVFP4 tensors, bytes unchanged.

* :func:`gemm_operand` -- a quantized tensor in the layout of a block-scaled FP4 GEMM
  (``torch._scaled_mm`` on Blackwell GPUs, cuBLAS): the codes as
  ``torch.float4_e2m1fn_x2`` and the scales swizzled into 128 x 4 tiles
  (:func:`swizzle_scales`).
* :func:`fp4_gemm` -- that GEMM, ``a @ b.T`` on two quantized operands, on a GPU
  that has it (compute capability 10.x or 12.x: B200, GB200, RTX 50xx), and
  :func:`block_scaled_matmul`, its emulation on any device: the E2M1 products of
  each block summed exactly, scaled by the two block scales and accumulated block
  after block in FP32, as Transformer Engine's reference GEMM does.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..numerics.constants import NVFP4_BLOCK_SIZE
from ..numerics.tensor import QuantizedTensor

__all__ = ["gemm_operand", "swizzle_scales", "unswizzle_scales", "block_scaled_matmul", "fp4_gemm",
           "fp4_gemm_available", "FP4_GEMM_CAPABILITIES"]

_SWIZZLE_ROWS, _SWIZZLE_COLS = 128, 4  # the scale tile of block-scaled GEMMs


def _ceil_to(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def swizzle_scales(scale: torch.Tensor) -> torch.Tensor:
    """Block scales ``(rows, cols)`` in the swizzled layout of block-scaled FP4 GEMMs.

    The matrix is padded to multiples of 128 rows and 4 columns and cut into 128 x 4
    tiles; each tile is stored as 32 x 16, row ``r`` of the tile going to row
    ``r % 32``, columns ``4 * (r // 32)`` to ``4 * (r // 32) + 3``; the tiles follow
    each other row-major. Returns a flat tensor of the padded size.
    """
    rows, cols = scale.shape
    r, c = _ceil_to(rows, _SWIZZLE_ROWS), _ceil_to(cols, _SWIZZLE_COLS)
    padded = torch.zeros(r, c, dtype=scale.dtype, device=scale.device)
    padded[:rows, :cols] = scale
    tiles = padded.view(r // 128, 128, c // 4, 4).permute(0, 2, 1, 3)  # (row tiles, col tiles, 128, 4)
    tiles = tiles.reshape(-1, 4, 32, 4).transpose(1, 2)  # row r -> (r // 32, r % 32) -> (r % 32, r // 32)
    return tiles.reshape(-1).contiguous()


def unswizzle_scales(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`swizzle_scales`: the ``(rows, cols)`` block scales."""
    r, c = _ceil_to(rows, _SWIZZLE_ROWS), _ceil_to(cols, _SWIZZLE_COLS)
    tiles = swizzled.reshape(-1, 32, 4, 4).transpose(1, 2).reshape(r // 128, c // 4, 128, 4)
    return tiles.permute(0, 2, 1, 3).reshape(r, c)[:rows, :cols]


def _row_block_scales(q: QuantizedTensor) -> torch.Tensor:
    """The block scales of a 2-D MXFP4/NVFP4 tensor as one scale per row and block of
    the last axis (an NVFP4 16x16 tile's scale repeated on its 16 rows), in their own dtype."""
    if q.family not in ("mx", "nv") or len(q.shape) != 2:
        raise ValueError(f"expected a 2-D MXFP4 or NVFP4 tensor, got scheme {q.scheme!r} of shape {tuple(q.shape)}")
    if q.tile:
        return q.scale.repeat_interleave(NVFP4_BLOCK_SIZE, dim=0)
    return q.scale


def gemm_operand(q: QuantizedTensor):
    """``(codes, scales)`` of a 2-D MXFP4 or NVFP4 tensor in a block-scaled FP4 GEMM's layout:
    the packed codes as ``torch.float4_e2m1fn_x2`` (rows, cols / 2), the block scales
    swizzled (:func:`swizzle_scales`). NVFP4's per-tensor scale stays outside, as the
    GEMM's output scale (``alpha``). An NVFP4 weight quantized in 16x16 tiles passes
    each tile's scale to all 16 of its rows: GEMMs scale 1 x 16 blocks along K.
    """
    return q.packed.view(torch.float4_e2m1fn_x2), swizzle_scales(_row_block_scales(q))


def _check_gemm_pair(a: QuantizedTensor, b: QuantizedTensor) -> None:
    if a.scheme != b.scheme:
        raise ValueError(f"both operands need the same scheme, got {a.scheme!r} and {b.scheme!r}")
    for q in (a, b):
        _row_block_scales(q)  # raises for anything but a 2-D MXFP4/NVFP4 tensor
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a @ b.T needs the same K (last axis): a is {tuple(a.shape)}, b is {tuple(b.shape)}")


def _tensor_scale(a: QuantizedTensor, b: QuantizedTensor) -> Optional[torch.Tensor]:
    return a.global_scale * b.global_scale if a.global_scale is not None else None


def block_scaled_matmul(a: QuantizedTensor, b: QuantizedTensor) -> torch.Tensor:
    """``a @ b.T`` in float32 as a block-scaled FP4 GEMM computes it, on any device.

    ``a`` is (M, K), ``b`` is (N, K), both MXFP4 or both NVFP4, with blocks along K.
    For each K block the E2M1 products are summed (exactly: they are multiples of
    1/4 far below 2^24), multiplied by the product of the two block scales (exact
    too) and added to a float32 accumulator, block after block in order of K; NVFP4's
    two per-tensor scales multiply the result last. Only the accumulation rounds,
    once per block, so the result is the same on every CPU kernel set and
    differs from :func:`fp4_gemm` only in the order of the hardware's accumulation.

    Examples
    --------
    >>> import torch
    >>> from fp4lib import quantize
    >>> g = torch.Generator().manual_seed(0)
    >>> a = quantize(torch.randn(4, 64, generator=g), "nvfp4")
    >>> b = quantize(torch.randn(3, 64, generator=g), "nvfp4")
    >>> y = block_scaled_matmul(a, b)
    >>> torch.allclose(y, a.dequantize() @ b.dequantize().T, rtol=1e-5, atol=1e-6)
    True
    """
    _check_gemm_pair(a, b)
    bs = a.block_size
    (m, k), n = a.shape, b.shape[0]
    va = a.element_format.decode(a.codes()).view(m, k // bs, bs).transpose(0, 1)  # (blocks, M, bs)
    vb = b.element_format.decode(b.codes()).view(n, k // bs, bs).transpose(0, 1)
    sa = _row_block_scales(a).float().T  # (blocks, M), exact: E8M0 and E4M3 are float32 values
    sb = _row_block_scales(b).float().T
    out = torch.zeros(m, n, dtype=torch.float32, device=va.device)
    for i in range(k // bs):
        out += (va[i] @ vb[i].T) * (sa[i][:, None] * sb[i][None, :])  # the block's term is exact
    scale = _tensor_scale(a, b)
    return out if scale is None else out * scale


FP4_GEMM_CAPABILITIES = (10, 12)
"""Major compute capabilities with block-scaled FP4 GEMMs in ``torch._scaled_mm``:
10.x (B200, GB200; "SM100") and 12.x (RTX 50xx, DGX Spark; "SM120")."""


def fp4_gemm_available(device=None) -> bool:
    """Whether ``torch._scaled_mm`` has block-scaled FP4 GEMMs here: a CUDA GPU of
    compute capability 10.x or 12.x (:data:`FP4_GEMM_CAPABILITIES`)."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] in FP4_GEMM_CAPABILITIES


def fp4_gemm(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``a @ b.T`` on the GPU's block-scaled FP4 tensor cores (``torch._scaled_mm``).

    The operands as in :func:`block_scaled_matmul`, on a CUDA device with
    :func:`fp4_gemm_available`; K a multiple of 32 and M, N multiples of 16 (cuBLAS'
    alignment). The GEMM accumulates in float32 and writes bfloat16, the output
    PyTorch's own FP4 ``_scaled_mm`` tests use (float32 output is not offered by
    every kernel); NVFP4's per-tensor scales then multiply that output in float32,
    as torchao does, and the product is cast to ``out_dtype``. So the result is the
    float32 GEMM rounded to bfloat16 (and, for NVFP4, rounded once more after the
    scale), whatever ``out_dtype``. Raises ``RuntimeError`` naming what is missing elsewhere.
    """
    _check_gemm_pair(a, b)
    if a.packed.device.type != "cuda" or b.packed.device.type != "cuda":
        raise RuntimeError("fp4_gemm runs on a CUDA device; move the QuantizedTensors there, or use "
                           "block_scaled_matmul, which emulates it anywhere")
    if not fp4_gemm_available(a.packed.device):
        cap = ".".join(map(str, torch.cuda.get_device_capability(a.packed.device)))
        raise RuntimeError(f"block-scaled FP4 GEMMs need compute capability 10.x or 12.x; this GPU has {cap}. "
                           "block_scaled_matmul emulates the GEMM on any device")
    codes_a, scales_a = gemm_operand(a)
    codes_b, scales_b = gemm_operand(b)
    out = torch._scaled_mm(codes_a, codes_b.T, scales_a, scales_b, out_dtype=torch.bfloat16)
    scale = _tensor_scale(a, b)
    return out.to(out_dtype) if scale is None else (out.float() * scale).to(out_dtype)
