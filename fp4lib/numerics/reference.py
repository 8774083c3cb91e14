"""The reference quantizers: float32 in, codes and scales out, one tensor operation at a time.

The obviously-correct formulation that every faster path is checked against: the
scale arithmetic of :mod:`fp4lib.numerics.scales`, the element rounding of
:mod:`fp4lib.numerics.formats`, and bitsandbytes' double quantization of its
absmax values. :func:`fp4lib.quantize` checks its input and calls
:func:`quantize_reference` (or a compiled kernel that gives the same bits).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .constants import (BNB_NESTED_BLOCK_SIZE, E2M1_MAX, E4M3_MAX, E8M0_EXP_BIAS, MX_BLOCK_SIZE, NVFP4_4OVER6_SCALE_MAX, NVFP4_BLOCK_SIZE,
                        NVFP4_TILE)
from .formats import E2M1, FORMATS, ElementFormat
from .packing import pack_nibbles
from .scales import (bnb_scale_blocks, bnb_scale_tail, e2m1_tensor_scale, fp8_tensor_scale, mx_scale_exponents,
                     nvfp4_block_scales, nvfp4_four_over_six, nvfp4_tensor_scale, pow2)
from .schemes import FP8_SCHEMES, ScaleRule, resolve_nvfp4_options, resolve_scale_rule, scheme_info
from .tensor import NestedAbsmax, QuantizedTensor, block_view, times_blocks

__all__ = ["quantize_reference", "dynamic_map_8bit", "nested_quantize", "fp8_fake_quantize"]


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


def nested_quantize(absmax: torch.Tensor) -> NestedAbsmax:
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
        raise ValueError(f"scheme must be one of {FP8_SCHEMES}, got {scheme!r}")
    x32 = x.float()
    s_enc, s_dec = fp8_tensor_scale(x32.abs().amax() if tensor_amax is None else tensor_amax, scheme)
    return (x32 * s_enc).to(scheme_info(scheme).dtype).to(torch.float32), s_dec


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


def _mx_codes(x32: torch.Tensor, rounding: str, generator, uniforms, scale_rule: str):
    amax = block_view(x32, MX_BLOCK_SIZE, False).abs().amax(dim=-1)
    e = mx_scale_exponents(amax, scale_rule)
    inv = pow2(-e)
    scaled = times_blocks(x32, inv, MX_BLOCK_SIZE, False)  # exact: a power of two
    clipped = (amax * inv > E2M1_MAX) & (amax > 0)
    clip_fraction = int(clipped.sum()) / clipped.numel()
    codes = E2M1.encode(scaled, rounding, generator, uniforms)
    scale = (e + E8M0_EXP_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)
    return codes, scale, clip_fraction


def _e2m1_nearest(v: torch.Tensor) -> torch.Tensor:
    return E2M1.decode(E2M1.encode(v))


def _nvfp4_codes(x32: torch.Tensor, rounding: str, generator, uniforms, tile: bool, scale_rule: str, amax,
                 formula: str = "te2025", metric: str = "mse"):
    four_six = scale_rule == ScaleRule.FOUR_OVER_SIX
    s_enc, s_dec = nvfp4_tensor_scale(amax, NVFP4_4OVER6_SCALE_MAX if four_six else E4M3_MAX)
    blocks = block_view(x32, NVFP4_BLOCK_SIZE, tile)
    amax_b = blocks.abs().amax(dim=-1)
    if four_six and tile:  # the tile's rows and columns, for the error sum's order
        rows = blocks.reshape(*blocks.shape[:-1], NVFP4_TILE, NVFP4_TILE)
        s_dec_b, s_enc_b = nvfp4_four_over_six(rows, amax_b[..., None, None], s_enc, s_dec, (-2, -1), _e2m1_nearest,
                                               metric, formula, amax)
        s_dec_b, s_enc_b = s_dec_b[..., 0, 0], s_enc_b[..., 0, 0]
    elif four_six:
        s_dec_b, s_enc_b = nvfp4_four_over_six(blocks, amax_b.unsqueeze(-1), s_enc, s_dec, -1, _e2m1_nearest,
                                               metric, formula, amax)
        s_dec_b, s_enc_b = s_dec_b.squeeze(-1), s_enc_b.squeeze(-1)
    else:
        s_dec_b, s_enc_b = nvfp4_block_scales(amax_b, s_enc, s_dec, scale_rule, formula=formula)
    codes = E2M1.encode(times_blocks(x32, s_enc_b, NVFP4_BLOCK_SIZE, tile), rounding, generator, uniforms)
    return codes, s_dec_b.to(torch.float8_e4m3fn), s_dec


def _per_tensor_codes(x32: torch.Tensor, rounding: str, generator, uniforms, amax):
    scale = e2m1_tensor_scale(amax)
    return E2M1.encode(x32 / scale, rounding, generator, uniforms), scale


def _absmax_quantize(x32, info, block_size, rounding, generator, uniforms, double_quant, scale_rule, tile, amax,
                     common):
    fmt = FORMATS[info.element]
    codes, absmax = _bnb_codes(x32, fmt, block_size, rounding, generator, uniforms)
    if codes.numel() % 2:  # bitsandbytes pads with the code of 0.0 (7 in NF4)
        codes = torch.cat([codes, fmt.encode(torch.zeros(1, device=codes.device))])
    packed = pack_nibbles(codes, info.nibble_order).unsqueeze(1)
    if double_quant:
        nested = nested_quantize(absmax)
        return QuantizedTensor(packed=packed, scale=nested.codes, nested=nested, **common)
    return QuantizedTensor(packed=packed, scale=absmax, **common)


def _tensor_quantize(x32, info, block_size, rounding, generator, uniforms, double_quant, scale_rule, tile, amax,
                     common):
    codes, scale = _per_tensor_codes(x32, rounding, generator, uniforms, amax)
    return QuantizedTensor(packed=pack_nibbles(codes, info.nibble_order), scale=scale, **common)


def _mx_quantize(x32, info, block_size, rounding, generator, uniforms, double_quant, scale_rule, tile, amax, common):
    codes, scale, clip = _mx_codes(x32, rounding, generator, uniforms, scale_rule)
    return QuantizedTensor(packed=pack_nibbles(codes, info.nibble_order), scale=scale, clip_fraction=clip, **common)


def _nv_quantize(x32, info, block_size, rounding, generator, uniforms, double_quant, scale_rule, tile, amax, common,
                 formula="te2025", metric="mse"):
    codes, s_dec_b, s_dec = _nvfp4_codes(x32, rounding, generator, uniforms, tile, scale_rule, amax, formula, metric)
    return QuantizedTensor(packed=pack_nibbles(codes, info.nibble_order), scale=s_dec_b, global_scale=s_dec, tile=tile,
                           **common)


_BY_FAMILY = {"absmax": _absmax_quantize, "tensor": _tensor_quantize, "mx": _mx_quantize, "nv": _nv_quantize}


def quantize_reference(x32: torch.Tensor, scheme: str, *, block_size: int, rounding: str = "nearest",
                       generator: Optional[torch.Generator] = None, uniforms: Optional[torch.Tensor] = None,
                       double_quant: bool = False, scale_rule: Optional[str] = None, tile: bool = False,
                       tensor_amax: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
                       nonfinite_count: int = 0, formula: Optional[str] = None, metric: Optional[str] = None
                       ) -> QuantizedTensor:
    """:func:`fp4lib.quantize` on a checked input: contiguous, finite float32 ``x32``.

    The arguments are :func:`fp4lib.quantize`'s, already validated there
    (``block_size`` resolved; ``scale_rule`` ``None`` means the standard rule; ``formula``
    and ``metric``, NVFP4's arithmetic, ``None`` for the defaults); ``dtype`` is
    the original tensor's (default float32) and ``nonfinite_count`` the number of
    NaN/Inf inputs already replaced by 0. The scheme's record picks the quantizer.

    Examples
    --------
    >>> import torch
    >>> quantize_reference(torch.tensor([[1.0, -2.0] * 16]), "mxfp4", block_size=32).dequantize()[0, :2].tolist()
    [1.0, -2.0]
    """
    info = scheme_info(scheme)
    scale_rule = resolve_scale_rule(scheme, scale_rule)
    common = dict(shape=x32.shape, dtype=dtype or x32.dtype, scheme=scheme, block_size=block_size, rounding=rounding,
                  nonfinite_count=nonfinite_count)
    formula, metric = resolve_nvfp4_options(scheme, formula, metric)
    amax = (x32.abs().max() if tensor_amax is None else tensor_amax) if info.tensor_scale else None
    extra = dict(formula=formula, metric=metric) if info.family == "nv" else {}
    return _BY_FAMILY[info.family](x32, info, block_size, rounding, generator, uniforms, double_quant, scale_rule,
                                   tile, amax, common, **extra)
