"""The fake-quantize fast path for FP4 training: a fused, compilable formulation.

Simulated FP4 training (chapter 4) spends all its extra time in
quantize -> dequantize ("fake quant") of the GEMM operands; the GEMMs themselves are
unchanged. :func:`fake_quant_fused` writes the whole of it -- amax, scales,
rounding (nearest or stochastic), decode -- as block reductions plus elementwise
operations that ``torch.compile`` turns into two loop nests per operand. What
keeps it fast:

* **Blocks along any axis without a copy.** A 2-D operand ``(rows, cols)`` blocked
  along axis 0 (the token axis of the Wgrad GEMM) is viewed as
  ``(rows // b, b, cols)`` and reduced over the middle axis; no transposed copy.
* **Stochastic-rounding noise from a hash.** The uniform draw for element ``i``
  is :func:`fp4lib.rounding.cheap_uniform`'s integer hash of ``(seed, i)``,
  computed inside the kernel in 32-bit arithmetic: no random-number state, no
  noise tensor in memory, and the reference path recomputes the same draws.
* **Two passes.** The block reductions (amax, scales) and the elementwise work
  (scale, round, decode) are compiled as two kernels; fused into one loop nest
  they ran several times slower.
* **Rounding by comparisons.** E2M1 round-to-nearest-even is a sum of seven
  threshold tests; stochastic rounding is a floor on a power-of-two step.

The slow, obviously-correct reference is :func:`fp4lib.nn.reference_fake_quant`
(which calls :func:`fp4lib.quantize`); ``tests/test_nn.py`` checks that this path
(eager and compiled) equals it bit for bit, and ``benchmarks/train_step.py`` that
whole training steps do.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import torch

from .constants import E2M1_MAX, E4M3_MAX, FLOAT32_MAX, MX_BLOCK_SIZE, NVFP4_BLOCK_SIZE, NVFP4_TILE

__all__ = ["BACKENDS", "fake_quant_fused", "hash_uniform", "seed_term", "compiled_fake_quant", "compile_works"]

BACKENDS = ("reference", "fused", "compiled")
"""Ways to run an operand's fake quantization: the core-based reference, this
module's fused formulation run eagerly, or the same compiled by ``torch.compile``."""

# The hash constants of fp4lib.rounding.cheap_uniform ("lowbias32" finaliser).
_GOLDEN = 0x9E3779B1
_SEED_MUL = 0x85EBCA77
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B
_MASK32 = 0xFFFFFFFF
_U24 = 1.0 / (1 << 24)  # the top 24 bits of the hash become the float

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
PER_TENSOR = "e2m1_per_tensor"


def seed_term(seed: int) -> torch.Tensor:
    """The seed's share of the hash, ``seed * 0x85EBCA77 mod 2**32``, as an int32 0-d tensor.

    Computed once per call in Python, so that the kernel is not re-specialised
    for every step's seed and needs no 64-bit multiplies.
    """
    t = (int(seed) * _SEED_MUL) & _MASK32
    return torch.tensor(t - (1 << 32) if t >= (1 << 31) else t, dtype=torch.int32)


def _wrap32(c: int) -> int:
    """A 32-bit constant as the int32 with the same bits."""
    return c - (1 << 32) if c >= (1 << 31) else c


