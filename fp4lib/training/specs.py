"""What a recipe says about each GEMM operand: :class:`QuantSpec` and :class:`LinearSpec`.

A linear layer ``Y = X W^T + b`` runs three GEMMs (chapter 4 of the book):

======  ================  ===========  ==============================  ======================
GEMM    product           operands     reduction axis                  block axis (2-D view)
======  ================  ===========  ==============================  ======================
Fprop   ``Y = X W^T``     X, W         in_features                     X: 1, W: 1
Dgrad   ``dX = dY W``     dY, W        out_features                    dY: 1, W: 0
Wgrad   ``dW = dY^T X``   dY, X        tokens (all leading dims of X)  dY: 0, X: 0
======  ================  ===========  ==============================  ======================

X is flattened to ``(N, in_features)`` and dY to ``(N, out_features)``, N the
number of tokens. Each of the six operands gets its own :class:`QuantSpec`; its
blocks always run along its GEMM's reduction axis (:data:`ROLES`, the one place
that says which), so the scale of a block is shared only by elements that are
summed together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..numerics.schemes import HADAMARD_SIZES, OPERAND_SCHEMES, ROUNDING_MODES, resolve_scale_rule, scheme_info

__all__ = ["QUANT_SCHEMES", "ROLES", "GEMMS", "QuantSpec", "LinearSpec", "OFF"]

QUANT_SCHEMES = ("none",) + OPERAND_SCHEMES
"""Operand schemes: ``"none"`` (high precision), ``"e2m1_per_tensor"`` (E2M1 with
one FP32 absmax/6 scale for the whole tensor: the naive recipe), ``"mxfp4"``
(E2M1 + one E8M0 scale per 32), ``"nvfp4"`` (E2M1 + one E4M3 scale per 16 + one
FP32 scale per tensor), and the 8-bit reference ``"fp8_e4m3"`` / ``"fp8_e5m2"``
(one FP32 scale per tensor from its current amax, round-to-nearest)."""

ROLES: Dict[str, Tuple[str, int, int]] = {
    "fprop_x": ("fprop", 1, 0),
    "fprop_w": ("fprop", 1, 1),
    "dgrad_dy": ("dgrad", 1, 2),
    "dgrad_w": ("dgrad", 0, 3),
    "wgrad_dy": ("wgrad", 0, 4),
    "wgrad_x": ("wgrad", 0, 5),
}
"""role -> (GEMM, block axis of the operand's 2-D view, index of its seed stream)."""

GEMMS: Dict[str, Tuple[str, str]] = {"fprop": ("fprop_x", "fprop_w"), "dgrad": ("dgrad_dy", "dgrad_w"),
                                     "wgrad": ("wgrad_dy", "wgrad_x")}
"""GEMM -> its (left, right) operand roles."""


@dataclass(frozen=True)
class QuantSpec:
    """How one GEMM operand is fake-quantized.

    Attributes
    ----------
    scheme:
        One of :data:`QUANT_SCHEMES`; ``"none"`` keeps the operand in high precision.
    rounding:
        ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased; the draws come
        from a hash of the element index and a per-step seed).
    hadamard:
        0 (off) or a block size in 16/32/64/128: a random-sign Hadamard transform
        of that size along the GEMM's reduction axis before quantizing. Both
        operands of a GEMM must agree; they get the same signs, so the transform
        cancels in the product.
    tile:
        NVFP4 weights only: one scale per 16x16 tile, so Fprop and Dgrad (which
        block the weight along different axes) see the same quantized weight.
    scale_rule:
        How the block scales are chosen; ``None`` gives the scheme's standard
        rule (and stays ``None`` for schemes without block scales). MXFP4:
        ``"floor"`` (OCP MX v1.0; the block maximum may clip) or ``"ceil"`` (never
        clips; the role of Tseng et al.'s 3/4 pre-scale, which keeps stochastic
        rounding unbiased). NVFP4: ``"nearest"`` (the E4M3 scale rounded to
        nearest: a block maximum may land up to 6.4 and clamp to 6), ``"up"`` (the
        scale rounded up: nothing clamps, so stochastic rounding is unbiased at
        block maxima too) or ``"4over6"`` (each block's maximum mapped to 6 or to 4,
        whichever gives the smaller error; Cook et al. 2025).

    The block axis is not part of the spec: it is the reduction axis of the GEMM
    the operand enters (see the table in the module docs).

    Examples
    --------
    >>> QuantSpec("nvfp4", rounding="stochastic")
    QuantSpec(scheme='nvfp4', rounding='stochastic', hadamard=0, tile=False, scale_rule='nearest')
    >>> QuantSpec().enabled
    False
    """

    scheme: str = "none"
    rounding: str = "nearest"
    hadamard: int = 0
    tile: bool = False
    scale_rule: Optional[str] = None

    def __post_init__(self):
        if self.scheme not in QUANT_SCHEMES:
            raise ValueError(f"scheme must be one of {QUANT_SCHEMES}, got {self.scheme!r}")
        if self.enabled:
            object.__setattr__(self, "scale_rule", resolve_scale_rule(self.scheme, self.scale_rule))
        elif self.scale_rule is not None:
            raise ValueError(f"scale_rule applies to quantized operands, not scheme 'none' (got {self.scale_rule!r})")
        info = scheme_info(self.scheme) if self.enabled else None
        if info is not None and info.family == "fp8" and self.rounding != "nearest":
            raise ValueError(f"{self.scheme} is offered with round-to-nearest only, got rounding={self.rounding!r}")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        if self.hadamard != 0 and self.hadamard not in HADAMARD_SIZES:
            raise ValueError(f"hadamard must be 0 (off) or one of {HADAMARD_SIZES}, got {self.hadamard!r}")
        if self.tile and not (info is not None and info.tiles):
            raise ValueError(f"tile (16x16 weight scales) applies to scheme 'nvfp4' only, got scheme {self.scheme!r}")
        if self.hadamard and self.tile:
            raise ValueError("a Hadamard-transformed weight has no 16x16 tile structure: use hadamard or tile, not both")

    @property
    def enabled(self) -> bool:
        """False for ``scheme="none"``."""
        return self.scheme != "none"

    @property
    def block_size(self) -> int:
        """Elements per scale along the block axis (0 for per-tensor and none)."""
        return scheme_info(self.scheme).block_size if self.enabled else 0

    def short(self) -> str:
        """A compact label such as ``nvfp4/sr/rht16``."""
        if not self.enabled:
            return "hp"
        parts = [self.scheme, "sr" if self.rounding == "stochastic" else "rtn"]
        if self.hadamard:
            parts.append(f"rht{self.hadamard}")
        if self.tile:
            parts.append("16x16")
        if self.scale_rule != resolve_scale_rule(self.scheme, None):
            parts.append(self.scale_rule)
        return "/".join(parts)


OFF = QuantSpec()


@dataclass(frozen=True)
class LinearSpec:
    """The :class:`QuantSpec` of each of the six GEMM operands of a linear layer.

    Field names are ``<gemm>_<operand>``: ``fprop_x``, ``fprop_w`` (Fprop
    ``Y = X W^T``), ``dgrad_dy``, ``dgrad_w`` (Dgrad ``dX = dY W``), ``wgrad_dy``,
    ``wgrad_x`` (Wgrad ``dW = dY^T X``). The default is all off: exactly ``nn.Linear``.

    Examples
    --------
    >>> nv = QuantSpec("nvfp4")
    >>> LinearSpec(fprop_x=nv, fprop_w=nv).gemms_enabled()
    ('fprop',)
    """

    fprop_x: QuantSpec = OFF
    fprop_w: QuantSpec = OFF
    dgrad_dy: QuantSpec = OFF
    dgrad_w: QuantSpec = OFF
    wgrad_dy: QuantSpec = OFF
    wgrad_x: QuantSpec = OFF

    def __post_init__(self):
        for role in ROLES:
            spec = getattr(self, role)
            if not isinstance(spec, QuantSpec):
                raise TypeError(f"{role} must be a QuantSpec, got {type(spec).__name__}")
            if spec.tile and not role.endswith("_w"):
                raise ValueError(f"{role}: tile=True applies to weights only (fprop_w, dgrad_w)")
        for gemm, (a, b) in GEMMS.items():
            ha, hb = getattr(self, a).hadamard, getattr(self, b).hadamard
            if ha != hb:
                raise ValueError(
                    f"{a}.hadamard={ha} and {b}.hadamard={hb} differ: both operands of the {gemm} GEMM need "
                    "the same transform along the reduction axis for it to cancel in the product"
                )

    @classmethod
    def uniform(cls, spec: QuantSpec) -> "LinearSpec":
        """The same spec for all six operands."""
        return cls(*(spec,) * len(ROLES))

    @property
    def enabled(self) -> bool:
        """True when any operand is quantized."""
        return any(getattr(self, r).enabled for r in ROLES)

    def gemms_enabled(self) -> Tuple[str, ...]:
        """The GEMMs with at least one quantized operand, in fprop/dgrad/wgrad order."""
        return tuple(g for g, pair in GEMMS.items() if any(getattr(self, r).enabled for r in pair))

    def replace(self, **changes) -> "LinearSpec":
        """A copy with some operand specs replaced."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line per GEMM, e.g. ``fprop: x nvfp4/rtn, w nvfp4/rtn/16x16``."""
        lines = []
        for gemm, (a, b) in GEMMS.items():
            lines.append(f"{gemm}: {a.split('_')[1]} {getattr(self, a).short()}, {b.split('_')[1]} {getattr(self, b).short()}")
        return "\n".join(lines)


