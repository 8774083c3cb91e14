"""Block scaling: bitsandbytes absmax blocks, MXFP4 and NVFP4.

:func:`quantize` turns a float tensor into a :class:`~fp4lib.QuantizedTensor`
(packed 4-bit codes plus scales); :func:`fake_quantize` returns
quantize-then-dequantize in the input's dtype and shape. Both check their input
once, here, and pick a path: the reference (:mod:`fp4lib.numerics.reference`) or
the compiled kernel (:mod:`fp4lib.numerics.kernels`), which give the same bits.
Chapter 2 of the book introduces every scheme:

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

What each scheme is, as data: :mod:`fp4lib.numerics.schemes`.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from .constants import NVFP4_TILE
from .compiling import compile_works
from .kernels import quantize_packed
from .reference import fp8_fake_quantize, quantize_reference
from .rounding import check_rounding
from .schemes import (FP8_SCHEMES, NONFINITE_MODES, SCHEMES, SUPPORTED_DTYPES, Backend, check_backend,
                      resolve_nvfp4_options, resolve_scale_rule, scheme_info)
from .tensor import QuantizedTensor

__all__ = ["quantize", "fake_quantize", "FAST_MIN_NUMEL", "AUTO_COMPILE_AFTER"]

QUANTIZE_BACKENDS = (Backend.AUTO, Backend.REFERENCE, Backend.FUSED, Backend.COMPILED)
FAST_MIN_NUMEL = 1 << 16
"""``backend="auto"`` compiles from this many elements on; below, compiling costs more than it saves."""
AUTO_COMPILE_AFTER = 1
"""``backend="auto"`` compiles a kernel for a shape only once that shape was quantized
this many times before in the process: compiling takes seconds (10-20 s on a 2-core
CPU), which one call never wins back, while a loop over the same shape does."""
_AUTO_SEEN: dict = {}
_log = logging.getLogger(__name__)


def _check_input(x, scheme: str, rounding: str, nonfinite: str) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}"
                         + (" (FP8 schemes are for fake_quantize)" if scheme in FP8_SCHEMES else ""))
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
    info = scheme_info(scheme)
    if info.block_size == 0:
        if block_size is not None:
            raise ValueError(f"{scheme!r} has one scale for the whole tensor; block_size must be None, got {block_size!r}")
        return 0
    bs = info.block_size if block_size is None else block_size
    if bs not in info.block_sizes:
        if len(info.block_sizes) == 1:
            raise ValueError(f"block_size for {scheme!r} is fixed at {info.block_size} by the format, got {block_size!r}")
        raise ValueError(f"block_size for {scheme!r} must be one of {info.block_sizes}, got {block_size!r}")
    return bs


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


def _fast_path(backend: Backend, x: torch.Tensor, scheme: str, rounding: str, double_quant: bool,
               nonfinite: str) -> Optional[Backend]:
    """The kernel path to take (``FUSED`` or ``COMPILED``), or ``None`` for the reference."""
    if backend == Backend.REFERENCE:
        return None
    supported = (scheme_info(scheme).compiled and rounding == "nearest" and not double_quant
                 and nonfinite == "raise")
    if backend in (Backend.FUSED, Backend.COMPILED):
        if not supported:
            raise ValueError(f"backend={backend.value!r} covers schemes "
                             f"{tuple(s for s in SCHEMES if scheme_info(s).compiled)} with rounding='nearest', "
                             "no double_quant and nonfinite='raise'; use backend='auto' or 'reference' for the rest")
        if backend == Backend.FUSED:
            return Backend.FUSED
        return Backend.COMPILED if compile_works() else None
    if not supported or x.numel() < FAST_MIN_NUMEL:
        return None
    key = (scheme, tuple(x.shape), str(x.device), rounding)
    seen = _AUTO_SEEN.get(key, 0)
    _AUTO_SEEN[key] = seen + 1
    if seen < AUTO_COMPILE_AFTER or not compile_works():
        return None
    if seen == AUTO_COMPILE_AFTER:
        _log.info("quantize: compiling the fused %s kernel for shape %s (once per shape; the reference path served "
                  "the first call)", scheme, tuple(x.shape))
    return Backend.COMPILED


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
    formula: Optional[str] = None,
    metric: Optional[str] = None,
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
        instead of ``generator`` (training uses :func:`fp4lib.numerics.rounding.cheap_uniform`).
    double_quant:
        bitsandbytes schemes only: quantize the absmax values to 8 bits in groups
        of 256 (bitsandbytes' ``compress_statistics=True``). The 4-bit codes,
        offset and second-level absmax equal bitsandbytes'; each 8-bit absmax code
        is the exact nearest entry of the dynamic map, whereas bitsandbytes' CPU
        search lands one entry off for about 0.2% of them (31 and 32 of 16,384 on
        Gaussian data, for the two schemes).
    scale_rule:
        How block scales are chosen; ``None``: the standard rule. MXFP4:
        ``"floor"`` (OCP, the standard) or ``"ceil"`` (never clips). NVFP4:
        ``"nearest"`` (the standard), ``"up"`` (the E4M3 scale rounded up, so
        that no element exceeds 6 after scaling and stochastic rounding stays
        unbiased at block maxima) or ``"4over6"`` (four-over-six, see
        :func:`nvfp4_four_over_six`).
    tile:
        NVFP4 only: one scale per 16x16 tile of a 2-D tensor (for weights).
    formula:
        NVFP4 only: the float32 operation order of the block scales
        (:class:`~fp4lib.numerics.schemes.ScaleFormula`). ``None`` or ``"te2025"``
        (the default): ``(amax_b / 6) * s_enc``; ``"te2026"``: Transformer
        Engine's current ``amax_b * (s_enc * fl(1/6))``, and its four-over-six
        arithmetic. About 1-2% of a bf16 tensor's block scales differ by one E4M3 step.
    metric:
        NVFP4 four-over-six only: ``None`` or ``"mse"`` (the default, summed squared
        error) or ``"mae"`` (summed absolute error, Transformer Engine's default);
        see :func:`~fp4lib.numerics.scales.nvfp4_four_over_six`.
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
        A :class:`~fp4lib.numerics.schemes.Backend`. ``"auto"`` (default): the compiled kernels of :mod:`fp4lib.numerics.kernels` for
        tensors of at least :data:`FAST_MIN_NUMEL` elements where they apply
        (round to nearest, no double quantization) and ``torch.compile`` works,
        from the second call with a shape on (:data:`AUTO_COMPILE_AFTER`; the
        first call does not wait for a compile), else the reference;
        ``"reference"``; ``"fused"`` (the kernels' formulation, eagerly);
        ``"compiled"``. Every path gives the same bits.

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
    backend = check_backend(backend, QUANTIZE_BACKENDS)
    info = scheme_info(scheme)
    bs = _check_block_size(scheme, block_size)
    if double_quant and info.family != "absmax":
        raise ValueError(f"double_quant applies to 'bnb_fp4' and 'nf4' only, not {scheme!r}")
    scale_rule = resolve_scale_rule(scheme, scale_rule)
    formula, metric = resolve_nvfp4_options(scheme, formula, metric)
    if tensor_amax is not None and not info.tensor_scale:
        raise ValueError(f"tensor_amax sets a per-tensor scale: it applies to 'nvfp4' and 'e2m1_per_tensor', "
                         f"not {scheme!r}")
    if tile and not info.tiles:
        raise ValueError(f"tile applies to 'nvfp4' only, not {scheme!r}")
    if uniforms is not None:
        if rounding != "stochastic":
            raise ValueError("uniforms are the draws of stochastic rounding; pass rounding='stochastic'")
        if not torch.is_tensor(uniforms) or uniforms.shape != x.shape:
            raise ValueError(f"uniforms must be a tensor of x's shape {tuple(x.shape)}")
    if info.family != "absmax" and x.dim() == 0:
        raise ValueError(f"{scheme} quantizes along the last axis; x is 0-d (pass x.reshape(1))")
    if info.axis_blocks:
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
    path = None if tensor_amax is not None else _fast_path(backend, x32, scheme, rounding, double_quant, nonfinite)
    if path is not None:
        q = quantize_packed(x32, scheme, block_size=bs, scale_rule=scale_rule, tile=tile, dtype=x.dtype,
                            compiled=path == Backend.COMPILED, formula=formula, metric=metric)
        if q is not None:  # None: the input holds NaN or Inf, which the reference reports
            return q
    x32, nonfinite_count = _handle_nonfinite(x32, nonfinite)
    return quantize_reference(x32, scheme, block_size=bs, rounding=rounding, generator=generator, uniforms=uniforms,
                              double_quant=double_quant, scale_rule=scale_rule, tile=tile, tensor_amax=tensor_amax,
                              dtype=x.dtype, nonfinite_count=nonfinite_count, formula=formula, metric=metric)


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
        if scheme in SCHEMES and scheme_info(scheme).family == "absmax" or kwargs.get("tile"):
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
