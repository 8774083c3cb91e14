"""Hand fp4lib's MXFP4 and NVFP4 tensors to engines with real FP4 kernels, bytes unchanged.

* :func:`to_torchao` / :func:`from_torchao` -- an MXFP4 :class:`~fp4lib.QuantizedTensor`
  as torchao's ``MXTensor`` and an NVFP4 one as its ``NVFP4Tensor``, and back. The
  packed codes and the scales cross as they are: fp4lib and torchao pack two E2M1
  codes per byte the same way (element 2i in the low nibble, as PyTorch's
  ``float4_e2m1fn_x2`` and the OCP specification), and both keep one E8M0 scale per
  32 elements (MXFP4) or one E4M3 scale per 16 plus one FP32 scale per tensor
  (NVFP4) in row-major order.
* :func:`gemm_operand` -- the same bytes in the layout of a block-scaled FP4 GEMM
  (``torch._scaled_mm`` on Blackwell GPUs, cuBLAS): the codes as
  ``torch.float4_e2m1fn_x2`` and the scales swizzled into 128 x 4 tiles.

Never quantize again on the other side. fp4lib's MXFP4 is bit for bit torchao's
``to_mx`` with the OCP floor rule, but NVFP4 differs in details: fp4lib follows
Transformer Engine's reference (``s_enc = 2688 / amax``, block scale
``e4m3((amax_b / 6) * s_enc)``, an underflowing block scale flushed to zero), while
torchao's ``nvfp4_quantize`` divides by ``amax / 2688`` and raises block scales
below E4M3's smallest normal number (2^-6) to it. The two agree on most blocks, not all: they part where fp4lib's block scale is
subnormal or zero.

torchao is an optional dependency (``pip install torchao``); this module imports it
only when called.
"""

from __future__ import annotations

import torch

from .constants import MX_BLOCK_SIZE, NVFP4_BLOCK_SIZE
from .scaling import QuantizedTensor

__all__ = ["to_torchao", "from_torchao", "gemm_operand", "swizzle_scales", "unswizzle_scales"]

_SWIZZLE_ROWS, _SWIZZLE_COLS = 128, 4  # the scale tile of block-scaled GEMMs


def _torchao():
    try:
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
        from torchao.quantization.quantize_.common.kernel_preference import KernelPreference
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"fp4lib.interop needs torchao (pip install torchao): {e}") from e
    return MXTensor, NVFP4Tensor, KernelPreference


def to_torchao(q: QuantizedTensor):
    """torchao's ``MXTensor`` (MXFP4) or ``NVFP4Tensor`` (NVFP4, 1 x 16 blocks) holding
    ``q``'s packed codes and scales, unchanged.

    Raises ``ValueError`` for other schemes, for NVFP4 16 x 16 tiles (torchao's
    ``NVFP4Tensor`` has one scale per 16 consecutive elements), and for tensors
    that are not at least 2-D with an even last axis.
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a fp4lib QuantizedTensor, got {type(q).__name__}")
    if q.scheme not in ("mxfp4", "nvfp4"):
        raise ValueError(f"torchao has MXFP4 and NVFP4 tensors; {q.scheme!r} has no counterpart there")
    if q.tile:
        raise ValueError("NVFP4 with 16x16 tiles has no torchao counterpart (its NVFP4Tensor scales 1x16 "
                         "blocks); quantize with tile=False to hand it over")
    if len(q.shape) < 2:
        raise ValueError(f"torchao's FP4 tensors are at least 2-D, got shape {tuple(q.shape)}")
    MXTensor, NVFP4Tensor, KernelPreference = _torchao()
    if q.scheme == "mxfp4":
        return MXTensor(q.packed, q.scale, torch.float4_e2m1fn_x2, MX_BLOCK_SIZE, q.dtype,
                        KernelPreference.EMULATED, None, False)
    return NVFP4Tensor(q.packed, q.scale, NVFP4_BLOCK_SIZE, q.dtype, per_tensor_scale=q.global_scale.reshape(()))


def from_torchao(t) -> QuantizedTensor:
    """The :class:`~fp4lib.QuantizedTensor` holding a torchao ``MXTensor`` (FP4 elements)
    or ``NVFP4Tensor``'s codes and scales, unchanged (scales unswizzled if needed)."""
    MXTensor, NVFP4Tensor, _ = _torchao()
    if isinstance(t, MXTensor):
        if t.elem_dtype != torch.float4_e2m1fn_x2 or t.block_size != MX_BLOCK_SIZE:
            raise ValueError(f"an MXTensor of FP4 elements in blocks of 32 maps to MXFP4; got elements "
                             f"{t.elem_dtype} in blocks of {t.block_size}")
        scale = t.scale
        if t.is_swizzled_scales:
            scale = unswizzle_scales(scale, t.qdata.shape[0], t.qdata.shape[-1] * 2 // MX_BLOCK_SIZE)
        return QuantizedTensor(packed=t.qdata, scale=scale.reshape(*t.shape[:-1], -1), shape=t.shape,
                               dtype=t.dtype, scheme="mxfp4", block_size=MX_BLOCK_SIZE, rounding="nearest")
    if isinstance(t, NVFP4Tensor):
        if t.per_tensor_scale is None:
            raise ValueError("an NVFP4Tensor without a per-tensor scale has no fp4lib counterpart "
                             "(fp4lib's NVFP4 always carries one)")
        scale = t.scale
        if t.is_swizzled_scales:
            scale = unswizzle_scales(scale, t.qdata.shape[0], t.qdata.shape[-1] * 2 // NVFP4_BLOCK_SIZE)
        return QuantizedTensor(packed=t.qdata, scale=scale.reshape(*t.shape[:-1], -1), shape=t.shape,
                               dtype=t.dtype, scheme="nvfp4", block_size=NVFP4_BLOCK_SIZE, rounding="nearest",
                               global_scale=t.per_tensor_scale.reshape(()))
    raise TypeError(f"expected torchao's MXTensor or NVFP4Tensor, got {type(t).__name__}")


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


def gemm_operand(q: QuantizedTensor):
    """``(codes, scales)`` of a 2-D MXFP4 or NVFP4 tensor in a block-scaled FP4 GEMM's layout:
    the packed codes as ``torch.float4_e2m1fn_x2`` (rows, cols / 2), the block scales
    swizzled (:func:`swizzle_scales`). NVFP4's per-tensor scale stays outside, as the
    GEMM's output scale (``alpha``).
    """
    if q.scheme not in ("mxfp4", "nvfp4") or q.tile or len(q.shape) != 2:
        raise ValueError("gemm_operand takes a 2-D MXFP4 tensor or a 2-D NVFP4 tensor with 1x16 blocks")
    return q.packed.view(torch.float4_e2m1fn_x2), swizzle_scales(q.scale)
