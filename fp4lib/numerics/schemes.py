"""The vocabulary of block scaling: one frozen record per scheme, and the names of scale rules and backends.

Every other module asks a scheme's record what it is (:func:`scheme_info`) instead
of keeping its own list of scheme names: which element format it codes with, how
its blocks run, which scale format and rules it has, and which paths support it.
Configuration (:mod:`fp4lib.training.specs`, :mod:`fp4lib.training.recipes`) needs
nothing else of the numerics.

Examples
--------
>>> info = scheme_info("nvfp4")
>>> info.element, info.block_size, info.scale_format, info.tensor_scale, info.nominal_bits
('e2m1', 16, 'e4m3', True, 4.5)
>>> [s.name for s in SCHEME_INFO.values() if s.operand]
['mxfp4', 'nvfp4', 'e2m1_per_tensor', 'fp8_e4m3', 'fp8_e5m2']
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .constants import (
    BNB_BLOCK_SIZES,
    BNB_DEFAULT_BLOCK_SIZE,
    E2M1_MAX,
    E4M3_MAX,
    E5M2_MAX,
    FP4_BITS,
    FP32_BITS,
    MX_BLOCK_SIZE,
    NVFP4_BLOCK_SIZE,
    SCALE8_BITS,
)

__all__ = ["ScaleRule", "Backend", "Scheme", "SCHEME_INFO", "scheme_info", "SCHEMES", "FP8_SCHEMES", "PER_TENSOR",
           "OPERAND_SCHEMES", "NONFINITE_MODES", "SUPPORTED_DTYPES", "ROUNDING_MODES", "HADAMARD_SIZES", "resolve_scale_rule", "check_backend",
           "ScaleFormula", "ErrorMetric", "resolve_nvfp4_options"]


class _Name(str, enum.Enum):
    """An enum whose members are their strings: ``ScaleRule.UP == "up"``, and ``f"{ScaleRule.UP}"`` is ``up``."""

    __str__ = str.__str__
    __format__ = str.__format__


class ScaleRule(_Name):
    """How a block's scale is chosen from its largest magnitude (the first rule of each scheme is its standard)."""

    FLOOR = "floor"  # MXFP4, OCP MX v1.0: 2^(floor(log2 amax) - 2); a block maximum above 6 * 2^e saturates
    CEIL = "ceil"  # MXFP4: the smallest 2^e with amax <= 6 * 2^e (never clips)
    NEAREST = "nearest"  # NVFP4: amax / 6 * s_enc rounded to the nearest E4M3 number
    UP = "up"  # NVFP4: ... rounded up, so no element exceeds 6 (stochastic rounding stays unbiased)
    FOUR_OVER_SIX = "4over6"  # NVFP4: per block, the maximum mapped to 6 or to 4, whichever errs less


class ScaleFormula(_Name):
    """The float32 operation order of NVFP4's block-scale arithmetic, named after the Transformer Engine
    release whose reference quantizer computes it (a later change of order gets a new name, not a new meaning).

    ``TE2025`` (fp4lib's default): the ideal block scale is ``(amax_b / 6) * s_enc``, a true
    division then a product; four-over-six's second candidate is ``(amax_b / 4) * s_enc`` (the
    four-over-six authors' formula; Transformer Engine had no four-over-six in 2025), and its
    errors are summed in float64 in the scaled domain. ``TE2026``: Transformer Engine's 2026
    reference and kernels: the ideal block scale is ``amax_b * (s_enc * fl(1/6))``, where
    ``fl(1/6)`` is 1/6 rounded to float32 and multiplied (Transformer Engine's own arithmetic,
    not a replaced division); four-over-six's candidates are ``(amax_b / 6) * s_enc`` and that
    value times 1.5, each capped at 448 before the E4M3 cast, and its errors are computed in the
    input's domain and summed in float32 in Transformer Engine's order. The two orders put about
    1-2% of a bf16 tensor's block scales on neighbouring E4M3 numbers. The per-tensor scales
    ``s_enc = 6 * scale_max / amax`` and ``s_dec = 1 / s_enc`` are the same under both.
    """

    TE2025 = "te2025"
    TE2026 = "te2026"


class ErrorMetric(_Name):
    """How four-over-six compares its two candidate scales for a block: summed squared error
    (``MSE``, fp4lib's default and the four-over-six authors') or summed absolute error (``MAE``,
    Transformer Engine's default)."""

    MSE = "mse"
    MAE = "mae"


class Backend(_Name):
    """Which implementation computes a quantization; every backend gives the same bits.

    ``REFERENCE``: plain tensor operations, one at a time. ``FUSED``: the fused
    formulation of :mod:`fp4lib.numerics.kernels`, run eagerly. ``COMPILED``: that
    formulation compiled with ``torch.compile`` (checked bit for bit against the
    eager one on first use). ``AUTO``: compiled where ``torch.compile`` works and
    it pays, else the eager paths.
    """

    AUTO = "auto"
    REFERENCE = "reference"
    FUSED = "fused"
    COMPILED = "compiled"


