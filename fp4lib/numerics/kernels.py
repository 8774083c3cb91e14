"""The fast paths: each reference operation written as one fused pass, compiled with ``torch.compile``.

Every kernel here computes the same bits as its reference and uses the same scale
arithmetic (:func:`fp4lib.numerics.scales.mx_scale_exponents`, :func:`~fp4lib.numerics.scales.nvfp4_block_scales`,
... are plain tensor operations that compile); what differs is only the shape of
the computation: one pass over the tensor instead of one tensor operation at a
time, rounding by comparisons and ``torch.round`` instead of ``bucketize``, and no copies.

* :func:`quantize_packed` -- ``quantize`` to packed codes and scales, for every
  scheme with round-to-nearest. :func:`fp4lib.quantize` calls it (``backend="auto"``,
  ``"fused"`` or ``"compiled"``); its reference is
  :func:`fp4lib.numerics.reference.quantize_reference`.
* :func:`fake_quantize_fused` -- the fake quantization of one 2-D GEMM operand for
  training, blocks along either axis, nearest or stochastic rounding (the draws
  from :func:`fp4lib.numerics.rounding.hash_uniform`), in two passes (block scales, then
  elementwise). :func:`fp4lib.training.operands.fake_quantize_operand` calls it; its
  reference is :func:`fp4lib.fake_quantize` with ``factored=True``.

What keeps the training kernel fast: blocks along axis 0 (the token axis of the
Wgrad GEMM) are a ``(rows // b, b, cols)`` view reduced over the middle axis, so no
transposed copy (four-over-six along the last axis on a CPU is the one case that makes
one, :func:`_across_blocks`, in a third compiled call, so that its error sums
vectorize); the stochastic-rounding draws are a hash computed in the kernel, so no
noise tensor and no generator state; and the block reductions and the elementwise work
are compiled as two kernels (fused into one loop nest they ran several times slower).

Compiling, and checking what was compiled before trusting it: :mod:`fp4lib.numerics.compiling`.
``tests/test_kernels.py`` checks every kernel against its reference bit for bit;
``benchmarks/quantize.py`` measures them.
"""

from __future__ import annotations

import functools
import math
import sys
import types
from typing import Callable, Optional, Tuple

import torch

from .constants import E2M1_MAX, E4M3_MAX, E8M0_EXP_BIAS, MX_BLOCK_SIZE, NVFP4_4OVER6_SCALE_MAX, NVFP4_BLOCK_SIZE, NVFP4_TILE
from .compiling import FLOAT8_SCHEMES, VerifiedCompiled, compile_kernel, compile_works, float8_compiles
from .formats import FORMATS
from .reference import quantize_reference
from .rounding import hash_uniform
from .scales import (
    bnb_scale_blocks,
    e2m1_tensor_scale,
    fp8_tensor_scale,
    mx_scale_exponents,
    nvfp4_block_scales,
    nvfp4_four_over_six,
    nvfp4_tensor_scale,
    pow2,
)
from .schemes import SCHEME_INFO, ScaleRule, resolve_nvfp4_options, resolve_scale_rule
from .tensor import QuantizedTensor

__all__ = ["quantize_packed", "fake_quantize_fused", "fake_quantize_compiled"]

# The schemes' records as plain constants, which the compiler folds into the kernels.
_FAMILY = {name: info.family for name, info in SCHEME_INFO.items()}
_FP8_DTYPE = {name: info.dtype for name, info in SCHEME_INFO.items() if info.family == "fp8"}
_BLOCK = {name: info.block_size for name, info in SCHEME_INFO.items() if info.axis_blocks}

