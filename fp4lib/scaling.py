"""Block scaling: bitsandbytes absmax blocks, MXFP4 and NVFP4.

:func:`quantize` turns a float tensor into a :class:`QuantizedTensor` (packed 4-bit
codes plus scales); :func:`fake_quantize` returns quantize-then-dequantize in the
input's dtype and shape. Chapter 2 of the book introduces every scheme:

* ``"bnb_fp4"`` / ``"nf4"`` -- bitsandbytes' absmax blocks: the tensor flattened
  row-major, blocks of ``block_size`` (default 64) elements, one FP32 absmax per
  block, elements ``x / absmax`` coded with :data:`~fp4lib.BNB_FP4` (bitsandbytes'
  "fp4" table, *not* OCP E2M1) or :data:`~fp4lib.NF4`. Bit-exact with
  ``bitsandbytes.functional.quantize_4bit`` on CPU, optional double quantization
  (bitsandbytes' ``compress_statistics``). Packed high nibble first.
* ``"mxfp4"`` -- OCP MX v1.0: E2M1 elements, one E8M0 (power-of-two) scale per 32
  consecutive elements of the last axis. Packed low nibble first (OCP/PyTorch).
* ``"nvfp4"`` -- E2M1 elements, one E4M3 scale per 16 consecutive elements of the
  last axis (or per 16x16 tile of a matrix), plus one FP32 scale per tensor.
  Packed low nibble first.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch

from .constants import (
    BNB_ABSMAX_FLOOR,
    E2M1_EMAX,
    E8M0_NAN,
    FLOAT32_EXP_BIAS,
    FLOAT32_MAN_BITS,
    MX_SCALE_RULES,
    BNB_BLOCK_SIZES,
    BNB_DEFAULT_BLOCK_SIZE,
    BNB_NESTED_BLOCK_SIZE,
    E2M1_MAX,
    E4M3_MAX,
    E5M2_MAX,
    E8M0_EXP_BIAS,
    E8M0_MAX_EXP,
    E8M0_MIN_EXP,
    FLOAT32_MAX,
    FP4_BITS,
    FP32_BITS,
    MX_BLOCK_SIZE,
    NVFP4_4OVER6_SCALE_MAX,
    NVFP4_4OVER6_TARGET,
    NVFP4_BLOCK_SIZE,
    NVFP4_TILE,
    SCALE8_BITS,
    SCALE_RULES,
)
from .formats import BNB_FP4, E2M1, NF4, ElementFormat
from .packing import pack_nibbles, unpack_nibbles
from .rounding import check_rounding

__all__ = [
    "SCHEMES",
    "NONFINITE_MODES",
    "QuantizedTensor",
    "NestedAbsmax",
    "quantize",
    "fake_quantize",
    "dynamic_map_8bit",
    "pow2",
    "e2m1_tensor_scale",
    "bnb_scale_blocks",
    "bnb_scale_tail",
    "mx_scale_exponents",
    "nvfp4_tensor_scale",
    "nvfp4_block_scales",
    "nvfp4_four_over_six",
    "e4m3_round_up",
    "exact_constant",
    "resolve_scale_rule",
    "FP8_SCHEMES",
    "fp8_tensor_scale",
    "fp8_fake_quantize",
    "PER_TENSOR",
    "BACKENDS",
]

PER_TENSOR = "e2m1_per_tensor"
SCHEMES = ("bnb_fp4", "nf4", "mxfp4", "nvfp4", PER_TENSOR)
FP8_SCHEMES = {"fp8_e4m3": (torch.float8_e4m3fn, E4M3_MAX), "fp8_e5m2": (torch.float8_e5m2, E5M2_MAX)}
"""The 8-bit reference formats of training (not 4-bit storage schemes): scheme ->
(torch dtype, largest finite value). One FP32 scale per tensor, from its current
amax (Transformer Engine's ``Float8CurrentScaling``)."""
NONFINITE_MODES = ("raise", "zero")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "reference", "compiled")
"""``quantize``'s paths: ``"reference"`` (this module, one tensor operation at a
time), ``"compiled"`` (:mod:`fp4lib.kernels`, the same bits in one fused pass) and
``"auto"`` (compiled for large tensors where ``torch.compile`` works, else the
reference)."""
FAST_MIN_NUMEL = 1 << 16
"""``backend="auto"`` compiles from this many elements on; below, compiling costs more than it saves."""
AUTO_COMPILE_AFTER = 1
"""``backend="auto"`` compiles a kernel for a shape only once that shape was quantized
this many times before in the process: compiling takes seconds (10-20 s on a 2-core
CPU), which one call never wins back, while a loop over the same shape does."""
_AUTO_SEEN: dict = {}
_log = logging.getLogger(__name__)

_ELEMENT_FORMAT = {"bnb_fp4": BNB_FP4, "nf4": NF4, "mxfp4": E2M1, "nvfp4": E2M1, PER_TENSOR: E2M1}
_NIBBLE_ORDER = {"bnb_fp4": "high_first", "nf4": "high_first", "mxfp4": "low_first", "nvfp4": "low_first",
                 PER_TENSOR: "low_first"}
_BNB_SCHEMES = ("bnb_fp4", "nf4")