@dataclass(frozen=True)
class Scheme:
    """What one quantization scheme is.

    Attributes
    ----------
    name:
        The string every API takes (``"nvfp4"``).
    family:
        How its blocks are formed, which the quantizers dispatch on: ``"absmax"``
        (bitsandbytes: the flattened tensor in blocks, an FP32 absmax each),
        ``"mx"`` (E8M0 power-of-two scales along the last axis), ``"nv"`` (E4M3
        scales along the last axis or per 16x16 tile, and an FP32 tensor scale),
        ``"tensor"`` (one FP32 scale for the whole tensor) or ``"fp8"``.
    element:
        The element format: ``"e2m1"``, ``"bnb_fp4"``, ``"nf4"``, ``"e4m3"`` or ``"e5m2"``.
    element_bits, element_max:
        Bits per element and the largest element magnitude after scaling.
    block_size, block_sizes:
        The default block size and those allowed (0: the whole tensor is one block).
    scale_format:
        Format of the block scales: ``"fp32"``, ``"e8m0"`` or ``"e4m3"``.
    tensor_scale:
        Whether an FP32 per-tensor scale is computed from the tensor's amax (and so
        can be shared over a group of ranks).
    scale_rules:
        The allowed :class:`ScaleRule` values, the standard one first; empty when
        the scheme has no choice.
    nibble_order:
        Packing of two 4-bit codes per byte (``None`` for 8-bit schemes).
    tiles:
        Whether one scale may cover a 16x16 tile of a matrix.
    storage, compiled, operand:
        The paths that support it: :func:`fp4lib.quantize` (stored as a
        :class:`~fp4lib.QuantizedTensor`), its compiled kernel, and the
        fake-quantized GEMM operands of training.
    dtype:
        The torch dtype of the elements, for 8-bit schemes.
    """

    name: str
    family: str
    element: str
    element_bits: int
    element_max: float
    block_size: int
    block_sizes: Tuple[int, ...]
    scale_format: str
    tensor_scale: bool = False
    scale_rules: Tuple[ScaleRule, ...] = ()
    nibble_order: Optional[str] = None
    tiles: bool = False
    storage: bool = True
    compiled: bool = True
    operand: bool = False
    dtype: Optional[torch.dtype] = None

    @property
    def nominal_bits(self) -> float:
        """Bits per element of a large tensor: the element plus its share of one block scale."""
        if self.block_size == 0:
            return float(self.element_bits)
        scale_bits = FP32_BITS if self.scale_format == "fp32" else SCALE8_BITS
        return self.element_bits + scale_bits / self.block_size

    @property
    def axis_blocks(self) -> bool:
        """Blocks run along one axis of the tensor (else over the flattened tensor, or it is one block)."""
        return self.family in ("mx", "nv")


PER_TENSOR = "e2m1_per_tensor"

_RECORDS = (
    Scheme("bnb_fp4", "absmax", "bnb_fp4", FP4_BITS, 1.0, BNB_DEFAULT_BLOCK_SIZE, BNB_BLOCK_SIZES, "fp32",
           nibble_order="high_first"),
    Scheme("nf4", "absmax", "nf4", FP4_BITS, 1.0, BNB_DEFAULT_BLOCK_SIZE, BNB_BLOCK_SIZES, "fp32",
           nibble_order="high_first"),
    Scheme("mxfp4", "mx", "e2m1", FP4_BITS, E2M1_MAX, MX_BLOCK_SIZE, (MX_BLOCK_SIZE,), "e8m0",
           scale_rules=(ScaleRule.FLOOR, ScaleRule.CEIL), nibble_order="low_first", operand=True),
    Scheme("nvfp4", "nv", "e2m1", FP4_BITS, E2M1_MAX, NVFP4_BLOCK_SIZE, (NVFP4_BLOCK_SIZE,), "e4m3", tensor_scale=True,
           scale_rules=(ScaleRule.NEAREST, ScaleRule.UP, ScaleRule.FOUR_OVER_SIX), nibble_order="low_first",
           tiles=True, operand=True),
    Scheme(PER_TENSOR, "tensor", "e2m1", FP4_BITS, E2M1_MAX, 0, (0,), "fp32", tensor_scale=True,
           nibble_order="low_first", operand=True),
    Scheme("fp8_e4m3", "fp8", "e4m3", SCALE8_BITS, E4M3_MAX, 0, (0,), "fp32", tensor_scale=True, storage=False,
           compiled=False, operand=True, dtype=torch.float8_e4m3fn),
    Scheme("fp8_e5m2", "fp8", "e5m2", SCALE8_BITS, E5M2_MAX, 0, (0,), "fp32", tensor_scale=True, storage=False,
           compiled=False, operand=True, dtype=torch.float8_e5m2),
)

SCHEME_INFO: Dict[str, Scheme] = {s.name: s for s in _RECORDS}
"""Every scheme's record, by name."""

SCHEMES = tuple(s.name for s in _RECORDS if s.storage)
"""The 4-bit storage schemes of :func:`fp4lib.quantize`."""