# E2M1 round-to-nearest-even as threshold tests: (midpoint, step up, tie goes up?).
# A tie between grid points i and i+1 goes to the even code (bit 0 clear).
_E2M1_STEPS = (
    (0.25, 0.5, False),  # 0 | 0.5: tie to 0 (code 0b000)
    (0.75, 0.5, True),  # 0.5 | 1.0: tie to 1.0 (code 0b010)
    (1.25, 0.5, False),  # 1.0 | 1.5: tie to 1.0
    (1.75, 0.5, True),  # 1.5 | 2.0: tie to 2.0 (code 0b100)
    (2.5, 1.0, False),  # 2 | 3: tie to 2
    (3.5, 1.0, True),  # 3 | 4: tie to 4 (code 0b110)
    (5.0, 2.0, False),  # 4 | 6: tie to 4
)
_BINADE_2 = 2.0  # E2M1 spacing is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]
_BINADE_4 = 4.0
# ----------------------------------------------------------------------------
# E2M1 rounding by comparisons
# ----------------------------------------------------------------------------
def _e2m1_codes(s: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (sign bit | magnitude index) of float32 ``s``, round-to-nearest-even, saturating; uint8.

    The index is a sum of threshold tests, accumulated in float32 and the sign
    read from the bit pattern (so -0.0 keeps its sign, as ``torch.signbit``):
    both forms vectorize under inductor, where int32 accumulation and
    ``signbit`` ran about 5x slower.
    """
    m = s.abs()
    code = (s.view(torch.int32) < 0).to(torch.float32) * 8
    for mid, _, tie_up in _E2M1_STEPS:
        code = code + ((m >= mid) if tie_up else (m > mid)).to(torch.float32)
    return code.to(torch.uint8)


def _round_nearest(s: torch.Tensor) -> torch.Tensor:
    """E2M1 round-to-nearest-even of float32 ``s`` (saturating at 6); values, not codes.

    Within each binade of the E2M1 grid (spacing 0.5 below 2, 1 in [2, 4), 2 in
    [4, 6]) the grid points are the integer multiples of the spacing, so the
    nearest one is ``round(m / step) * step``: ``torch.round`` rounds ties to
    even, and an even multiple of the step is the even code at every midpoint of
    :data:`_E2M1_STEPS` (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
    3.5 -> 4, 5 -> 4). Scaling by the power of two is exact, a magnitude just below
    2 or 4 rounds up to the next binade's first point, and ``m`` is clamped to 6
    first; NaN gives a signed zero as the threshold tests did. The same bits as
    summing the threshold tests of :data:`_E2M1_STEPS` for every float32 input
    (checked exhaustively), in about a third of the operations.
    """
    m = s.abs().clamp(max=E2M1_MAX)
    small, middle = m < _BINADE_2, m < _BINADE_4
    inv = torch.where(small, 2.0, torch.where(middle, 1.0, 0.5))
    step = torch.where(small, 0.5, torch.where(middle, 1.0, 2.0))
    q = torch.round(m * inv) * step
    return torch.copysign(torch.where(m == m, q, 0.0), s)


# Round-to-nearest-even to a multiple of E2M1's spacing in each binade by adding and
# subtracting 1.5 * 2**23 times the spacing: the sum's last bit is then worth the spacing.
_SHIFT_SMALL, _SHIFT_MIDDLE, _SHIFT_LARGE = 1.5 * 2.0**23 * 0.5, 1.5 * 2.0**23, 1.5 * 2.0**23 * 2.0


def _round_magnitude(m: torch.Tensor) -> torch.Tensor:
    """E2M1 round-to-nearest-even of nonnegative float32 ``m`` (saturating at 6), for
    four-over-six's errors, which need only magnitudes: the bits of :func:`_round_nearest`
    for +0 and every positive ``m`` (checked for all of them), NaN staying NaN (and -0 giving +0).

    ``m`` clamped to 6, plus a shift ``1.5 * 2**23 * step`` (``step`` the grid spacing of
    ``m``'s binade: 0.5, 1 or 2) lies in the binade whose unit in the last place is
    ``step``, so the float32 addition rounds ``m`` to the nearest multiple of ``step``,
    ties to even (the shift is an even multiple of ``step``), and subtracting the shift is
    exact. About half the operations of :func:`_round_nearest` (no sign, no NaN case, one
    selected constant instead of two).
    """
    m = m.clamp(max=E2M1_MAX)
    shift = torch.where(m < _BINADE_2, _SHIFT_SMALL, torch.where(m < _BINADE_4, _SHIFT_MIDDLE, _SHIFT_LARGE))
    shift = shift.to(m.dtype)  # the sum must round in m's precision, whatever torch's default dtype
    return (m + shift) - shift


def _round_stochastic(s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """E2M1 stochastic rounding of float32 ``s`` with uniforms ``u``; values, not codes.

    The magnitude, clamped to [0, 6], lies between grid points ``lo`` and
    ``lo + step`` and goes up when ``u < (m - lo) / step``: exactly the rule of
    :func:`fp4lib.numerics.rounding.stochastic_round_index` (every operation here is exact).
    The divisions by ``step`` are multiplications by its reciprocal ``inv``, a power of
    two, which give the same bits: ``m * 2`` (below 2) cannot overflow, ``m * 0.5`` (from
    4) and ``(m - lo) * 0.5`` (a multiple of ``2**-21`` there) cannot underflow, so every
    product is the exact quotient.
    """
    m = s.abs().clamp(max=E2M1_MAX)
    small, middle = m < _BINADE_2, m < _BINADE_4
    inv = torch.where(small, 2.0, torch.where(middle, 1.0, 0.5))
    step = torch.where(small, 0.5, torch.where(middle, 1.0, 2.0))
    lo = torch.floor(m * inv) * step
    p_up = (m - lo) * inv
    q = lo + torch.where(u < p_up, step, 0.0)
    return torch.copysign(q, s)


def _pack_pairs(codes: torch.Tensor, low_first: bool = True) -> torch.Tensor:
    """uint8 4-bit codes (last axis even) packed two per byte: element 2i in the
    low nibble (``low_first``, the OCP/torch layout) or the high one (bitsandbytes).

    On a little-endian machine a pair of bytes read as one int16 holds element
    2i in its low byte, so packing is masks and shifts over contiguous memory
    (the strided pair gather it replaces ran several times slower).
    """
    if sys.byteorder == "little":
        v = codes.view(torch.int16)
        if low_first:
            return ((v & 0xF) | ((v >> 4) & 0xF0)).to(torch.uint8)
        return (((v & 0xF) << 4) | ((v >> 8) & 0xF)).to(torch.uint8)
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    first, second = pairs[..., 0], pairs[..., 1]
    return (second << 4) | first if low_first else (first << 4) | second


# ----------------------------------------------------------------------------
# quantize -> packed codes and scales
# ----------------------------------------------------------------------------
def _bnb_packed(a: torch.Tensor, mids: Tuple[float, ...], order: torch.Tensor):
    """a: (blocks, block_size) float32 -> (packed (blocks * block_size / 2,), absmax (blocks,), finite)."""
    scaled, absmax = bnb_scale_blocks(a)
    # bucketize(right=False) == number of midpoints strictly below the value.
    # (Counted in float32: int32 counts did not vectorize under inductor.)
    idx = (scaled > mids[0]).to(torch.float32)
    for m in mids[1:]:
        idx = idx + (scaled > m).to(torch.float32)
    codes = order[idx.to(torch.int64)].to(torch.uint8)
    return _pack_pairs(codes, low_first=False).reshape(-1), absmax, torch.isfinite(absmax).all()


def _nvfp4_scales(v: torch.Tensor, amax_b: torch.Tensor, dims, amax: torch.Tensor, rule: str,
                  formula: str = "te2025", metric: str = "mse"):
    """NVFP4 ``(s_dec_b, s_enc_b, s_dec)`` of the block view ``v`` under scale ``rule``
    (``amax_b``: the block maxima, kept as size-1 axes over ``dims``; a tile's ``dims``
    are its rows, then its columns) and ``formula``/``metric`` (see :func:`nvfp4_four_over_six`)."""
    four_six = rule == ScaleRule.FOUR_OVER_SIX
    s_enc, s_dec = nvfp4_tensor_scale(amax, NVFP4_4OVER6_SCALE_MAX if four_six else E4M3_MAX)
    if four_six:
        s_dec_b, s_enc_b = nvfp4_four_over_six(v, amax_b, s_enc, s_dec, dims, _round_magnitude, metric, formula, amax)
    else:
        s_dec_b, s_enc_b = nvfp4_block_scales(amax_b, s_enc, s_dec, rule, formula=formula)
    return s_dec_b, s_enc_b, s_dec


def _e2m1_packed(x: torch.Tensor, scheme: str, scale_rule: str, tile: bool, formula: str = "te2025",
                 metric: str = "mse"):
    """x: (rows, cols) float32 -> (packed, scale, tensor_scale, clipped blocks, finite)."""
    rows, cols = x.shape
    amax = x.abs().amax()
    finite = torch.isfinite(amax)
    zero = torch.zeros((), dtype=torch.int64, device=x.device)
    if _FAMILY[scheme] == "tensor":
        scale = e2m1_tensor_scale(amax)
        scaled = x / scale
        return _pack_pairs(_e2m1_codes(scaled)), scale, scale, zero, finite
    if _FAMILY[scheme] == "mx":
        v = x.view(rows, cols // MX_BLOCK_SIZE, MX_BLOCK_SIZE)
        amax_b = v.abs().amax(dim=-1)
        e = mx_scale_exponents(amax_b, scale_rule)
        inv = pow2(-e)
        scaled = (v * inv.unsqueeze(-1)).view(rows, cols)
        clipped = ((amax_b * inv > E2M1_MAX) & (amax_b > 0)).sum()
        return (_pack_pairs(_e2m1_codes(scaled)), (e + E8M0_EXP_BIAS).to(torch.uint8),
                amax, clipped, finite)
    if tile:
        v = x.view(rows // NVFP4_TILE, NVFP4_TILE, cols // NVFP4_TILE, NVFP4_TILE)
        dims = (1, 3)
    else:
        v = x.view(rows, cols // NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)
        dims = (2,)
    s_dec_b, s_enc_b, s_dec = _nvfp4_scales(v, v.abs().amax(dim=dims, keepdim=True), dims, amax, scale_rule,
                                            formula, metric)
    scaled = (v * s_enc_b).view(rows, cols)
    s_dec_b = s_dec_b.reshape(rows // NVFP4_TILE, cols // NVFP4_TILE) if tile else s_dec_b.squeeze(-1)
    packed = _pack_pairs(_e2m1_codes(scaled))
    return packed, s_dec_b.to(torch.float8_e4m3fn), s_dec, zero, finite


@functools.lru_cache(maxsize=None)
def _verified(name: str) -> VerifiedCompiled:
    # bitsandbytes' blocks: one kernel for every block count. The E2M1 schemes: the
    # first shape compiled statically (twice as fast here), later shapes dynamically.
    fn, dynamic, valid = {"bnb": (_bnb_packed, True, 2), "e2m1": (_e2m1_packed, None, 4)}[name]
    return VerifiedCompiled(fn, compile_kernel(fn, dynamic=dynamic), valid_output=valid)


def quantize_packed(x32: torch.Tensor, scheme: str, *, block_size: int, scale_rule: Optional[str] = None,
                    tile: bool = False, dtype: torch.dtype = torch.float32, compiled: bool = True,
                    formula: Optional[str] = None, metric: Optional[str] = None) -> Optional[QuantizedTensor]:
    """:func:`fp4lib.quantize` with round-to-nearest, as fused passes (compiled, or eagerly
    with ``compiled=False``); the same bits.

    ``x32``: contiguous float32, already checked by ``quantize``. Returns the
    :class:`QuantizedTensor` (``dtype`` recorded as the original's), or ``None``
    when the tensor holds NaN or Inf (the reference then raises its detailed
    error), or when the case is one the kernels do not cover (a tensor with fewer
    than one full bitsandbytes block, or a per-tensor tensor with an odd last axis).
    ``formula``, ``metric``: NVFP4's arithmetic (:func:`fp4lib.quantize`).
    """
    shape = x32.shape
    scale_rule = resolve_scale_rule(scheme, scale_rule)
    formula, metric = resolve_nvfp4_options(scheme, formula, metric)
    common = dict(shape=shape, dtype=dtype, scheme=scheme, block_size=block_size, rounding="nearest")
    label = f"compiled quantize ({scheme}, {x32.device.type})"
    family = _FAMILY[scheme]
    if family == "absmax":
        flat = x32.reshape(-1)
        n = flat.numel()
        full = n - n % block_size
        if full == 0:
            return None
        if full < n and not bool(torch.isfinite(flat[full:]).all()):
            return None
        fmt = FORMATS[SCHEME_INFO[scheme].element]
        mids = tuple(float(m) for m in fmt._midpoints)
        order = fmt._on(flat.device, "_order")
        blocks = flat[:full].reshape(-1, block_size)
        if compiled:
            packed, absmax, finite = _verified("bnb").call(("bnb", scheme, block_size, flat.device.type), label,
                                                           blocks, mids, order)
        else:
            packed, absmax, finite = _bnb_packed(blocks, mids, order)
        if not bool(finite):
            return None
        if full < n:
            tail = quantize_reference(flat[full:], scheme, block_size=block_size)
            packed = torch.cat([packed, tail.packed.reshape(-1)])
            absmax = torch.cat([absmax, tail.scale])
        return QuantizedTensor(packed=packed.unsqueeze(1), scale=absmax, **common)
    if x32.dim() == 0 or shape[-1] % 2:
        return None
    x2 = x32.reshape(-1, shape[-1])
    key = ("e2m1", scheme, scale_rule, tile, formula, metric, tuple(x2.shape), x32.device.type)
    kernel = _verified("e2m1")
    if not compiled or (scheme in FLOAT8_SCHEMES and not float8_compiles(x32.device)):
        packed, scale, tensor_scale, clipped, finite = kernel.fn(x2, scheme, scale_rule, tile, formula, metric)
    else:
        packed, scale, tensor_scale, clipped, finite = kernel.call(key, label, x2, scheme, scale_rule, tile, formula,
                                                                   metric)
    if not bool(finite):
        return None
    packed = packed.reshape(*shape[:-1], shape[-1] // 2)
    if family == "tensor":
        return QuantizedTensor(packed=packed, scale=scale, **common)
    if family == "mx":
        n_blocks = scale.numel()
        scale = scale.reshape(*shape[:-1], shape[-1] // MX_BLOCK_SIZE).view(torch.float8_e8m0fnu)
        return QuantizedTensor(packed=packed, scale=scale, clip_fraction=float(clipped) / n_blocks, **common)
    scale = scale if tile else scale.reshape(*shape[:-1], shape[-1] // NVFP4_BLOCK_SIZE)
    return QuantizedTensor(packed=packed, scale=scale, global_scale=tensor_scale, tile=tile, **common)


# ----------------------------------------------------------------------------
# Training: the fake quantization of one 2-D GEMM operand
# ----------------------------------------------------------------------------
def _operand_blocks(x: torch.Tensor, axis: int, block: int, tile: bool):
    rows, cols = x.shape
    if tile:
        return x.view(rows // NVFP4_TILE, NVFP4_TILE, cols // NVFP4_TILE, NVFP4_TILE), (1, 3)
    if axis == 1:
        return x.view(rows, cols // block, block), (2,)
    return x.view(rows // block, block, cols), (1,)


_GROUP = 16  # blocks transposed together by _across_blocks: 16 lanes, an AVX-512 register of float32


def _across_blocks(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` in NVFP4 blocks along x's last axis, every 16 neighbouring blocks transposed.

    Shape ``(x.numel() // 256, 16, 16)``: element ``i`` of block ``16 * g + j`` (blocks
    numbered in memory order) sits at ``[g, i, j]``. A block's elements then run along
    the middle axis, as blocks along axis 0 do, and a per-block sum over them runs in
    vector registers across 16 blocks, in the block's own element order. Along the last
    axis, a sum over a block's 16 elements one after another is a scalar loop per block
    (Inductor's C++ code does not vectorize the stride-16 reads). Four-over-six's block
    scales, whose error sums have a fixed order, took about 52 to 64% of the time from
    this copy, the copy included (4096 x 128 to 4096 x 512, one thread). It is made by its own
    compiled call: inside one graph, Inductor folds the transposition back into the sums'
    reads."""
    return x.reshape(-1, _GROUP, NVFP4_BLOCK_SIZE).abs().transpose(1, 2).contiguous()


def _stage_scales(x: torch.Tensor, scheme: str, axis: int, tile: bool, scale_rule: str, tensor_amax=None,
                  formula: str = "te2025", metric: str = "mse", across: Optional[torch.Tensor] = None):
    """Stage 1 (reductions): ``(enc, dec_block, dec_tensor, finite)`` for :func:`_stage_apply`.

    Per-tensor: ``enc = dec_block = amax / 6`` (x is divided by it). FP8: the
    tensor's ``s_enc`` and ``s_dec``. MXFP4: ``2^-e`` and ``2^e`` per block. NVFP4:
    ``s_enc_b``, ``s_dec_b`` per block (under ``scale_rule``) and the tensor's ``s_dec``.
    ``tensor_amax``: a group's amax for the per-tensor scale instead of x's own. Block tensors have the block view's shape with the
    reduced axes kept as size 1. ``finite``: 0-d bool, False when x holds NaN/Inf.
    ``across``: for NVFP4 blocks along axis 1 (not tiles), x's magnitudes as
    :func:`_across_blocks` lays them out, to compute the scales from instead of x's
    blocks: the same operations on the same values in the same order.
    """
    family = _FAMILY[scheme]
    if across is not None and (family != "nv" or axis != 1 or tile):
        raise ValueError("across: only for NVFP4 blocks along axis 1, without tiles")
    if family in ("tensor", "fp8"):
        amax = x.abs().amax()
    else:  # the block maxima first; the tensor's is their maximum (the same value, one pass fewer over x)
        if across is not None:
            v, dims = across, (1,)
        else:
            v, dims = _operand_blocks(x, axis, _BLOCK[scheme], tile)
        amax_b = v.abs().amax(dim=dims, keepdim=True)
        amax = amax_b.amax()
    finite = torch.isfinite(amax)
    if tensor_amax is not None:
        amax = tensor_amax
        finite = finite & torch.isfinite(amax)
    if family == "tensor":
        scale = e2m1_tensor_scale(amax)
        return scale, scale, None, finite
    if family == "fp8":
        s_enc, s_dec = fp8_tensor_scale(amax, scheme)
        return s_enc, None, s_dec, finite
    if family == "mx":
        e = mx_scale_exponents(amax_b, scale_rule)
        return pow2(-e), pow2(e), None, finite
    s_dec_b, s_enc_b, s_dec = _nvfp4_scales(v, amax_b, dims, amax, scale_rule, formula, metric)
    if across is not None:  # (groups, 1, 16) -> the block view's (rows, cols // 16, 1): the same memory order
        rows, cols = x.shape
        s_enc_b, s_dec_b = (t.reshape(rows, cols // NVFP4_BLOCK_SIZE, 1) for t in (s_enc_b, s_dec_b))
    return s_enc_b, s_dec_b, s_dec, finite


def _stage_apply(x: torch.Tensor, enc, dec_block, dec_tensor, finite, seed_t, scheme: str, axis: int,
                 rounding: str, tile: bool):
    """Stage 2 (elementwise): scale, round, decode; NaN everywhere unless ``finite``.

    Returns ``(values, tensor_scale)``: each E2M1 value times its block's decode
    scale, and the per-tensor decode scale (``None`` for MXFP4), which the GEMM
    applies to its output.
    """
    rows, cols = x.shape
    family = _FAMILY[scheme]
    if family == "fp8":  # round-to-nearest-even by the cast (stochastic rounding is not offered)
        q = (x * enc).to(_FP8_DTYPE[scheme]).to(torch.float32)
        return torch.where(finite, q, float("nan")), dec_tensor
    if family == "tensor":
        scaled = x / enc
    else:
        block = _BLOCK[scheme]
        scaled = _operand_blocks(x, axis, block, tile)[0] * enc
    if rounding == "stochastic":
        index = torch.arange(rows * cols, device=x.device, dtype=torch.int32).view(rows, cols)
        if family != "tensor":
            index = _operand_blocks(index, axis, block, tile)[0]
        q = _round_stochastic(scaled, hash_uniform(index, seed_t))
    else:
        q = _round_nearest(scaled)
    if family == "tensor":
        return torch.where(finite, q, float("nan")), dec_block
    out = q * dec_block  # exact: an E2M1 value times an E8M0 or E4M3 scale
    return torch.where(finite, out.reshape(rows, cols), float("nan")), dec_tensor


def fake_quantize_fused(
    x: torch.Tensor,
    seed_t: torch.Tensor,
    scheme: str,
    axis: int,
    rounding: str,
    tile: bool = False,
    scale_rule: Optional[str] = None,
    tensor_amax: Optional[torch.Tensor] = None,
    formula: Optional[str] = None,
    metric: Optional[str] = None,
    *,
    stages=None,
):
    """Fake-quantize a 2-D float32 operand in two passes: block scales, then elementwise.

    Parameters
    ----------
    x:
        float32, shape ``(rows, cols)``, contiguous, fewer than 2**31 elements.
    seed_t:
        :func:`fp4lib.numerics.rounding.seed_term` of the stochastic-rounding seed (ignored
        for ``"nearest"``): element ``(i, j)`` draws ``hash_uniform(i * cols + j, seed_t)``.
    scheme:
        ``"e2m1_per_tensor"``, ``"mxfp4"``, ``"nvfp4"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
    axis:
        0 or 1: the axis the blocks run along (the GEMM's reduction axis).
    rounding:
        ``"nearest"`` (ties to even) or ``"stochastic"``.
    tile, scale_rule:
        NVFP4 16x16 tiles; the scale rule (:func:`fp4lib.numerics.schemes.resolve_scale_rule`):
        MXFP4 ``"floor"`` or ``"ceil"``, NVFP4 ``"nearest"``, ``"up"`` or ``"4over6"``.
    tensor_amax:
        0-d float32: the amax the per-tensor scale is computed from instead of x's
        own (a group's, under data parallelism; see :func:`fp4lib.quantize`).
    formula, metric:
        NVFP4's block-scale arithmetic and four-over-six's error (``None``: the
        defaults, ``"te2025"`` and ``"mse"``; see :func:`fp4lib.quantize`).
    stages:
        ``(scales_fn, apply_fn)`` to run instead of the two eager stages (the
        compiled ones, see :func:`fake_quantize_compiled`).

    Returns
    -------
    (torch.Tensor, torch.Tensor or None)
        ``(values, tensor_scale)``, bit for bit
        ``fp4lib.fake_quantize(x, scheme, axis=axis, factored=True, ...)``:
        float32 ``(rows, cols)``, each E2M1 value times its block's decode scale,
        and the 0-d per-tensor decode scale (``None`` for MXFP4). Any NaN or +-Inf
        in ``x`` makes every value NaN (as a GEMM on it would be).

    Examples
    --------
    >>> import torch
    >>> from fp4lib.numerics.rounding import seed_term
    >>> x = torch.tensor([[0.3, -1.0, 2.9, 6.0] * 4])
    >>> values, scale = fake_quantize_fused(x, seed_term(0), "e2m1_per_tensor", 1, "nearest")
    >>> values[0, :4].tolist(), scale.item()  # E2M1 values; one scale, amax / 6
    ([0.5, -1.0, 3.0, 6.0], 1.0)
    """
    if x.numel() >= 2**31:
        raise ValueError(f"x has {x.numel()} elements; the fused path indexes them with int32 (< 2**31)")
    scale_rule = resolve_scale_rule(scheme, scale_rule)
    formula, metric = resolve_nvfp4_options(scheme, formula, metric)
    scales_fn, apply_fn = stages or (_stage_scales, _stage_apply)
    enc, dec_block, dec_tensor, finite = scales_fn(x, scheme, axis, tile, scale_rule, tensor_amax, formula, metric)
    return apply_fn(x, enc, dec_block, dec_tensor, finite, seed_t, scheme, axis, rounding, tile)


# Stage 1 keeps every intermediate read more than once in memory: the block scales
# (and four-over-six's two candidates) are then computed once per block, in a
# vectorized loop over the blocks, instead of again, scalar, inside each loop over
# the elements that reads them. The same operations on the same values: only where
# results live changes. (Not for stage 2, where it would store the scaled operand.)
_SCALES_OPTIONS = {"realize_reads_threshold": 1}
# Stage 2 keeps everything in one loop nest: without this, Inductor stores the
# stochastic-rounding decision (a long chain: the hash, then the rounding) in memory
# and reads it back in a second loop, which ran several times slower on a CPU.
_APPLY_OPTIONS = {"realize_opcount_threshold": 1000}


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own (a copy of ``fn.__code__``).

    ``torch.compile`` keeps a function's compiled specializations on its code object
    and, on every call, checks their guards one entry after another until one
    matches. The training kernel compiles a copy of each stage per combination of
    the arguments that stage depends on (spec and shape), so that each call checks a
    single entry."""
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    return functools.update_wrapper(own, fn)


class _CompiledFakeQuantize:
    """:func:`fake_quantize_fused` with both stages compiled, verified per spec, shape and device.

    Each operand shape is its own static specialisation (a recipe needs a few
    dozen): dynamic shapes compiled no faster here and ran the nvfp4 step about 2x
    slower. Each stage is compiled as copies with code objects of their own
    (:func:`_own_code`), one per combination of the arguments that stage depends on.
    With one compiled function per stage, a training step's guard lookups took 44 to
    74 microseconds per compiled call on a CPU, passing over the other
    specializations' entries first; with the copies 23 to 35.
    """

    def __init__(self):
        self.kernel = VerifiedCompiled(fake_quantize_fused, None)  # each call passes its specialization's own
        self.compiled = {}  # call key -> fake_quantize_fused with that specialization's compiled stages
        self.copies = {}  # (stage name, what the stage depends on) -> a compiled copy of the stage

    def _copy(self, fn: Callable, key: tuple, options: Optional[dict] = None) -> Callable:
        found = self.copies.get((fn.__name__, key))
        if found is None:
            found = self.copies[(fn.__name__, key)] = compile_kernel(_own_code(fn), dynamic=False, options=options)
        return found

    def _stages(self, scheme: str, axis: int, rounding: str, tile: bool, scale_rule: Optional[str], group_amax: bool,
                formula: str, metric: str, shape: tuple, device: torch.device):
        where = (shape, device.type)
        scales = self._copy(_stage_scales, (scheme, axis, tile, scale_rule, group_amax, formula, metric) + where,
                            _SCALES_OPTIONS)
        apply = self._copy(_stage_apply, (scheme, axis, rounding, tile) + where, _APPLY_OPTIONS)
        # Four-over-six along the last axis on a CPU: its error sums from a transposed copy
        # (see _across_blocks). A GPU keeps the plain block view, the formulation that
        # the GPU check ran.
        if (scale_rule == ScaleRule.FOUR_OVER_SIX and axis == 1 and not tile and device.type == "cpu"
                and math.prod(shape) % (_GROUP * NVFP4_BLOCK_SIZE) == 0):
            across = self._copy(_across_blocks, where)
            return (lambda x, *rest: scales(x, *rest, across(x))), apply
        return scales, apply

    def __call__(self, x, seed_t, scheme, axis, rounding, tile=False, scale_rule=None, tensor_amax=None, formula=None,
                 metric=None):
        if scheme in FLOAT8_SCHEMES and not float8_compiles(x.device):  # the fused formulation, eagerly
            return fake_quantize_fused(x, seed_t, scheme, axis, rounding, tile, scale_rule, tensor_amax, formula,
                                       metric)
        key = (scheme, axis, rounding, tile, scale_rule, tensor_amax is not None, formula, metric, tuple(x.shape),
               x.device.type)
        compiled = self.compiled.get(key)
        if compiled is None:  # the stages see the resolved rule and options, as fake_quantize_fused passes them
            stages = self._stages(scheme, axis, rounding, tile, resolve_scale_rule(scheme, scale_rule),
                                  tensor_amax is not None, *resolve_nvfp4_options(scheme, formula, metric),
                                  tuple(x.shape), x.device)
            compiled = self.compiled[key] = functools.partial(fake_quantize_fused, stages=stages)
        label = (f"FP4 fake quantization (scheme={scheme}, block axis {axis}, rounding={rounding}, tile={tile}, "
                 f"scale_rule={scale_rule}, formula={formula}, metric={metric}, shape {tuple(x.shape)} on "
                 f"{x.device.type})")
        return self.kernel.call(key, label, x, seed_t, scheme, axis, rounding, tile, scale_rule, tensor_amax, formula,
                                metric, compiled=compiled)


@functools.lru_cache(maxsize=None)
def fake_quantize_compiled() -> Callable:
    """:func:`fake_quantize_fused` with both stages under ``torch.compile``, each
    specialization verified against the eager stages on its first call; or the
    eager function (with a warning from :func:`compile_works`) where compiling
    does not work here.

    The first call for each operand shape and spec compiles (seconds on a CPU;
    inductor caches the kernels on disk for later processes).
    """
    if not compile_works():
        return fake_quantize_fused
    return _CompiledFakeQuantize()
