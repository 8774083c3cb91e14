"""Hand fp4lib's MXFP4 and NVFP4 tensors to torchao, bytes unchanged, and name each recipe's switches in
the engines with real FP4 kernels.

* :func:`to_torchao` / :func:`from_torchao` -- an MXFP4 :class:`~fp4lib.QuantizedTensor`
  as torchao's ``MXTensor`` and an NVFP4 one as its ``NVFP4Tensor``, and back. The
  packed codes and the scales cross as they are: fp4lib and torchao pack two E2M1
  codes per byte the same way (element 2i in the low nibble, as PyTorch's
  ``float4_e2m1fn_x2`` and the OCP specification), and both keep one E8M0 scale per
  32 elements (MXFP4) or one E4M3 scale per 16 plus one FP32 scale per tensor
  (NVFP4) in row-major order.
* :data:`ENGINE_SWITCHES` -- fp4lib's recipes as Transformer Engine's, torchao's and
  Megatron-LM's switches. The GEMMs themselves: :mod:`fp4lib.engines.gemm`.

Never quantize again on the other side. fp4lib's MXFP4 is bit for bit torchao's
``to_mx`` with the OCP floor rule, but NVFP4 differs in details: fp4lib follows
Transformer Engine's reference (``s_enc = 2688 / amax``, block scale
``e4m3((amax_b / 6) * s_enc)`` by default and TE's current order with
``formula="te2026"``, an underflowing block scale flushed to zero), while
torchao's ``nvfp4_quantize`` divides by ``amax / 2688`` and raises block scales
below E4M3's smallest normal number (2^-6) to it. The two agree on most blocks, not all: they part where fp4lib's block scale is
subnormal or zero.

torchao is an optional dependency (``pip install torchao``); this module imports it
only when called.
"""

from __future__ import annotations

import torch

from ..numerics.constants import MX_BLOCK_SIZE, NVFP4_BLOCK_SIZE
from ..numerics.tensor import QuantizedTensor
from .gemm import unswizzle_scales

__all__ = ["to_torchao", "from_torchao", "ENGINE_SWITCHES", "TORCHAO_NAMES"]


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
    if q.family not in ("mx", "nv"):
        raise ValueError(f"torchao has MXFP4 and NVFP4 tensors; {q.scheme!r} has no counterpart there")
    if q.tile:
        raise ValueError("NVFP4 with 16x16 tiles has no torchao counterpart (its NVFP4Tensor scales 1x16 "
                         "blocks); quantize with tile=False to hand it over")
    if len(q.shape) < 2:
        raise ValueError(f"torchao's FP4 tensors are at least 2-D, got shape {tuple(q.shape)}")
    MXTensor, NVFP4Tensor, KernelPreference = _torchao()
    if q.family == "mx":
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
