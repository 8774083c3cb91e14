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
* :func:`fp4_gemm` -- that GEMM, ``a @ b.T`` on two quantized operands, on a GPU
  that has it (compute capability 10.x or 12.x: B200, GB200, RTX 50xx), and :func:`block_scaled_matmul`,
  its emulation on any device: the E2M1 products of each block summed exactly,
  scaled by the two block scales and accumulated block after block in FP32, as
  Transformer Engine's reference GEMM does.

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

from typing import Optional

import torch

from ..numerics.constants import MX_BLOCK_SIZE, NVFP4_BLOCK_SIZE
from ..numerics.tensor import QuantizedTensor

__all__ = ["to_torchao", "from_torchao", "gemm_operand", "swizzle_scales", "unswizzle_scales",
           "block_scaled_matmul", "fp4_gemm", "fp4_gemm_available", "FP4_GEMM_CAPABILITIES", "ENGINE_SWITCHES", "TORCHAO_NAMES"]

_SWIZZLE_ROWS, _SWIZZLE_COLS = 128, 4  # the scale tile of block-scaled GEMMs


ENGINE_SWITCHES = {
    # recipe: (Transformer Engine, torchao 0.18, Megatron-LM)
    "bf16": ("no recipe (outside te.autocast)", "no config", "neither --fp8-format nor --fp4-format"),
    "fp8": ("Float8CurrentScaling(fp8_format=Format.HYBRID)", 'Float8LinearConfig.from_recipe_name("tensorwise")',
            "--fp8-format hybrid --fp8-recipe tensorwise"),
    "nvfp4": ("NVFP4BlockScaling(); the last block outside te.autocast", "NVFP4TrainingConfig() (fixed recipe)",
              "--fp4-format e2m1 --fp4-recipe nvfp4 --first-last-layers-bf16 --num-layers-at-start-in-bf16 0 "
              "--num-layers-at-end-in-bf16 1"),
    "nvfp4_all_fp4": ("NVFP4BlockScaling() on every block", "NVFP4TrainingConfig() on every linear",
                      "--fp4-format e2m1 --fp4-recipe nvfp4"),
    "nvfp4_no_sr": ("NVFP4BlockScaling(disable_stochastic_rounding=True)", "no switch", "no flag"),
    "nvfp4_no_rht": ("NVFP4BlockScaling(disable_rht=True)", "no switch", "no flag"),
    "nvfp4_no_tiles": ("NVFP4BlockScaling(disable_2d_quantization=True)", "no switch", "no flag"),
    "nvfp4_4over6": ('NVFP4BlockScaling(nvfp4_4over6="all", nvfp4_4over6_err_mode="MSE")', "no switch", "no flag"),
    "nvfp4_unbiased_sr": ("no switch", "no switch", "no flag"),
    "nvfp4_hp_final": ("leave te.autocast for the last 10% of steps", "remove the config for the last 10% of steps",
                       "resume the last 10% of steps without --fp4-format"),
    "mxfp4": ("no MXFP4 training recipe (MXFP8BlockScaling is FP8)",
              "no MXFP4 training config; to_mx(x, torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.FLOOR) "
              "quantizes as fp4lib", "no MXFP4 recipe"),
}
"""fp4lib's recipes as the switches of engines with FP4 kernels: recipe -> (Transformer
Engine's ``transformer_engine.common.recipe``, torchao 0.18, Megatron-LM's command line).
"no switch" / "no flag": the engine has no option for the ingredient. Megatron-LM passes
NVFP4's ingredients to Transformer Engine without flags of its own."""

TORCHAO_NAMES = {
    "Float8LinearConfig": "torchao.float8",
    "NVFP4TrainingConfig": "torchao.prototype.moe_training.nvfp4_training.nvfp4_training",
    "MXFP8TrainingOpConfig": "torchao.prototype.moe_training.config",
    "ScaleCalculationMode": "torchao.prototype.mx_formats.config",
    "to_mx": "torchao.prototype.mx_formats.mx_tensor",
}
"""Where torchao 0.18 keeps the names :data:`ENGINE_SWITCHES` and this module use."""


def _torchao():
    try:
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
        from torchao.quantization.quantize_.common.kernel_preference import KernelPreference
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"fp4lib.engines.torchao needs torchao (pip install torchao): {e}") from e
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


def _row_block_scales(q: QuantizedTensor) -> torch.Tensor:
    """The block scales of a 2-D MXFP4/NVFP4 tensor as one scale per row and block of
    the last axis (an NVFP4 16x16 tile's scale repeated on its 16 rows), in their own dtype."""
    if q.scheme not in ("mxfp4", "nvfp4") or len(q.shape) != 2:
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
    return a.global_scale * b.global_scale if a.scheme == "nvfp4" else None


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