FP8_SCHEMES = tuple(s.name for s in _RECORDS if s.family == "fp8")
"""The 8-bit reference formats of training: one FP32 scale per tensor from its current
amax (Transformer Engine's ``Float8CurrentScaling``); not storage schemes."""

OPERAND_SCHEMES = tuple(s.name for s in _RECORDS if s.operand)
"""The schemes a GEMM operand of training can be fake-quantized with."""

NONFINITE_MODES = ("raise", "zero")
"""What :func:`fp4lib.quantize` does with NaN and Inf: raise, or quantize them as 0."""
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROUNDING_MODES = ("nearest", "stochastic")
"""Element rounding: to nearest (ties to even), or stochastic (unbiased)."""
HADAMARD_SIZES = (16, 32, 64, 128)
"""Block sizes of the random Hadamard transform applied before quantizing."""


def scheme_info(name: str) -> Scheme:
    """The record of scheme ``name``; ``ValueError`` naming the schemes for an unknown one.

    Examples
    --------
    >>> scheme_info("mxfp4").scale_rules[0]
    <ScaleRule.FLOOR: 'floor'>
    >>> try:
    ...     scheme_info("fp4")
    ... except ValueError as e:
    ...     print(e)
    scheme must be one of ('bnb_fp4', 'nf4', 'mxfp4', 'nvfp4', 'e2m1_per_tensor', 'fp8_e4m3', 'fp8_e5m2'), got 'fp4'
    """
    try:
        return SCHEME_INFO[name]
    except (KeyError, TypeError):
        raise ValueError(f"scheme must be one of {tuple(SCHEME_INFO)}, got {name!r}") from None


def resolve_scale_rule(scheme: str, scale_rule: Optional[str]) -> Optional[str]:
    """``scale_rule`` checked for ``scheme``; ``None`` means the scheme's standard rule.

    MXFP4: ``"floor"`` (OCP) or ``"ceil"``; NVFP4: ``"nearest"``, ``"up"`` or
    ``"4over6"`` (see :class:`ScaleRule`). Other schemes have no scale rule
    (``None``). Returns the rule's string.

    Examples
    --------
    >>> resolve_scale_rule("nvfp4", None), resolve_scale_rule("mxfp4", "ceil"), resolve_scale_rule("nf4", None)
    ('nearest', 'ceil', None)
    """
    rules = scheme_info(scheme).scale_rules
    if scale_rule is None:
        return rules[0].value if rules else None
    if not rules:
        with_rules = tuple(s.name for s in _RECORDS if s.scale_rules)
        raise ValueError(f"scale_rule applies to {with_rules} only, not {scheme!r}")
    if scale_rule not in rules:
        raise ValueError(f"{scheme} scale_rule must be one of {tuple(r.value for r in rules)}, got {scale_rule!r}")
    return ScaleRule(scale_rule).value


def resolve_nvfp4_options(scheme: str, formula: Optional[str], metric: Optional[str]) -> Tuple[str, str]:
    """``(formula, metric)`` checked for ``scheme``; ``None`` means the default (``"te2025"``, ``"mse"``).

    Only NVFP4 has a choice: any other scheme accepts only ``None`` or the defaults.

    Examples
    --------
    >>> resolve_nvfp4_options("nvfp4", "te2026", None), resolve_nvfp4_options("mxfp4", None, None)
    (('te2026', 'mse'), ('te2025', 'mse'))
    >>> try:
    ...     resolve_nvfp4_options("nvfp4", "te2027", None)
    ... except ValueError as e:
    ...     print(e)
    formula must be one of ('te2025', 'te2026'), got 'te2027'
    """
    if formula is None:
        formula = ScaleFormula.TE2025
    if metric is None:
        metric = ErrorMetric.MSE
    if formula not in tuple(ScaleFormula):
        raise ValueError(f"formula must be one of {tuple(f.value for f in ScaleFormula)}, got {formula!r}")
    if metric not in tuple(ErrorMetric):
        raise ValueError(f"metric must be one of {tuple(m.value for m in ErrorMetric)}, got {metric!r}")
    formula, metric = ScaleFormula(formula).value, ErrorMetric(metric).value
    if scheme_info(scheme).family != "nv" and (formula, metric) != ("te2025", "mse"):
        raise ValueError(f"formula and metric apply to 'nvfp4' only, not {scheme!r}")
    return formula, metric


def check_backend(backend: str, allowed: Tuple[Backend, ...] = tuple(Backend)) -> Backend:
    """``backend`` as a :class:`Backend`, or ``ValueError`` naming the allowed ones.

    Examples
    --------
    >>> check_backend("fused")
    <Backend.FUSED: 'fused'>
    >>> try:
    ...     check_backend("fast")
    ... except ValueError as e:
    ...     print(e)
    backend must be one of ('auto', 'reference', 'fused', 'compiled'), got 'fast'
    """
    if backend not in allowed:
        raise ValueError(f"backend must be one of {tuple(b.value for b in allowed)}, got {backend!r}")
    return Backend(backend)