def hash_uniform(index: torch.Tensor, seed_t: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 draws for int32 element indices, equal to ``cheap_uniform``'s.

    ``index``: int32 tensor of flat element indices (any shape, values below
    2**31); ``seed_t``: :func:`seed_term` of the seed. The hash of
    :func:`fp4lib.rounding.cheap_uniform` in wrapping 32-bit integer arithmetic
    (logical shifts written as arithmetic shifts plus masks), which vectorizes
    on CPUs without 64-bit multiplies and fuses into the kernel that uses the draws.

    Examples
    --------
    >>> import torch
    >>> from fp4lib.rounding import cheap_uniform
    >>> idx = torch.arange(8, dtype=torch.int32)
    >>> torch.equal(hash_uniform(idx, seed_term(5)), cheap_uniform((8,), 5))
    True
    """
    h = index * _wrap32(_GOLDEN) + seed_t
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _wrap32(_MUL1)
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _wrap32(_MUL2)
    h = h ^ ((h >> 16) & 0xFFFF)
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * _U24


def _round_nearest(s: torch.Tensor) -> torch.Tensor:
    """E2M1 round-to-nearest-even of float32 ``s`` (saturating at 6); values, not codes."""
    m = s.abs()
    q = torch.zeros_like(m)
    for mid, step, tie_up in _E2M1_STEPS:
        q = q + ((m >= mid) if tie_up else (m > mid)).to(m.dtype) * step
    return torch.copysign(q, s)


def _round_stochastic(s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """E2M1 stochastic rounding of float32 ``s`` with uniforms ``u``; values, not codes.

    The magnitude, clamped to [0, 6], lies between grid points ``lo`` and
    ``lo + step`` and goes up when ``u < (m - lo) / step``: exactly the rule of
    :func:`fp4lib.rounding.stochastic_round_index` (every operation here is exact).
    """
    m = s.abs().clamp(max=E2M1_MAX)
    step = torch.where(m < _BINADE_2, 0.5, torch.where(m < _BINADE_4, 1.0, 2.0))
    lo = torch.floor(m / step) * step
    p_up = (m - lo) / step
    q = lo + torch.where(u < p_up, step, 0.0)
    return torch.copysign(q, s)


def _pow2_bits(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2**e`` for int32 ``e`` in [-126, 127], built from its bits."""
    return ((e + 127) << 23).to(torch.int32).view(torch.float32)


def _block_view(x: torch.Tensor, axis: int, block: int, tile: bool):
    rows, cols = x.shape
    if tile:
        return x.view(rows // NVFP4_TILE, NVFP4_TILE, cols // NVFP4_TILE, NVFP4_TILE), (1, 3)
    if axis == 1:
        return x.view(rows, cols // block, block), (2,)
    return x.view(rows // block, block, cols), (1,)


def _stage_scales(x: torch.Tensor, scheme: str, axis: int, tile: bool, scale_rule: str):
    """Stage 1 (reductions): ``(enc, dec_block, dec_tensor, finite)`` for :func:`_stage_apply`.

    Per-tensor: ``enc = dec_block = amax / 6`` (x is divided by it). MXFP4:
    ``2^-e`` and ``2^e`` per block. NVFP4: ``s_enc_b``, ``s_dec_b`` per block and
    the tensor's ``s_dec``. Block tensors have the block view's shape with the
    reduced axes kept as size 1. ``finite``: 0-d bool, False when x holds NaN/Inf.
    """
    amax = x.abs().amax()
    finite = torch.isfinite(amax)
    if scheme == PER_TENSOR:
        scale = torch.where(amax > 0, amax / E2M1_MAX, 1.0)
        return scale, scale, None, finite
    block = MX_BLOCK_SIZE if scheme == "mxfp4" else NVFP4_BLOCK_SIZE
    v, dims = _block_view(x, axis, block, tile)
    amax_b = v.abs().amax(dim=dims, keepdim=True)
    if scheme == "mxfp4":
        # floor(log2(amax_b)) from the float32 exponent field; subnormal and zero
        # blocks come out below -127 and are clamped, as with frexp.
        e = ((amax_b.view(torch.int32) >> 23) & 0xFF) - 127 - 2
        e = e.clamp(-127, 127)
        if scale_rule == "ceil":
            e = e + (amax_b * _pow2_bits(-e) > E2M1_MAX).to(torch.int32)
        e = torch.where(amax_b > 0, e, -127).clamp(-127, 127)
        return _pow2_bits(-e), _pow2_bits(e + 1) * 0.5, None, finite  # 2^-e, 2^e (down to 2^-127)
    # A true division, as scaling.py does (a number over a tensor is a product with the reciprocal).
    s_enc = torch.where(amax > 0, torch.full_like(amax, E2M1_MAX * E4M3_MAX) / amax, 1.0).clamp(max=FLOAT32_MAX)
    s_dec = 1.0 / s_enc
    s_dec_b = ((amax_b / E2M1_MAX) * s_enc).to(torch.float8_e4m3fn).to(torch.float32)
    denom = s_dec_b * s_dec
    s_enc_b = torch.where(denom > 0, 1.0 / denom, 0.0).clamp(max=FLOAT32_MAX)
    return s_enc_b, s_dec_b, s_dec, finite


def _stage_apply(x: torch.Tensor, enc, dec_block, dec_tensor, finite, seed_t, scheme: str, axis: int,
                 rounding: str, tile: bool):
    """Stage 2 (elementwise): scale, round, decode; NaN everywhere unless ``finite``.

    Returns ``(values, tensor_scale)``: each E2M1 value times its block's decode
    scale, and the per-tensor decode scale (``None`` for MXFP4), which the GEMM
    applies to its output.
    """
    rows, cols = x.shape
    if scheme == PER_TENSOR:
        v = x
        scaled = x / enc
    else:
        block = MX_BLOCK_SIZE if scheme == "mxfp4" else NVFP4_BLOCK_SIZE
        v = _block_view(x, axis, block, tile)[0]
        scaled = v * enc
    if rounding == "stochastic":
        index = torch.arange(rows * cols, device=x.device, dtype=torch.int32).view(rows, cols)
        if scheme != PER_TENSOR:
            index = _block_view(index, axis, block, tile)[0]
        q = _round_stochastic(scaled, hash_uniform(index, seed_t))
    else:
        q = _round_nearest(scaled)
    if scheme == PER_TENSOR:
        return torch.where(finite, q, float("nan")), dec_block
    out = q * dec_block  # exact: an E2M1 value times an E8M0 or E4M3 scale
    return torch.where(finite, out.reshape(rows, cols), float("nan")), dec_tensor


def fake_quant_fused(
    x: torch.Tensor,
    seed_t: torch.Tensor,
    scheme: str,
    axis: int,
    rounding: str,
    tile: bool = False,
    scale_rule: str = "floor",
    *,
    stages=None,
) -> torch.Tensor:
    """Fake-quantize a 2-D float32 operand in two passes: block scales, then elementwise.

    Parameters
    ----------
    x:
        float32, shape ``(rows, cols)``, contiguous, fewer than 2**31 elements.
    seed_t:
        :func:`seed_term` of the stochastic-rounding seed (ignored for ``"nearest"``).
    scheme:
        ``"e2m1_per_tensor"`` (one absmax/6 scale for the whole tensor),
        ``"mxfp4"`` (E2M1 + E8M0 scale per 32) or ``"nvfp4"`` (E2M1 + E4M3 scale
        per 16 + FP32 tensor scale).
    axis:
        0 or 1: the axis the blocks run along (the GEMM's reduction axis).
    rounding:
        ``"nearest"`` (ties to even) or ``"stochastic"``.
    tile, scale_rule:
        NVFP4 16x16 tiles; MXFP4 scale rule ``"floor"`` (OCP) or ``"ceil"``.
    stages:
        ``(scales_fn, apply_fn)`` to run instead of the two eager stages (the
        compiled ones, see :func:`compiled_fake_quant`).

    Returns
    -------
    (torch.Tensor, torch.Tensor or None)
        ``(values, tensor_scale)``: float32 ``(rows, cols)``, each E2M1 value times
        its block's decode scale (exact, also in bfloat16), and the 0-d float32
        per-tensor decode scale (NVFP4's ``s_dec``, the naive scheme's amax/6;
        ``None`` for MXFP4). The dequantized operand is ``values * tensor_scale``;
        a GEMM applies the tensor scales to its output, as FP4 hardware does. Any
        NaN or +-Inf in ``x`` makes every value NaN (as a GEMM on it would be).

    The two stages are compiled separately on purpose: fused into one loop nest
    with the block reductions, the elementwise work ran several times slower.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.3, -1.0, 2.9, 6.0] * 4])
    >>> values, scale = fake_quant_fused(x, seed_term(0), "e2m1_per_tensor", 1, "nearest")
    >>> values[0, :4].tolist(), scale.item()  # E2M1 values; one scale, amax / 6
    ([0.5, -1.0, 3.0, 6.0], 1.0)
    """
    if x.numel() >= 2**31:
        raise ValueError(f"x has {x.numel()} elements; the fused path indexes them with int32 (< 2**31)")
    scales_fn, apply_fn = stages or (_stage_scales, _stage_apply)
    enc, dec_block, dec_tensor, finite = scales_fn(x, scheme, axis, tile, scale_rule)
    return apply_fn(x, enc, dec_block, dec_tensor, finite, seed_t, scheme, axis, rounding, tile)


_COMPILE_PROBLEM: list = []  # why torch.compile does not work here, once known


@functools.lru_cache(maxsize=None)
def compile_works() -> bool:
    """True when ``torch.compile`` runs here (on CPU it needs a C++ compiler).

    When it does not, the first call warns once, naming the error, so that the
    ``"auto"`` backends' choice of the eager fused path is never silent.
    """
    try:
        f = torch.compile(lambda t: t * 2 + 1)
        ok = bool(torch.equal(f(torch.ones(4)), torch.full((4,), 3.0)))
        problem = None if ok else "a compiled test function returned wrong values"
    except Exception as e:  # any failure of the toolchain means: do not compile here
        problem = f"{type(e).__name__}: {str(e)[:200]}"
    if problem is not None:
        _COMPILE_PROBLEM.append(problem)
        warnings.warn(f"torch.compile does not work here ({problem}); fp4lib runs its eager fused path instead "
                      "(identical numbers, slower)")
        return False
    return True


def _same_bits(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# Each (scheme, axis, rounding, tile, scale_rule) combination and operand shape
# is its own static specialisation (a recipe needs a few dozen): dynamic shapes
# compiled no faster here and ran the nvfp4 step about 2x slower.
_RECOMPILE_LIMIT = 128


class _CompiledFakeQuant:
    """:func:`fake_quant_fused` with both stages compiled.

    The first call for each spec, shape and device also runs the eager fused path
    and compares the bits. If they differ (a miscompiled kernel, a stale on-disk
    kernel cache), or compiling fails, that combination runs the eager fused path
    from then on, with a warning that names it: the numbers are never silently
    those of an unverified kernel.
    """

    def __init__(self):
        self.stages = (torch.compile(_stage_scales, dynamic=False), torch.compile(_stage_apply, dynamic=False))
        self.verified = set()
        self.fallback = {}  # key -> reason

    def __call__(self, x, seed_t, scheme, axis, rounding, tile=False, scale_rule="floor"):
        key = (scheme, axis, rounding, tile, scale_rule, tuple(x.shape), x.device.type)
        args = (x, seed_t, scheme, axis, rounding, tile, scale_rule)
        if key in self.verified:
            return fake_quant_fused(*args, stages=self.stages)
        if key not in self.fallback:
            label = (f"scheme={scheme}, block axis {axis}, rounding={rounding}, tile={tile}, "
                     f"scale_rule={scale_rule}, shape {tuple(x.shape)} on {x.device.type}")
            eager = fake_quant_fused(*args)
            try:
                compiled = fake_quant_fused(*args, stages=self.stages)
            except Exception as e:  # a compiler error: report it, then use the eager kernels
                self.fallback[key] = f"compiling failed ({type(e).__name__}: {str(e)[:200]})"
            else:
                if all(_same_bits(a, b) for a, b in zip(compiled, eager)):
                    self.verified.add(key)
                    return compiled
                self.fallback[key] = "the compiled kernel's bits differ from the fused path's"
            warnings.warn(f"FP4 fake quantization ({label}): {self.fallback[key]}; using the eager fused path "
                          "for it (identical to the reference, slower)")
            return eager
        return fake_quant_fused(*args)


@functools.lru_cache(maxsize=None)
def compiled_fake_quant() -> Callable:
    """:func:`fake_quant_fused` with both stages under ``torch.compile``, or the
    eager function with a warning when compiling does not work here.

    The first call for each operand shape and spec compiles (seconds on a CPU;
    inductor caches the kernels on disk for later processes).
    """
    if not compile_works():
        warnings.warn("torch.compile is unavailable here; FP4 fake quantization runs the eager fused path")
        return fake_quant_fused
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), _RECOMPILE_LIMIT))
    return _CompiledFakeQuant()