# ----------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------
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
    def nibble_order(self) -> str:
        """``"high_first"`` (bitsandbytes) or ``"low_first"`` (OCP / PyTorch)."""
        return _NIBBLE_ORDER[self.scheme]

    @property
    def element_format(self) -> ElementFormat:
        """The 4-bit element format of the codes."""
        return _ELEMENT_FORMAT[self.scheme]

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes: shape ``(n,)`` for bitsandbytes schemes, else ``shape``."""
        if self.scheme in _BNB_SCHEMES:
            return unpack_nibbles(self.packed.reshape(-1), self.numel, "high_first")
        return unpack_nibbles(self.packed, self.shape[-1], "low_first")

    def block_scales(self) -> torch.Tensor:
        """Float32 decode scale of each block (absmax, 2^e, or s_dec_b * s_dec)."""
        if self.scheme in _BNB_SCHEMES:
            return self.nested.decode() if self.nested is not None else self.scale
        if self.scheme == PER_TENSOR:
            return self.scale
        if self.scheme == "mxfp4":
            return _e8m0_to_float(self.scale)
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
        >>> q = quantize(torch.tensor([[0.5, -1.0, 3.0, 12.0] * 4]), "nvfp4")
        >>> values, s_dec = q.factored()
        >>> values[0, :4].tolist()  # E2M1 values times E4M3 block scales: up to 6 * 448
        [0.0, -224.0, 672.0, 2688.0]
        >>> round(float(s_dec) * 2688, 4), torch.equal(values * s_dec, q.dequantize())  # s_dec = amax / 2688
        (12.0, True)
        """
        if self.scheme in _BNB_SCHEMES:
            raise ValueError(f"factored() applies to 'mxfp4', 'nvfp4' and 'e2m1_per_tensor', not {self.scheme!r}")
        vals = self.element_format.decode(self.codes())
        if self.scheme == PER_TENSOR:
            return vals, self.scale
        if self.scheme == "mxfp4":
            return _times_blocks(vals, _e8m0_to_float(self.scale), MX_BLOCK_SIZE, False), None
        s_dec_b = self.scale.float()
        out = _times_blocks(vals, s_dec_b, NVFP4_BLOCK_SIZE, self.tile)
        return out, self.global_scale

    def dequantize(self) -> torch.Tensor:
        """Decode to a tensor of the original shape and dtype.

        Products are taken in float32 and cast at the end, as bitsandbytes does.

        Examples
        --------
        >>> import torch
        >>> q = quantize(torch.tensor([0.1, -0.5, 1.0, 0.3]), "bnb_fp4")
        >>> [round(v, 4) for v in q.dequantize().tolist()]
        [0.1667, -0.5, 1.0, 0.3333]
        """
        if self.scheme in _BNB_SCHEMES:
            vals = self.element_format.decode(self.codes())
            out = _times_block_scale(vals, self.block_scales(), self.block_size)
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


# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------
def _times_block_scale(vals: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """vals (n,) float32 times the scale of each flat block of block_size."""
    n = vals.numel()
    full = n - n % block_size
    blocks = full // block_size
    out = torch.empty(n, dtype=torch.float32, device=vals.device)
    out[:full] = (vals[:full].reshape(blocks, block_size) * scale[:blocks].reshape(-1, 1)).reshape(-1)
    if full < n:
        out[full:] = vals[full:] * scale[blocks]
    return out


def _e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    e = scale.view(torch.uint8).to(torch.int32) - E8M0_EXP_BIAS
    out = pow2(e.clamp(max=E8M0_MAX_EXP))
    return torch.where(scale.view(torch.uint8) == E8M0_NAN, torch.full_like(out, float("nan")), out)


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2**e`` for int32 ``e`` in [-127, 127], built from its bits.

    Works the same eagerly and in compiled kernels (no ``ldexp``): the float32
    exponent field is ``e + 127``; ``2**-127`` is a subnormal, made as ``2**-126 / 2``.

    Examples
    --------
    >>> import torch
    >>> pow2(torch.tensor([-127, -1, 0, 3, 127], dtype=torch.int32)).tolist() == [2.0**-127, 0.5, 1.0, 8.0, 2.0**127]
    True
    """
    e = e.to(torch.int32)
    normal = ((e.clamp(min=-126) + FLOAT32_EXP_BIAS) << FLOAT32_MAN_BITS).view(torch.float32)
    sub = ((e.clamp(max=126) + 1 + FLOAT32_EXP_BIAS) << FLOAT32_MAN_BITS).view(torch.float32) * 0.5
    return torch.where(e >= -126, normal, sub)


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic ("dynamic tree") quantization map.

    256 sorted float32 values in [-0.99297, 1]: for each of 7 decades
    ``10^(i-6)``, the midpoints of an even split of [0.1, 1] into ``2^i + 1``
    points (and their negatives), plus 0 and 1. Used for double quantization.

    Examples
    --------
    >>> m = dynamic_map_8bit()
    >>> m.shape, float(m[0]), float(m[-1])
    (torch.Size([256]), -0.992968738079071, 1.0)
    """
    data = []
    exponent_bits = 7
    for i in range(exponent_bits):
        n_points = 2**i + 1
        edges = torch.linspace(0.1, 1, n_points, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) * 0.5  # exact halving, as a division by 2
        decade = 10 ** (-(exponent_bits - 1) + i)
        data += (decade * means).tolist()  # float32 products
        data += (-decade * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _nested_quantize(absmax: torch.Tensor) -> NestedAbsmax:
    """Double quantization of absmax exactly as bitsandbytes' CPU path does it."""
    code = dynamic_map_8bit().to(absmax.device)
    offset = absmax.mean()
    v = absmax - offset
    n = v.numel()
    bs = BNB_NESTED_BLOCK_SIZE
    n_groups = -(-n // bs)
    pad = n_groups * bs - n
    vp = torch.nn.functional.pad(v, (0, pad)).reshape(n_groups, bs)
    absmax2 = vp.abs().amax(dim=1)
    # The last group's padding must not enter its absmax: it is 0, which never
    # exceeds a real |v|, so amax over the padded group is the same.
    normed = (vp / absmax2.unsqueeze(1)).reshape(-1)[:n]
    # bitsandbytes' search: the largest index with code[idx] <= normed (code[0]
    # treated as -1), then one step right if that neighbour is strictly closer.
    search = code.clone()
    search[0] = -1.0
    idx = (torch.searchsorted(search, normed, right=True) - 1).clamp(0, 255)
    right = (idx + 1).clamp(max=255)
    closer = (idx < 255) & ((normed - search[right]).abs() < (normed - search[idx]).abs())
    idx = idx + closer.to(idx.dtype)
    idx = torch.where(torch.isnan(normed), torch.zeros_like(idx), idx)
    return NestedAbsmax(codes=idx.to(torch.uint8), absmax2=absmax2, code=code, offset=offset)


# ----------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------
def _check_input(x, scheme: str, rounding: str, nonfinite: str) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    check_rounding(rounding)
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    if x.dtype == torch.float64:
        raise TypeError(
            "x has dtype torch.float64; quantize takes float32, float16 or bfloat16 "
            "(the scale arithmetic is defined in float32: pass x.float())"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; quantize takes float32, float16 or bfloat16")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); there is nothing to quantize")


def _check_block_size(scheme: str, block_size: Optional[int]) -> int:
    if scheme == PER_TENSOR:
        if block_size is not None:
            raise ValueError(f"'{PER_TENSOR}' has one scale for the whole tensor; block_size must be None, got {block_size!r}")
        return 0
    if scheme in _BNB_SCHEMES:
        bs = BNB_DEFAULT_BLOCK_SIZE if block_size is None else block_size
        if bs not in BNB_BLOCK_SIZES:
            raise ValueError(f"block_size for {scheme!r} must be one of {BNB_BLOCK_SIZES}, got {block_size!r}")
        return bs
    allowed = MX_BLOCK_SIZE if scheme == "mxfp4" else NVFP4_BLOCK_SIZE
    if block_size not in (None, allowed):
        raise ValueError(f"block_size for {scheme!r} is fixed at {allowed} by the format, got {block_size!r}")
    return allowed


def _handle_nonfinite(x: torch.Tensor, nonfinite: str) -> Tuple[torch.Tensor, int]:
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return x, 0
    bad = ~finite
    count = int(bad.sum())
    if nonfinite == "raise":
        flat = int(torch.nonzero(bad.reshape(-1))[0])
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape)) if x.dim() else ()
        value = float(x.reshape(-1)[flat])
        raise ValueError(
            f"x contains {count} non-finite value(s) (NaN or +-Inf); the first is {value} at index {index}. "
            "FP4 formats have no NaN or Inf, and bitsandbytes would silently turn the whole block to NaN. "
            "Pass nonfinite='zero' to quantize them as 0."
        )
    return torch.where(finite, x, torch.zeros_like(x)), count


# ----------------------------------------------------------------------------
# Scale arithmetic: written once, used by the reference below and by the
# compiled kernels of fp4lib.kernels (plain tensor operations only)
# ----------------------------------------------------------------------------
def exact_constant(like: torch.Tensor, value: float) -> torch.Tensor:
    """``value`` as a float32 tensor of ``like``'s shape and device, computed at run time.

    The divisor of a device-independent division. ``t / 6.0`` divides exactly on
    the CPU, but CUDA multiplies by the reciprocal of a Python number (or of a
    CPU scalar tensor), and Inductor does the same on the GPU for any divisor it
    can prove constant (``full_like`` included): about a third of float32
    quotients by 6 come out one ulp off. ``t / exact_constant(t, 6.0)`` is a true
    division everywhere: eagerly on any device, and in compiled code where
    Inductor divides exactly (``eager_numerics.division_rounding``, which
    :mod:`fp4lib.kernels` sets for its kernels). ``value`` must be a float32 number.

    Examples
    --------
    >>> import torch
    >>> t = torch.tensor([1.0, 7.0])
    >>> torch.equal(t / exact_constant(t, 6.0), t / 6.0)  # on the CPU both divide exactly
    True
    """
    # (bits & 0) is 0, but not a value the compiler can fold into a constant.
    zero = (like.float().view(torch.int32) & 0).to(torch.float32)
    return zero + value


def e2m1_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """One E2M1 scale for a whole tensor: ``amax / 6`` (1 when amax is 0), float32.

    Examples
    --------
    >>> import torch
    >>> e2m1_tensor_scale(torch.tensor([12.0, 0.0])).tolist()
    [2.0, 1.0]
    """
    return torch.where(amax > 0, amax / exact_constant(amax, E2M1_MAX), torch.ones_like(amax))


def bnb_scale_blocks(blocks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' full blocks: ``(clamp(x * (1 / absmax), -1, 1), absmax)``.

    ``blocks``: float32 ``(..., block_size)``. Multiplying by the reciprocal (of
    the absmax clamped to at least 1e-38) is bitsandbytes' own arithmetic, which
    is what makes the codes bit-identical to its ``quantize_4bit``.
    """
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=BNB_ABSMAX_FLOOR)).unsqueeze(-1), -1, 1)
    return scaled, absmax


def bnb_scale_tail(tail: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' partial last block: ``(clamp(x / absmax, -1, 1), absmax)``.

    ``tail``: float32 ``(..., n)`` with ``n`` less than the block size. This block
    divides (not multiplies) and keeps its clamped absmax: both as bitsandbytes does.
    """
    am = tail.abs().amax(dim=-1, keepdim=True).clamp(min=BNB_ABSMAX_FLOOR)
    return torch.clamp(tail / am, -1, 1), am.squeeze(-1)


def mx_scale_exponents(amax: torch.Tensor, scale_rule: str = "floor") -> torch.Tensor:
    """Unbiased E8M0 exponents (int32) of MXFP4 block scales from float32 block amax values.

    ``"floor"`` (OCP MX v1.0): ``floor(log2(amax)) - 2``, so ``amax / X`` lies in
    [4, 8) and a block maximum above 6 X saturates. ``"ceil"``: the smallest ``e``
    with ``amax <= 6 * 2^e`` (never clips). ``floor(log2(amax))`` is read exactly
    from the float32 exponent field; the result is clamped to [-127, 127], and an
    all-zero block gets -127.

    Examples
    --------
    >>> import torch
    >>> mx_scale_exponents(torch.tensor([1.0, 6.0, 7.0, 0.0])).tolist()
    [-2, 0, 0, -127]
    >>> mx_scale_exponents(torch.tensor([1.0, 6.0, 7.0]), "ceil").tolist()
    [-2, 0, 1]
    """
    if scale_rule not in MX_SCALE_RULES:
        raise ValueError(f"scale_rule must be one of {MX_SCALE_RULES}, got {scale_rule!r}")
    amax = amax.float()
    field = (amax.view(torch.int32) >> FLOAT32_MAN_BITS) & 0xFF  # biased exponent; subnormals read as 0
    e = (field - FLOAT32_EXP_BIAS - E2M1_EMAX).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    if scale_rule == "ceil":
        e = e + (amax * pow2(-e) > E2M1_MAX).to(torch.int32)
    e = torch.where(amax > 0, e, torch.full_like(e, E8M0_MIN_EXP))
    return e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


def _current_scale(amax: torch.Tensor, top: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s_enc, s_dec)``: ``s_enc = top / amax`` (1 when amax is 0, capped at the
    float32 maximum), ``s_dec = 1 / s_enc``, in float32."""
    amax = amax.float()
    # A true float32 division (a Python number over a tensor would be computed as a
    # product with the reciprocal, one ulp off for about a quarter of amax values).
    s_enc = torch.where(amax > 0, torch.full_like(amax, top) / amax, torch.ones_like(amax))
    s_enc = s_enc.clamp(max=FLOAT32_MAX)
    return s_enc, 1.0 / s_enc


def nvfp4_tensor_scale(amax: torch.Tensor, scale_max: float = E4M3_MAX) -> Tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 per-tensor scales ``(s_enc, s_dec)`` in float32.

    ``s_enc = 6 * scale_max / amax`` (1 when amax is 0, capped at the float32
    maximum), ``s_dec = 1 / s_enc``. ``scale_max`` is the largest block scale the
    tensor may need: E4M3's 448, or 256 under four-over-six, whose second
    candidate scale ``amax_b / 4`` would otherwise overflow E4M3.

    Examples
    --------
    >>> import torch
    >>> [float(s) for s in nvfp4_tensor_scale(torch.tensor(2688.0))]
    [1.0, 1.0]
    """
    return _current_scale(amax, E2M1_MAX * scale_max)


def e4m3_round_up(v: torch.Tensor) -> torch.Tensor:
    """The smallest E4M3 number at least ``v`` (float32, 0 <= v), saturating at 448; float32.

    Examples
    --------
    >>> import torch
    >>> e4m3_round_up(torch.tensor([1.0, 1.01, 1.2, 0.0, 500.0])).tolist()  # E4M3 steps by 1/8 in [1, 2)
    [1.0, 1.125, 1.25, 0.0, 448.0]
    """
    q = v.to(torch.float8_e4m3fn)
    below = q.to(torch.float32)
    above = (q.view(torch.uint8) + 1).view(torch.float8_e4m3fn).to(torch.float32)
    return torch.where((below < v) & (below < E4M3_MAX), above, below)


def nvfp4_block_scales(amax_b: torch.Tensor, s_enc: torch.Tensor, s_dec: torch.Tensor, rule: str = "nearest",
                       target: float = E2M1_MAX) -> Tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 block scales ``(s_dec_b, s_enc_b)`` from block amax values and the tensor's scales.

    ``s_dec_b = e4m3((amax_b / target) * s_enc)``, returned as float32 values of
    E4M3 numbers: rounded to nearest even and saturating at 448 (``rule="nearest"``,
    the standard), or rounded up (``rule="up"``), so that no block maximum lands
    above ``target`` and stochastic rounding never has to clamp it. ``target`` is
    the E2M1 value the block maximum maps to: 6, or 4 for four-over-six's second
    candidate. ``s_enc_b = 1 / (s_dec_b * s_dec)``, or 0 for a block whose scale
    rounds to 0 (it can only hold zeros).
    """
    ideal = (amax_b / exact_constant(amax_b, target)) * s_enc
    if rule == "up":
        s_dec_b = e4m3_round_up(ideal)
    else:
        s_dec_b = ideal.to(torch.float8_e4m3fn).to(torch.float32)
    denom = s_dec_b * s_dec
    s_enc_b = torch.where(denom > 0, 1.0 / denom, torch.zeros_like(denom)).clamp(max=FLOAT32_MAX)
    return s_dec_b, s_enc_b


def nvfp4_four_over_six(blocks: torch.Tensor, amax_b: torch.Tensor, s_enc: torch.Tensor, s_dec: torch.Tensor,
                        dims, round_nearest: Callable[[torch.Tensor], torch.Tensor]
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Four-over-six block scales ``(s_dec_b, s_enc_b)`` (Cook et al. 2025, arXiv 2512.02010).

    Each block gets one of two scales: the standard one, which maps its maximum to
    6, or one that maps it to 4, whichever gives the smaller squared error after
    round-to-nearest. Near 6 the E2M1 grid steps by 2; mapping the maximum to 4
    trades range for the finer steps below 4. ``blocks``: the tensor's blocks in
    float32, ``amax_b`` their maxima broadcastable against them, ``dims`` the
    block axes, ``round_nearest`` E2M1 round-to-nearest-even on values. The
    tensor's scales must come from ``nvfp4_tensor_scale(amax, 256)`` so that both
    candidates fit E4M3.

    The error of a candidate with block scale ``S`` is summed in float64 over the
    block from ``q * S - x * s_enc``, where ``q * S`` is exact (an E2M1 value times
    an E4M3 one): every term is computed exactly alike on every path. A tie keeps 6.
    """
    y = blocks * s_enc
    candidates = (nvfp4_block_scales(amax_b, s_enc, s_dec),
                  nvfp4_block_scales(amax_b, s_enc, s_dec, target=NVFP4_4OVER6_TARGET))
    errors = []
    for s_dec_b, s_enc_b in candidates:
        e = round_nearest(blocks * s_enc_b) * s_dec_b - y
        errors.append(e.double().square().sum(dim=dims, keepdim=True))
    use4 = errors[1] < errors[0]
    (d6, e6), (d4, e4) = candidates
    return torch.where(use4, d4, d6), torch.where(use4, e4, e6)


def resolve_scale_rule(scheme: str, scale_rule: Optional[str]) -> Optional[str]:
    """``scale_rule`` checked for ``scheme``; ``None`` means the scheme's standard rule.

    MXFP4: ``"floor"`` (OCP) or ``"ceil"``; NVFP4: ``"nearest"``, ``"up"`` or
    ``"4over6"`` (:func:`nvfp4_block_scales`, :func:`nvfp4_four_over_six`). Other
    schemes have no scale rule (``None``).

    Examples
    --------
    >>> resolve_scale_rule("nvfp4", None), resolve_scale_rule("mxfp4", "ceil"), resolve_scale_rule("nf4", None)
    ('nearest', 'ceil', None)
    """
    rules = SCALE_RULES.get(scheme)
    if scale_rule is None:
        return rules[0] if rules else None
    if rules is None:
        raise ValueError(f"scale_rule applies to 'mxfp4' and 'nvfp4' only, not {scheme!r}")
    if scale_rule not in rules:
        raise ValueError(f"{scheme} scale_rule must be one of {rules}, got {scale_rule!r}")
    return scale_rule


def fp8_tensor_scale(amax: torch.Tensor, scheme: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor current scaling for FP8: ``(s_enc, s_dec)`` with ``s_enc = fmax / amax``.

    Examples
    --------
    >>> import torch
    >>> [float(s) for s in fp8_tensor_scale(torch.tensor(448.0), "fp8_e4m3")]
    [1.0, 1.0]
    """
    return _current_scale(amax, FP8_SCHEMES[scheme][1])


def fp8_fake_quantize(x: torch.Tensor, scheme: str, tensor_amax: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """FP8 with one scale per tensor, round-to-nearest-even: ``(values, s_dec)``.

    ``values``: float32 FP8 numbers (``x * s_enc`` cast to the FP8 dtype), so that
    ``values * s_dec`` is the dequantized tensor; the tensor's maximum maps to the
    format's largest value (448 for E4M3, 57344 for E5M2). ``tensor_amax``: a
    group's amax to scale by instead (see :func:`quantize`).

    Examples
    --------
    >>> import torch
    >>> values, s_dec = fp8_fake_quantize(torch.tensor([1.0, 0.3, -2.0]), "fp8_e4m3")
    >>> values.tolist(), s_dec.item()  # amax 2 -> s_enc 224; 0.3 * 224 = 67.2 -> 64 (E4M3 steps by 8 there)
    ([224.0, 64.0, -448.0], 0.004464285913854837)
    """
    if scheme not in FP8_SCHEMES:
        raise ValueError(f"scheme must be one of {tuple(FP8_SCHEMES)}, got {scheme!r}")
    x32 = x.float()
    s_enc, s_dec = fp8_tensor_scale(x32.abs().amax() if tensor_amax is None else tensor_amax, scheme)
    return (x32 * s_enc).to(FP8_SCHEMES[scheme][0]).to(torch.float32), s_dec


# ----------------------------------------------------------------------------
# The reference: float32 input -> (codes, scales, extras), one operation at a time
# ----------------------------------------------------------------------------
def _bnb_codes(x32: torch.Tensor, fmt: ElementFormat, block_size: int, rounding: str, generator, uniforms):
    """bitsandbytes' CPU quantize_4bit arithmetic, step for step, on the flattened tensor."""
    flat = x32.reshape(-1)
    n = flat.numel()
    full = n - n % block_size
    scaled, absmax = bnb_scale_blocks(flat[:full].reshape(-1, block_size))
    scaled = scaled.reshape(-1)
    if full < n:
        tail, am = bnb_scale_tail(flat[full:])
        absmax = torch.cat([absmax, am.reshape(1)])
        scaled = torch.cat([scaled, tail])
    u = uniforms.reshape(-1) if uniforms is not None else None
    return fmt.encode(scaled, rounding, generator, u), absmax


def _block_view(x32: torch.Tensor, block: int, tile: bool) -> torch.Tensor:
    """Blocks of ``block`` along the last axis, or 16x16 tiles of a matrix, as the last axis."""
    if tile:
        r, c = x32.shape
        t = NVFP4_TILE
        return x32.reshape(r // t, t, c // t, t).permute(0, 2, 1, 3).reshape(r // t, c // t, t * t)
    return x32.reshape(*x32.shape[:-1], x32.shape[-1] // block, block)


def _times_blocks(x32: torch.Tensor, per_block: torch.Tensor, block: int, tile: bool) -> torch.Tensor:
    """``x32`` times one factor per block (or tile), in ``x32``'s shape."""
    if tile:
        r, c = x32.shape
        t = NVFP4_TILE
        return (x32.reshape(r // t, t, c // t, t) * per_block[:, None, :, None]).reshape(r, c)
    return (_block_view(x32, block, False) * per_block.unsqueeze(-1)).reshape(x32.shape)


def _mx_codes(x32: torch.Tensor, rounding: str, generator, uniforms, scale_rule: str):
    amax = _block_view(x32, MX_BLOCK_SIZE, False).abs().amax(dim=-1)
    e = mx_scale_exponents(amax, scale_rule)
    inv = pow2(-e)
    scaled = _times_blocks(x32, inv, MX_BLOCK_SIZE, False)  # exact: a power of two
    clipped = (amax * inv > E2M1_MAX) & (amax > 0)
    clip_fraction = int(clipped.sum()) / clipped.numel()
    codes = E2M1.encode(scaled, rounding, generator, uniforms)
    scale = (e + E8M0_EXP_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)
    return codes, scale, clip_fraction


def _e2m1_nearest(v: torch.Tensor) -> torch.Tensor:
    return E2M1.decode(E2M1.encode(v))


def _nvfp4_codes(x32: torch.Tensor, rounding: str, generator, uniforms, tile: bool, scale_rule: str, amax):
    four_six = scale_rule == "4over6"
    s_enc, s_dec = nvfp4_tensor_scale(amax, NVFP4_4OVER6_SCALE_MAX if four_six else E4M3_MAX)
    blocks = _block_view(x32, NVFP4_BLOCK_SIZE, tile)
    amax_b = blocks.abs().amax(dim=-1)
    if four_six:
        s_dec_b, s_enc_b = nvfp4_four_over_six(blocks, amax_b.unsqueeze(-1), s_enc, s_dec, -1, _e2m1_nearest)
        s_dec_b, s_enc_b = s_dec_b.squeeze(-1), s_enc_b.squeeze(-1)
    else:
        s_dec_b, s_enc_b = nvfp4_block_scales(amax_b, s_enc, s_dec, scale_rule)
    codes = E2M1.encode(_times_blocks(x32, s_enc_b, NVFP4_BLOCK_SIZE, tile), rounding, generator, uniforms)
    return codes, s_dec_b.to(torch.float8_e4m3fn), s_dec


def _per_tensor_codes(x32: torch.Tensor, rounding: str, generator, uniforms, amax):
    scale = e2m1_tensor_scale(amax)
    return E2M1.encode(x32 / scale, rounding, generator, uniforms), scale


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def _use_fast_path(backend: str, x: torch.Tensor, scheme: str, rounding: str, double_quant: bool,
                   nonfinite: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    from .kernels import FAST_QUANTIZE_SCHEMES, compile_works

    supported = scheme in FAST_QUANTIZE_SCHEMES and rounding == "nearest" and not double_quant and nonfinite == "raise"
    if backend == "compiled":
        if not supported:
            raise ValueError(f"backend='compiled' covers schemes {FAST_QUANTIZE_SCHEMES} with rounding='nearest', "
                             "no double_quant and nonfinite='raise'; use backend='auto' or 'reference' for the rest")
        return compile_works()
    if not supported or x.numel() < FAST_MIN_NUMEL:
        return False
    key = (scheme, tuple(x.shape), str(x.device), rounding)
    seen = _AUTO_SEEN.get(key, 0)
    _AUTO_SEEN[key] = seen + 1
    if seen < AUTO_COMPILE_AFTER or not compile_works():
        return False
    if seen == AUTO_COMPILE_AFTER:
        _log.info("quantize: compiling the fused %s kernel for shape %s (once per shape; the reference path served "
                  "the first call)", scheme, tuple(x.shape))
    return True


def quantize(
    x: torch.Tensor,
    scheme: str,
    *,
    block_size: Optional[int] = None,
    rounding: str = "nearest",
    generator: Optional[torch.Generator] = None,
    uniforms: Optional[torch.Tensor] = None,
    double_quant: bool = False,
    scale_rule: Optional[str] = None,
    tile: bool = False,
    nonfinite: str = "raise",
    backend: str = "auto",
    tensor_amax: Optional[torch.Tensor] = None,
) -> QuantizedTensor:
    """Quantize ``x`` to 4 bits with block scaling.

    Parameters
    ----------
    x:
        float32, float16 or bfloat16 tensor. Non-contiguous tensors are quantized in
        their logical (row-major) order. float64 and integer tensors raise
        ``TypeError``; empty tensors raise ``ValueError``.
    scheme:
        ``"bnb_fp4"``, ``"nf4"``, ``"mxfp4"``, ``"nvfp4"`` (see the module docs) or
        ``"e2m1_per_tensor"`` (E2M1 with one FP32 scale, amax / 6, for the whole
        tensor: the naive scheme of chapter 2 and of the ``fp4_naive`` recipe).
    block_size:
        bitsandbytes schemes: one of 32, 64 (default), ..., 4096; the flattened
        tensor may end in a partial block, and a 0-d tensor is one block of one.
        MXFP4 is fixed at 32 and NVFP4 at 16; their last axis must be a multiple of
        the block size (``ValueError`` otherwise).
    rounding:
        ``"nearest"`` or ``"stochastic"`` (see :meth:`ElementFormat.encode`).
    generator:
        ``torch.Generator`` for stochastic rounding.
    uniforms:
        Stochastic rounding: the uniform [0, 1) draws, float32 of ``x``'s shape,
        instead of ``generator`` (training uses :func:`fp4lib.rounding.cheap_uniform`).
    double_quant:
        bitsandbytes schemes only: quantize the absmax values to 8 bits in groups
        of 256 (bitsandbytes' ``compress_statistics=True``). The 4-bit codes,
        offset and second-level absmax equal bitsandbytes'; each 8-bit absmax code
        is the exact nearest entry of the dynamic map, whereas bitsandbytes' CPU
        search lands one entry off for roughly 0.1% of them.
    scale_rule:
        How block scales are chosen; ``None``: the standard rule. MXFP4:
        ``"floor"`` (OCP, the standard) or ``"ceil"`` (never clips). NVFP4:
        ``"nearest"`` (the standard), ``"up"`` (the E4M3 scale rounded up, so
        that no element exceeds 6 after scaling and stochastic rounding stays
        unbiased at block maxima) or ``"4over6"`` (four-over-six, see
        :func:`nvfp4_four_over_six`).
    tile:
        NVFP4 only: one scale per 16x16 tile of a 2-D tensor (for weights).
    nonfinite:
        ``"raise"`` (default): NaN/Inf raise ``ValueError`` naming the count and
        first index. ``"zero"``: they are quantized as 0 (counted in
        ``nonfinite_count``), so they neither poison their block nor its scale.
    tensor_amax:
        NVFP4 and the per-tensor scheme: the amax their per-tensor scale is
        computed from, instead of the tensor's own (a 0-d tensor, at least the
        tensor's own amax): under data parallelism, the maximum over a group of
        ranks, so that every rank quantizes with the same per-tensor scale.
    backend:
        ``"auto"`` (default): the compiled kernels of :mod:`fp4lib.kernels` for
        tensors of at least :data:`FAST_MIN_NUMEL` elements where they apply
        (round to nearest, no double quantization) and ``torch.compile`` works,
        from the second call with a shape on (:data:`AUTO_COMPILE_AFTER`; the
        first call does not wait for a compile), else this module's reference;
        ``"reference"``; ``"compiled"``. Every path gives the same bits.

    Returns
    -------
    QuantizedTensor

    Examples
    --------
    >>> import torch
    >>> from fp4lib import quantize
    >>> q = quantize(torch.tensor([[0.5, -1.0, 3.0, 12.0] * 8]), "mxfp4")
    >>> q.scale.view(torch.uint8).tolist()  # E8M0 code 128 = 2^1: amax 12 -> floor(log2 12) - 2
    [[128]]
    >>> q.dequantize()[0, :4].tolist()  # 0.5 / 2 = 0.25 is a tie between 0 and 0.5: to even, 0
    [0.0, -1.0, 3.0, 12.0]
    >>> quantize(torch.randn(4096), "nvfp4").bits_per_element
    4.5
    """
    _check_input(x, scheme, rounding, nonfinite)
    bs = _check_block_size(scheme, block_size)
    if double_quant and scheme not in _BNB_SCHEMES:
        raise ValueError(f"double_quant applies to 'bnb_fp4' and 'nf4' only, not {scheme!r}")
    scale_rule = resolve_scale_rule(scheme, scale_rule)
    if tensor_amax is not None and scheme not in ("nvfp4", PER_TENSOR):
        raise ValueError(f"tensor_amax sets a per-tensor scale: it applies to 'nvfp4' and {PER_TENSOR!r}, not {scheme!r}")
    if tile and scheme != "nvfp4":
        raise ValueError(f"tile applies to 'nvfp4' only, not {scheme!r}")
    if uniforms is not None:
        if rounding != "stochastic":
            raise ValueError("uniforms are the draws of stochastic rounding; pass rounding='stochastic'")
        if not torch.is_tensor(uniforms) or uniforms.shape != x.shape:
            raise ValueError(f"uniforms must be a tensor of x's shape {tuple(x.shape)}")
    if scheme in ("mxfp4", "nvfp4", PER_TENSOR) and x.dim() == 0:
        raise ValueError(f"{scheme} quantizes along the last axis; x is 0-d (pass x.reshape(1))")
    if scheme in ("mxfp4", "nvfp4"):
        if tile:
            if x.dim() != 2 or x.shape[0] % NVFP4_TILE or x.shape[1] % NVFP4_TILE:
                raise ValueError(f"tile=True needs a 2-D tensor with both sides multiples of 16, got shape {tuple(x.shape)}")
        elif x.shape[-1] % bs:
            raise ValueError(
                f"{scheme} needs the last axis to be a multiple of its block size {bs}, got shape {tuple(x.shape)} "
                f"(last axis {x.shape[-1]}); pad it, or use a bitsandbytes scheme, which allows a partial block"
            )

    x32 = x.contiguous().float()
    if tensor_amax is not None:
        tensor_amax = torch.as_tensor(tensor_amax, dtype=torch.float32, device=x32.device).reshape(())
        if bool(tensor_amax < x32.abs().max()):
            raise ValueError(f"tensor_amax {float(tensor_amax)} is below the tensor's own amax "
                             f"{float(x32.abs().max())}; it must be a maximum over a group that includes it")
    if tensor_amax is None and _use_fast_path(backend, x32, scheme, rounding, double_quant, nonfinite):
        from .kernels import quantize_packed

        q = quantize_packed(x32, scheme, block_size=bs, scale_rule=scale_rule, tile=tile, dtype=x.dtype)
        if q is not None:  # None: the input holds NaN or Inf, which the reference reports
            return q
    x32, nonfinite_count = _handle_nonfinite(x32, nonfinite)
    common = dict(shape=x.shape, dtype=x.dtype, scheme=scheme, block_size=bs, rounding=rounding,
                  nonfinite_count=nonfinite_count)
    if scheme in _BNB_SCHEMES:
        codes, absmax = _bnb_codes(x32, _ELEMENT_FORMAT[scheme], bs, rounding, generator, uniforms)
        if codes.numel() % 2:  # bitsandbytes pads with the code of 0.0 (7 in NF4)
            codes = torch.cat([codes, _ELEMENT_FORMAT[scheme].encode(torch.zeros(1, device=codes.device))])
        packed = pack_nibbles(codes, "high_first").unsqueeze(1)
        if double_quant:
            nested = _nested_quantize(absmax)
            return QuantizedTensor(packed=packed, scale=nested.codes, nested=nested, **common)
        return QuantizedTensor(packed=packed, scale=absmax, **common)
    if scheme == PER_TENSOR:
        amax = x32.abs().max() if tensor_amax is None else tensor_amax
        codes, scale = _per_tensor_codes(x32, rounding, generator, uniforms, amax)
        return QuantizedTensor(packed=pack_nibbles(codes, "low_first"), scale=scale, **common)
    if scheme == "mxfp4":
        codes, scale, clip = _mx_codes(x32, rounding, generator, uniforms, scale_rule)
        return QuantizedTensor(packed=pack_nibbles(codes, "low_first"), scale=scale, clip_fraction=clip, **common)
    amax = x32.abs().max() if tensor_amax is None else tensor_amax
    codes, s_dec_b, s_dec = _nvfp4_codes(x32, rounding, generator, uniforms, tile, scale_rule, amax)
    return QuantizedTensor(packed=pack_nibbles(codes, "low_first"), scale=s_dec_b, global_scale=s_dec, tile=tile,
                           **common)


def fake_quantize(x: torch.Tensor, scheme: str, *, axis: int = -1, factored: bool = False, **kwargs):
    """Quantize then dequantize: the values a 4-bit kernel would see.

    Same shape and dtype as ``x``. ``axis`` (MXFP4/NVFP4 without tiles; any axis
    for the per-tensor scheme) picks the axis the blocks run along, e.g. the
    reduction axis of a GEMM operand; ``uniforms`` (stochastic rounding) are given
    in ``x``'s layout. Other keyword arguments are those of :func:`quantize`.

    ``factored=True`` (MXFP4, NVFP4, per-tensor) returns the GEMM operand form
    instead, ``(values, tensor_scale)`` in float32 (see
    :meth:`QuantizedTensor.factored`): the dequantized tensor is
    ``values * tensor_scale``, where FP4 hardware applies ``tensor_scale`` to a
    GEMM's output.

    Examples
    --------
    >>> import torch
    >>> from fp4lib import fake_quantize
    >>> [round(v, 4) for v in fake_quantize(torch.tensor([1.0, 2.4, 2.6, -7.0] * 4), "nvfp4").tolist()[:4]]
    [1.1667, 2.3333, 2.3333, -7.0]
    >>> fake_quantize(torch.tensor([1.0, 2.4, 2.6, -7.0] * 4), "nvfp4")[3].item()  # the max is exact
    -7.0
    >>> values, scale = fake_quantize(torch.tensor([[0.3, -1.0, 2.9, 6.0]]), "e2m1_per_tensor", factored=True)
    >>> values.tolist(), scale.item()
    ([[0.5, -1.0, 3.0, 6.0]], 1.0)
    >>> fake_quantize(torch.tensor([1.0, 0.3, -2.0]), "fp8_e4m3").tolist()  # FP8 schemes too (see FP8_SCHEMES)
    [1.0, 0.2857142984867096, -2.0]
    """
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if scheme in FP8_SCHEMES:  # one scale per tensor: the axis does not matter
        extra = set(kwargs) - {"backend", "tensor_amax"}
        if extra:
            raise ValueError(f"{scheme} is round-to-nearest with one scale per tensor; it takes no {sorted(extra)}")
        values, s_dec = fp8_fake_quantize(x, scheme, kwargs.get("tensor_amax"))
        return (values, s_dec) if factored else (values * s_dec).to(x.dtype)
    moved = x
    if axis not in (-1, x.dim() - 1):
        if scheme not in ("mxfp4", "nvfp4", PER_TENSOR) or kwargs.get("tile"):
            raise ValueError("axis applies to 'mxfp4' and 'nvfp4' without tiles, and to 'e2m1_per_tensor'; "
                             "bitsandbytes blocks run over the flattened tensor")
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis} is out of range for a {x.dim()}-d tensor")
        moved = x.movedim(axis, -1)
        if kwargs.get("uniforms") is not None:
            kwargs["uniforms"] = kwargs["uniforms"].movedim(axis, -1)
    q = quantize(moved, scheme, **kwargs)
    if not factored:
        out = q.dequantize()
        return out if moved is x else out.movedim(-1, axis)
    values, tensor_scale = q.factored()
    return (values if moved is x else values.movedim(-1, axis)), tensor_scale
