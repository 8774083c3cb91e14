"""The quantized-tensor container and its layout: packed 4-bit codes, block scales,
and the views that put each block's elements on one axis.

Layouts (chapter 2): bitsandbytes schemes flatten the tensor row-major and pack the
first code of a pair in the high nibble; MXFP4, NVFP4 and the per-tensor scheme keep
the tensor's shape, run blocks along the last axis (or over 16x16 tiles) and pack
the first code in the low nibble, as OCP and ``torch.float4_e2m1fn_x2`` do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from .constants import BNB_NESTED_BLOCK_SIZE, FP32_BITS, MX_BLOCK_SIZE, NVFP4_BLOCK_SIZE, NVFP4_TILE, SCALE8_BITS
from .formats import FORMATS, ElementFormat
from .packing import unpack_nibbles
from .scales import e8m0_to_float
from .schemes import scheme_info

__all__ = ["QuantizedTensor", "NestedAbsmax", "block_view", "times_blocks", "times_block_scale"]


@dataclass
class NestedAbsmax:
    """bitsandbytes' double quantization of the per-block absmax values.

    ``codes`` (uint8, one per absmax) index ``code`` (the 256-entry signed dynamic
    map, float32); each group of ``block_size`` (256) codes shares the FP32
    ``absmax2``; ``offset`` (FP32, 0-d) is the mean absmax that was subtracted.
    Decoded absmax = ``code[codes] * absmax2[group] + offset``.
    """

    codes: torch.Tensor
    absmax2: torch.Tensor
    code: torch.Tensor
    offset: torch.Tensor
    block_size: int = BNB_NESTED_BLOCK_SIZE

    def decode(self) -> torch.Tensor:
        """The per-block absmax values as float32, shape (n_blocks,)."""
        n = self.codes.numel()
        group = torch.arange(n, device=self.codes.device) // self.block_size
        return self.code[self.codes.long()] * self.absmax2[group] + self.offset


@dataclass
class QuantizedTensor:
    """A tensor stored as packed 4-bit codes plus block scales.

    Attributes
    ----------
    packed:
        uint8, two codes per byte. bitsandbytes schemes: shape ``((n + 1) // 2, 1)``
        over the row-major flattened tensor, element ``2i`` in the high nibble
        (bitsandbytes' layout). MXFP4/NVFP4: shape ``(*shape[:-1], shape[-1] // 2)``,
        element ``2i`` in the low nibble (OCP / ``torch.float4_e2m1fn_x2``).
    scale:
        bitsandbytes: FP32 absmax per block, shape ``(n_blocks,)`` (uint8 codes when
        ``nested`` is set, as in bitsandbytes). MXFP4: ``torch.float8_e8m0fnu``,
        shape ``(*shape[:-1], shape[-1] // 32)``. NVFP4: ``torch.float8_e4m3fn``
        block decode scales, shape ``(*shape[:-1], shape[-1] // 16)``, or
        ``(rows // 16, cols // 16)`` for 16x16 tiles. ``"e2m1_per_tensor"``: the FP32
        scale ``amax / 6``, 0-d.
    shape, dtype:
        Shape and dtype of the original tensor (and of :meth:`dequantize`).
    scheme, block_size, rounding:
        How it was made. ``block_size`` is 16 for NVFP4 tiles (16x16) and 0 for
        the per-tensor scheme (one block: the whole tensor).
    global_scale:
        NVFP4 only: the FP32 per-tensor decode scale ``s_dec`` (0-d); else ``None``.
    nested:
        bitsandbytes double quantization state, or ``None``.
    tile:
        NVFP4 only: ``True`` when one scale covers a 16x16 tile.
    clip_fraction:
        MXFP4 only: fraction of blocks whose largest magnitude saturated to 6.
    nonfinite_count:
        Number of NaN/Inf inputs replaced by 0 (``nonfinite="zero"``).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    scheme: str
    block_size: int
    rounding: str = "nearest"
    global_scale: Optional[torch.Tensor] = None
    nested: Optional[NestedAbsmax] = None
    tile: bool = False
    clip_fraction: Optional[float] = None
    nonfinite_count: int = 0
    _numel: int = field(default=0, repr=False)

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        self._numel = math.prod(self.shape)

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return self._numel

    @property
    def family(self) -> str:
        """The scheme's block layout (see :class:`~fp4lib.numerics.schemes.Scheme`)."""
        return scheme_info(self.scheme).family

    @property
    def nibble_order(self) -> str:
        """``"high_first"`` (bitsandbytes) or ``"low_first"`` (OCP / PyTorch)."""
        return scheme_info(self.scheme).nibble_order

    @property
    def element_format(self) -> ElementFormat:
        """The 4-bit element format of the codes."""
        return FORMATS[scheme_info(self.scheme).element]

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes: shape ``(n,)`` for bitsandbytes schemes, else ``shape``."""
        if self.family == "absmax":
            return unpack_nibbles(self.packed.reshape(-1), self.numel, self.nibble_order)
        return unpack_nibbles(self.packed, self.shape[-1], self.nibble_order)

    def block_scales(self) -> torch.Tensor:
        """Float32 decode scale of each block (absmax, 2^e, or s_dec_b * s_dec)."""
        family = self.family
        if family == "absmax":
            return self.nested.decode() if self.nested is not None else self.scale
        if family == "tensor":
            return self.scale
        if family == "mx":
            return e8m0_to_float(self.scale)
        return self.scale.float() * self.global_scale

    def factored(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """MXFP4/NVFP4/per-tensor: ``(values, tensor_scale)``, the operand an FP4 GEMM sees.

        ``values``: float32 of the original shape, each E2M1 value times its
        block's decode scale (E8M0 or E4M3), a product that is exact in float32
        and in bfloat16. ``tensor_scale``: NVFP4's FP32 per-tensor decode scale
        ``s_dec`` (0-d), or ``None`` for MXFP4. FP4 hardware multiplies the
        block-scaled products and applies the per-tensor scales of both operands
        to the GEMM's output; :meth:`dequantize` is ``values * tensor_scale``.

        Examples
        --------
        >>> import torch
        >>> from fp4lib import quantize
        >>> q = quantize(torch.tensor([[0.5, -1.0, 3.0, 12.0] * 4]), "nvfp4")
        >>> values, s_dec = q.factored()
        >>> values[0, :4].tolist()  # E2M1 values times E4M3 block scales: up to 6 * 448
        [0.0, -224.0, 672.0, 2688.0]
        >>> round(float(s_dec) * 2688, 4), torch.equal(values * s_dec, q.dequantize())  # s_dec = amax / 2688
        (12.0, True)
        """
        family = self.family
        if family == "absmax":
            raise ValueError(f"factored() applies to 'mxfp4', 'nvfp4' and 'e2m1_per_tensor', not {self.scheme!r}")
        vals = self.element_format.decode(self.codes())
        if family == "tensor":
            return vals, self.scale
        if family == "mx":
            return times_blocks(vals, e8m0_to_float(self.scale), MX_BLOCK_SIZE, False), None
        s_dec_b = self.scale.float()
        out = times_blocks(vals, s_dec_b, NVFP4_BLOCK_SIZE, self.tile)
        return out, self.global_scale

    def dequantize(self) -> torch.Tensor:
        """Decode to a tensor of the original shape and dtype.

        Products are taken in float32 and cast at the end, as bitsandbytes does.

        Examples
        --------
        >>> import torch
        >>> from fp4lib import quantize
        >>> q = quantize(torch.tensor([0.1, -0.5, 1.0, 0.3]), "bnb_fp4")
        >>> [round(v, 4) for v in q.dequantize().tolist()]
        [0.1667, -0.5, 1.0, 0.3333]
        """
        if self.family == "absmax":
            vals = self.element_format.decode(self.codes())
            out = times_block_scale(vals, self.block_scales(), self.block_size)
            return out.to(self.dtype).reshape(self.shape)
        values, tensor_scale = self.factored()
        out = values if tensor_scale is None else values * tensor_scale
        return out.to(self.dtype)

    @property
    def nbytes(self) -> int:
        """Every byte stored: packed codes, block scales and per-tensor scalars."""
        n = self.packed.numel() + self.scale.numel() * self.scale.element_size()
        if self.global_scale is not None:
            n += 4
        if self.nested is not None:
            n += self.nested.absmax2.numel() * 4 + 4  # second-level absmax + offset
        return n

    @property
    def bits_per_element(self) -> float:
        """Storage per element in bits: packed codes plus per-block scales.

        One-per-tensor scalars (NVFP4's FP32 tensor scale, the double-quantization
        offset) are left out, so a large tensor gives the format's nominal figure:
        4.5 for bitsandbytes at block size 64, 4.25 for MXFP4, 4.5 for NVFP4,
        4 + 8/64 + 32/(64*256) = 4.127 with double quantization. :attr:`nbytes`
        counts everything.
        """
        bits = self.packed.numel() * 8
        if self.nested is not None:
            bits += self.nested.codes.numel() * SCALE8_BITS + self.nested.absmax2.numel() * FP32_BITS
        else:
            bits += self.scale.numel() * self.scale.element_size() * 8
        return bits / self.numel

    def __repr__(self) -> str:
        extra = ", tile=16x16" if self.tile else ""
        extra += ", double-quantized absmax" if self.nested is not None else ""
        return (
            f"QuantizedTensor(scheme={self.scheme!r}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"block_size={self.block_size}{extra}, bits_per_element={self.bits_per_element:.4g})"
        )


def times_block_scale(vals: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """vals (n,) float32 times the scale of each flat block of block_size."""
    n = vals.numel()
    full = n - n % block_size
    blocks = full // block_size
    out = torch.empty(n, dtype=torch.float32, device=vals.device)
    out[:full] = (vals[:full].reshape(blocks, block_size) * scale[:blocks].reshape(-1, 1)).reshape(-1)
    if full < n:
        out[full:] = vals[full:] * scale[blocks]
    return out


def block_view(x32: torch.Tensor, block: int, tile: bool) -> torch.Tensor:
    """Blocks of ``block`` along the last axis, or 16x16 tiles of a matrix, as the last axis."""
    if tile:
        r, c = x32.shape
        t = NVFP4_TILE
        return x32.reshape(r // t, t, c // t, t).permute(0, 2, 1, 3).reshape(r // t, c // t, t * t)
    return x32.reshape(*x32.shape[:-1], x32.shape[-1] // block, block)


def times_blocks(x32: torch.Tensor, per_block: torch.Tensor, block: int, tile: bool) -> torch.Tensor:
    """``x32`` times one factor per block (or tile), in ``x32``'s shape."""
    if tile:
        r, c = x32.shape
        t = NVFP4_TILE
        return (x32.reshape(r // t, t, c // t, t) * per_block[:, None, :, None]).reshape(r, c)
    return (block_view(x32, block, False) * per_block.unsqueeze(-1)).reshape(x32.shape)
