"""FP4 linear layers: the three GEMMs of a linear layer with fake-quantized operands.

A linear layer ``Y = X W^T + b`` runs three GEMMs (chapter 4 of the book):

======  ================  ===========  ==============================  ======================
GEMM    product           operands     reduction axis                  block axis (2-D view)
======  ================  ===========  ==============================  ======================
Fprop   ``Y = X W^T``     X, W         in_features                     X: 1, W: 1
Dgrad   ``dX = dY W``     dY, W        out_features                    dY: 1, W: 0
Wgrad   ``dW = dY^T X``   dY, X        tokens (all leading dims of X)  dY: 0, X: 0
======  ================  ===========  ==============================  ======================

X is flattened to ``(N, in_features)`` and dY to ``(N, out_features)``, N the
number of tokens. Each of the six operands gets its own :class:`QuantSpec`
(scheme, rounding, random Hadamard, 16x16 weight tiles); its blocks always run
along its GEMM's reduction axis, so the scale of a block is shared only by
elements that are summed together. Quantization is simulated: each operand is
quantized and dequantized ("fake quant") and the GEMM runs in high precision, as
the papers' ablations did. The master weights, the gradients handed to the
optimizer and the optimizer state stay in high precision.

Three interchangeable ways compute an operand's fake quantization (``backend``):
``"reference"`` (:func:`reference_fake_quant`, built on :func:`fp4lib.quantize`),
``"fused"`` (:func:`fp4lib.fast.fake_quant_fused` run eagerly) and
``"compiled"`` (the same under ``torch.compile``). All three give identical bits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .constants import E2M1_MAX, MX_BLOCK_SIZE, NVFP4_BLOCK_SIZE, NVFP4_TILE
from .fast import BACKENDS, PER_TENSOR, compile_works, compiled_fake_quant, fake_quant_fused, seed_term
from .formats import E2M1
from .hadamard import HADAMARD_SIZES, block_hadamard, hadamard_matrix
from .packing import pack_nibbles
from .rounding import ROUNDING_MODES, cheap_uniform, stochastic_round_index
from .scaling import fake_quantize, quantize

__all__ = [
    "QUANT_SCHEMES",
    "ROLES",
    "QuantSpec",
    "LinearSpec",
    "FP4Linear",
    "FP4LinearFunction",
    "reference_fake_quant",
    "reference_fake_quant_factored",
    "fake_quant_operand",
    "fake_quant_factored",
    "scaled_gemm",
    "hadamard_along",
    "hadamard_signs",
    "mix_seed",
]

QUANT_SCHEMES = ("none", PER_TENSOR, "mxfp4", "nvfp4")
"""Operand schemes: ``"none"`` (high precision), ``"e2m1_per_tensor"`` (E2M1 with
one FP32 absmax/6 scale for the whole tensor: the naive recipe), ``"mxfp4"``
(E2M1 + one E8M0 scale per 32) and ``"nvfp4"`` (E2M1 + one E4M3 scale per 16 + one
FP32 scale per tensor)."""

MX_SCALE_RULES = ("floor", "ceil")
BACKEND_CHOICES = ("auto",) + BACKENDS

# role -> (GEMM, block axis of the 2-D operand, index into the seed stream)
ROLES = {
    "fprop_x": ("fprop", 1, 0),
    "fprop_w": ("fprop", 1, 1),
    "dgrad_dy": ("dgrad", 1, 2),
    "dgrad_w": ("dgrad", 0, 3),
    "wgrad_dy": ("wgrad", 0, 4),
    "wgrad_x": ("wgrad", 0, 5),
}
_GEMM_PAIRS = {"fprop": ("fprop_x", "fprop_w"), "dgrad": ("dgrad_dy", "dgrad_w"), "wgrad": ("wgrad_dy", "wgrad_x")}
_HADAMARD_STREAM = {"fprop": 6, "dgrad": 7, "wgrad": 8}
_EVAL_CALL = -1  # the seed stream of forward passes in eval mode
_MASK64 = (1 << 64) - 1
_SEED_BITS = 31


# ----------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------
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
        MXFP4 only: ``"floor"`` (OCP MX v1.0; the block maximum may clip) or
        ``"ceil"`` (never clips; the role of Tseng et al.'s 3/4 pre-scale, which
        keeps stochastic rounding unbiased).

    The block axis is not part of the spec: it is the reduction axis of the GEMM
    the operand enters (see the table in the module docs).

    Examples
    --------
    >>> QuantSpec("nvfp4", rounding="stochastic")
    QuantSpec(scheme='nvfp4', rounding='stochastic', hadamard=0, tile=False, scale_rule='floor')
    >>> QuantSpec().enabled
    False
    """

    scheme: str = "none"
    rounding: str = "nearest"
    hadamard: int = 0
    tile: bool = False
    scale_rule: str = "floor"

    def __post_init__(self):
        if self.scheme not in QUANT_SCHEMES:
            raise ValueError(f"scheme must be one of {QUANT_SCHEMES}, got {self.scheme!r}")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        if self.hadamard != 0 and self.hadamard not in HADAMARD_SIZES:
            raise ValueError(f"hadamard must be 0 (off) or one of {HADAMARD_SIZES}, got {self.hadamard!r}")
        if self.tile and self.scheme != "nvfp4":
            raise ValueError(f"tile (16x16 weight scales) applies to scheme 'nvfp4' only, got scheme {self.scheme!r}")
        if self.scale_rule not in MX_SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {MX_SCALE_RULES}, got {self.scale_rule!r}")
        if self.scale_rule != "floor" and self.scheme != "mxfp4":
            raise ValueError(f"scale_rule applies to scheme 'mxfp4' only, got scheme {self.scheme!r}")
        if self.hadamard and self.tile:
            raise ValueError("a Hadamard-transformed weight has no 16x16 tile structure: use hadamard or tile, not both")

    @property
    def enabled(self) -> bool:
        """False for ``scheme="none"``."""
        return self.scheme != "none"

    @property
    def block_size(self) -> int:
        """Elements per scale along the block axis (0 for per-tensor and none)."""
        return {"mxfp4": MX_BLOCK_SIZE, "nvfp4": NVFP4_BLOCK_SIZE}.get(self.scheme, 0)

    def short(self) -> str:
        """A compact label such as ``nvfp4/sr/rht16``."""
        if not self.enabled:
            return "hp"
        parts = [self.scheme, "sr" if self.rounding == "stochastic" else "rtn"]
        if self.hadamard:
            parts.append(f"rht{self.hadamard}")
        if self.tile:
            parts.append("16x16")
        if self.scale_rule != "floor":
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
        for gemm, (a, b) in _GEMM_PAIRS.items():
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
        return tuple(g for g, pair in _GEMM_PAIRS.items() if any(getattr(self, r).enabled for r in pair))

    def replace(self, **changes) -> "LinearSpec":
        """A copy with some operand specs replaced."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line per GEMM, e.g. ``fprop: x nvfp4/rtn, w nvfp4/rtn/16x16``."""
        lines = []
        for gemm, (a, b) in _GEMM_PAIRS.items():
            lines.append(f"{gemm}: {a.split('_')[1]} {getattr(self, a).short()}, {b.split('_')[1]} {getattr(self, b).short()}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------
# Seeds and random Hadamard
# ----------------------------------------------------------------------------
def mix_seed(*values: int) -> int:
    """Hash integers into one seed in [0, 2**31) (SplitMix64 finaliser, chained).

    Used to derive per-layer, per-step and per-operand seeds that do not collide.

    Examples
    --------
    >>> mix_seed(0, 1) == mix_seed(0, 1), mix_seed(0, 1) == mix_seed(1, 0)
    (True, False)
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> (64 - _SEED_BITS)


def hadamard_signs(block_size: int, seed: int, device=None) -> torch.Tensor:
    """A float32 vector of ``block_size`` +-1 signs from a hash of ``seed`` (no RNG state).

    Examples
    --------
    >>> hadamard_signs(16, 3).abs().sum().item()
    16.0
    """
    u = cheap_uniform((block_size,), seed, device=device)
    return torch.where(u < 0.5, -1.0, 1.0)


def hadamard_along(x: torch.Tensor, axis: int, block_size: int, signs: torch.Tensor) -> torch.Tensor:
    """Apply :func:`fp4lib.block_hadamard` to blocks along ``axis`` (0 or 1) of a 2-D tensor.

    ``x``: float32 ``(rows, cols)``; the transformed axis must be a multiple of
    ``block_size``. Along axis 1 this is ``block_hadamard(x, block_size, signs)``;
    along axis 0 it equals ``block_hadamard(x.T, ...).T`` without the transposed
    copies. Applying it to both operands of a GEMM along the reduction axis, with
    the same signs, leaves the product unchanged (the matrix is orthogonal).

    Examples
    --------
    >>> import torch
    >>> a, b = torch.randn(32, 8), torch.randn(32, 4)
    >>> s = hadamard_signs(16, 0)
    >>> ha, hb = hadamard_along(a, 0, 16, s), hadamard_along(b, 0, 16, s)
    >>> bool(torch.allclose(ha.T @ hb, a.T @ b, atol=1e-5))
    True
    """
    if axis == 1:
        return block_hadamard(x, block_size, signs)
    rows, cols = x.shape
    if rows % block_size:
        raise ValueError(f"axis 0 of x (size {rows}) must be a multiple of the Hadamard block size {block_size}")
    # Row-vector transform v -> v @ M with M = diag(signs) H / sqrt(b), applied to
    # each column block: M^T @ block.
    m = signs.to(x.dtype).unsqueeze(1) * hadamard_matrix(block_size, dtype=x.dtype, device=x.device)
    return torch.matmul(m.t(), x.view(rows // block_size, block_size, cols)).view(rows, cols)


# ----------------------------------------------------------------------------
# Operand fake quantization: reference and dispatch
# ----------------------------------------------------------------------------
_E2M1_MAG_GRID = E2M1.values[:8]  # 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0..7)


def _stochastic_e2m1_codes(scaled: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of ``scaled`` by stochastic rounding with explicit uniforms ``u``."""
    idx = stochastic_round_index(scaled.abs().contiguous(), _E2M1_MAG_GRID.to(scaled.device), u.contiguous())
    return idx.to(torch.uint8) | (torch.signbit(scaled).to(torch.uint8) << 3)


def reference_fake_quant_factored(x: torch.Tensor, spec: QuantSpec, axis: int,
                                  seed: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The slow, obviously-correct fake quantization of one 2-D GEMM operand, factored.

    Parameters
    ----------
    x:
        float32 ``(rows, cols)``.
    spec:
        The operand's :class:`QuantSpec` (its ``hadamard`` is applied by the caller).
    axis:
        0 or 1, the axis the blocks run along (ignored for per-tensor and tiles).
    seed:
        Stochastic rounding: element ``(i, j)`` draws
        ``cheap_uniform((rows, cols), seed)[i, j]``.

    Returns
    -------
    (torch.Tensor, torch.Tensor or None)
        ``(values, tensor_scale)``: float32 of ``x``'s shape holding each E2M1
        value times its block's decode scale (exact in float32 and bfloat16), and
        the 0-d per-tensor decode scale (NVFP4's ``s_dec``, the per-tensor
        scheme's ``amax / 6``), or ``None`` (MXFP4, or ``scheme="none"``, where
        ``values`` is ``x`` itself). The dequantized operand is
        ``values * tensor_scale``.

    Block schemes are :func:`fp4lib.quantize` and :meth:`QuantizedTensor.factored`;
    for stochastic rounding the codes come from
    :func:`fp4lib.rounding.stochastic_round_index` with the hash draws, on the
    scales :func:`fp4lib.quantize` chose. The per-tensor scheme is
    ``E2M1.encode(x / s)`` with ``s = amax / 6``. A NaN or +-Inf anywhere gives
    all-NaN values.
    """
    if not spec.enabled:
        return x, None
    if not bool(torch.isfinite(x).all()):
        return torch.full_like(x, float("nan")), None
    stochastic = spec.rounding == "stochastic"
    u = cheap_uniform(x.shape, seed, device=x.device) if stochastic else None
    if spec.scheme == PER_TENSOR:
        amax = x.abs().amax()
        scale = torch.where(amax > 0, amax / E2M1_MAX, torch.ones_like(amax))
        scaled = x / scale
        codes = _stochastic_e2m1_codes(scaled, u) if stochastic else E2M1.encode(scaled)
        return E2M1.decode(codes), scale
    kwargs = {"tile": True} if spec.tile else {}
    if spec.scheme == "mxfp4":
        kwargs["scale_rule"] = spec.scale_rule
    moved = x if (spec.tile or axis == 1) else x.t()
    q = quantize(moved, spec.scheme, **kwargs)
    if stochastic:  # the same scales; new codes from the hash draws
        u = u if moved is x else u.t()
        rows, cols = moved.shape
        if spec.scheme == "mxfp4":
            e = q.scale.view(torch.uint8).to(torch.int32) - 127
            inv = torch.ldexp(torch.ones_like(e, dtype=torch.float32), -e)
            scaled = (moved.reshape(rows, cols // MX_BLOCK_SIZE, MX_BLOCK_SIZE) * inv.unsqueeze(-1)).reshape(rows, cols)
        else:
            denom = q.block_scales()  # s_dec_b * s_dec, as scaling.py computes it
            s_enc_b = torch.where(denom > 0, 1.0 / denom, torch.zeros_like(denom)).clamp(max=torch.finfo(torch.float32).max)
            if spec.tile:
                t = NVFP4_TILE
                scaled = moved.reshape(rows // t, t, cols // t, t) * s_enc_b[:, None, :, None]
            else:
                scaled = moved.reshape(rows, cols // NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE) * s_enc_b.unsqueeze(-1)
            scaled = scaled.reshape(rows, cols)
        codes = _stochastic_e2m1_codes(scaled, u)
        q = dataclasses.replace(q, packed=pack_nibbles(codes, "low_first"), rounding="stochastic")
    values, tensor_scale = q.factored()
    return (values if moved is x else values.t()), tensor_scale


def reference_fake_quant(x: torch.Tensor, spec: QuantSpec, axis: int, seed: int = 0) -> torch.Tensor:
    """:func:`reference_fake_quant_factored` multiplied out: the dequantized operand.

    Returns float32 of ``x``'s shape (a view of a transposed tensor when ``axis=0``).
    Round-to-nearest block schemes equal :func:`fp4lib.fake_quantize` bit for bit.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.3, -1.0, 2.9, 6.0] * 4])
    >>> reference_fake_quant(x, QuantSpec("e2m1_per_tensor"), axis=1)[0, :4].tolist()
    [0.5, -1.0, 3.0, 6.0]
    """
    values, tensor_scale = reference_fake_quant_factored(x, spec, axis, seed)
    return values if tensor_scale is None else values * tensor_scale


def _resolve_backend(backend: str) -> str:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if backend == "auto":
        return "compiled" if compile_works() else "fused"
    return backend


def fake_quant_factored(x: torch.Tensor, spec: QuantSpec, axis: int, seed: int = 0,
                        backend: str = "fused") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(values, tensor_scale)`` of one 2-D float32 operand with the chosen backend.

    The factored form of :func:`reference_fake_quant_factored`, bit for bit, from
    any backend: ``"reference"``, ``"fused"``, ``"compiled"`` or ``"auto"``
    (compiled where ``torch.compile`` works). The Hadamard transform is not applied
    here (see :func:`hadamard_along`).
    """
    if not spec.enabled:
        return x, None
    backend = _resolve_backend(backend)
    if backend == "reference":
        return reference_fake_quant_factored(x, spec, axis, seed)
    fn = compiled_fake_quant() if backend == "compiled" else fake_quant_fused
    seed_t = seed_term(seed).to(x.device, non_blocking=True)
    return fn(x.contiguous(), seed_t, spec.scheme, axis, spec.rounding, spec.tile, spec.scale_rule)


def fake_quant_operand(x: torch.Tensor, spec: QuantSpec, axis: int, seed: int = 0, backend: str = "fused") -> torch.Tensor:
    """Fake-quantize one 2-D float32 operand with the chosen backend: the dequantized values.

    ``backend``: ``"reference"``, ``"fused"``, ``"compiled"`` or ``"auto"``
    (compiled where ``torch.compile`` works). All give identical bits; the
    Hadamard transform is not applied here (see :func:`hadamard_along`).

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(32, 64)
    >>> spec = QuantSpec("nvfp4", rounding="stochastic")
    >>> ref = reference_fake_quant(x, spec, axis=0, seed=7)
    >>> torch.equal(fake_quant_operand(x, spec, axis=0, seed=7, backend="fused"), ref)
    True
    """
    values, tensor_scale = fake_quant_factored(x, spec, axis, seed, backend)
    return values if tensor_scale is None else values * tensor_scale


def _quantize_gemm_pair(a, b, spec_a, spec_b, axis_a, axis_b, seeds, hadamard_seed, backend):
    """Hadamard (if any) then factored fake quant of both operands of one GEMM (float32 2-D).

    Returns ``((a_values, a_scale), (b_values, b_scale))``.
    """
    if spec_a.hadamard:
        signs = hadamard_signs(spec_a.hadamard, hadamard_seed, device=a.device)
        a = hadamard_along(a, axis_a, spec_a.hadamard, signs)
        b = hadamard_along(b, axis_b, spec_a.hadamard, signs)
    return (
        fake_quant_factored(a, spec_a, axis_a, seeds[0], backend),
        fake_quant_factored(b, spec_b, axis_b, seeds[1], backend),
    )


def scaled_gemm(a: Tuple[torch.Tensor, Optional[torch.Tensor]], b: Tuple[torch.Tensor, Optional[torch.Tensor]],
                gemm_dtype: torch.dtype) -> torch.Tensor:
    """``(a_values @ b_values) * (a_scale * b_scale)``, as a block-scaled FP4 GEMM computes it.

    ``a``, ``b``: ``(values, tensor_scale)`` pairs of 2-D float32 operands (see
    :func:`fake_quant_factored`); ``values`` already carry their block scales.
    The products are formed from ``values`` cast to ``gemm_dtype`` (a lossless
    cast for quantized operands, whose E2M1 x E4M3 or E2M1 x E8M0 products fit in
    bfloat16), accumulated in float32, and the per-tensor scales multiply the
    float32 result once, as the hardware's epilogue does with its ``alpha``.
    Returns float32; the caller casts to its output dtype, one rounding in all.
    """
    (av, a_scale), (bv, b_scale) = a, b
    if gemm_dtype == torch.float32:
        y = av @ bv
    else:
        av, bv = av.to(gemm_dtype), bv.to(gemm_dtype)
        if av.is_cuda:  # tensor-core products, float32 accumulation and output
            y = torch.mm(av, bv, out_dtype=torch.float32)
        else:  # the same arithmetic: the products of these values are exact in float32
            y = av.float() @ bv.float()
    alpha = None
    for s in (a_scale, b_scale):
        if s is not None:
            alpha = s if alpha is None else alpha * s
    return y if alpha is None else y * alpha


def _weight_axis_free(spec: QuantSpec) -> bool:
    """True when the quantized weight does not depend on the block axis."""
    return spec.enabled and spec.rounding == "nearest" and not spec.hadamard and (spec.tile or spec.scheme == PER_TENSOR)


# ----------------------------------------------------------------------------
# The autograd function and the layer
# ----------------------------------------------------------------------------
class FP4LinearFunction(torch.autograd.Function):
    """``Y = X W^T + b`` with fake-quantized operands in all three GEMMs.

    ``forward(x, weight, bias, spec, call_seed, backend, gemm_dtype)``: ``x`` of
    shape ``(*, in_features)``, ``weight`` ``(out_features, in_features)``,
    ``bias`` ``(out_features,)`` or ``None``; ``call_seed`` an int from which every
    operand's rounding and Hadamard seeds derive. Quantization runs in float32.
    Each GEMM multiplies block-scaled values (exact in bfloat16), accumulates in
    float32 and applies the operands' per-tensor scales to its float32 output
    (:func:`scaled_gemm`), whether ``gemm_dtype`` is float32 or bfloat16 (under
    autocast): the two agree up to the final rounding to ``gemm_dtype``. The bias
    and its gradient stay in high precision. Returns ``(*, out_features)`` in
    ``gemm_dtype``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spec: LinearSpec, call_seed: int, backend: str, gemm_dtype):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features).float().contiguous()  # (N, in)
        w32 = weight.float()  # (out, in)
        seeds = {r: mix_seed(call_seed, ROLES[r][2]) for r in ROLES}
        had = {g: mix_seed(call_seed, s) for g, s in _HADAMARD_STREAM.items()}
        xq, wq = _quantize_gemm_pair(
            x2, w32, spec.fprop_x, spec.fprop_w, 1, 1, (seeds["fprop_x"], seeds["fprop_w"]), had["fprop"], backend
        )
        y = scaled_gemm(xq, (wq[0].t(), wq[1]), gemm_dtype)  # (N, out), float32
        if bias is not None:
            y = y + bias.float()
        reuse_w = spec.dgrad_w == spec.fprop_w and _weight_axis_free(spec.fprop_w) and not spec.dgrad_dy.hadamard
        ctx.save_for_backward(x2, weight, wq[0] if reuse_w else None, wq[1] if reuse_w else None)
        ctx.reuse_w = reuse_w
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.spec, ctx.seeds, ctx.had, ctx.backend, ctx.gemm_dtype = spec, seeds, had, backend, gemm_dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.to(gemm_dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, wq_values, wq_scale = ctx.saved_tensors
        spec, seeds, had, backend, dt = ctx.spec, ctx.seeds, ctx.had, ctx.backend, ctx.gemm_dtype
        dy2 = dy.reshape(-1, weight.shape[0]).float().contiguous()  # (N, out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.reuse_w and not spec.dgrad_dy.hadamard:
                dyq = fake_quant_factored(dy2, spec.dgrad_dy, 1, seeds["dgrad_dy"], backend)
                wq = (wq_values, wq_scale)
            else:
                dyq, wq = _quantize_gemm_pair(
                    dy2, weight.float(), spec.dgrad_dy, spec.dgrad_w, 1, 0,
                    (seeds["dgrad_dy"], seeds["dgrad_w"]), had["dgrad"], backend,
                )
            dx = scaled_gemm(dyq, wq, dt).to(dt).reshape(ctx.x_shape).to(ctx.x_dtype)  # (N, in)
        if ctx.needs_input_grad[1]:
            dyq, xq = _quantize_gemm_pair(
                dy2, x2, spec.wgrad_dy, spec.wgrad_x, 0, 0, (seeds["wgrad_dy"], seeds["wgrad_x"]), had["wgrad"], backend
            )
            dw = scaled_gemm((dyq[0].t(), dyq[1]), xq, dt).to(dt).to(weight.dtype)  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


def _check_divisible(name: str, size: int, spec: QuantSpec, what: str) -> None:
    need = max(spec.block_size, NVFP4_TILE if spec.tile else 0, spec.hadamard)
    if need and size % need:
        raise ValueError(f"FP4Linear: {name} = {size} must be a multiple of {need} for {what} ({spec.short()})")


class FP4Linear(nn.Linear):
    """A drop-in ``nn.Linear`` whose three GEMMs see fake-quantized operands.

    Parameters
    ----------
    in_features, out_features, bias, device, dtype:
        As for ``nn.Linear``.
    spec:
        The :class:`LinearSpec`. All off (the default) is exactly ``nn.Linear``.
    backend:
        ``"auto"`` (compiled where ``torch.compile`` works, else fused),
        ``"compiled"``, ``"fused"`` or ``"reference"``; identical results.
    seed:
        Base seed of this layer's stochastic rounding and Hadamard signs. Each
        training-mode forward call advances a counter, so every step draws fresh
        noise; the counter and seed are saved in ``state_dict`` (extra state), so
        a resumed run draws the same noise as an uninterrupted one.

    Attributes
    ----------
    quantize:
        Set to ``False`` to run in high precision without changing the spec (the
        "switch to high precision for the final stretch" of training).

    Examples
    --------
    >>> import torch
    >>> nv = QuantSpec("nvfp4")
    >>> layer = FP4Linear(64, 32, spec=LinearSpec(fprop_x=nv, fprop_w=nv), backend="fused")
    >>> layer(torch.randn(2, 16, 64)).shape
    torch.Size([2, 16, 32])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 spec: LinearSpec = LinearSpec(), backend: str = "auto", seed: int = 0):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if not isinstance(spec, LinearSpec):
            raise TypeError(f"spec must be a LinearSpec, got {type(spec).__name__}")
        _resolve_backend(backend)  # validates the name
        for role, (gemm, axis, _) in ROLES.items():
            s = getattr(spec, role)
            if role.endswith("_w"):
                if s.tile:
                    _check_divisible("in_features", in_features, s, role)
                    _check_divisible("out_features", out_features, s, role)
                else:
                    _check_divisible("in_features" if axis == 1 else "out_features",
                                     in_features if axis == 1 else out_features, s, role)
            elif gemm == "fprop":
                _check_divisible("in_features", in_features, s, role)
            elif gemm == "dgrad":
                _check_divisible("out_features", out_features, s, role)
        self.spec = spec
        self.backend = backend
        self.seed = int(seed)
        self.calls = 0
        self.quantize = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LinearSpec, *, backend: str = "auto", seed: int = 0) -> "FP4Linear":
        """An FP4Linear sharing ``linear``'s weight and bias Parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  spec=spec, backend=backend, seed=seed)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    @property
    def active(self) -> bool:
        """True when this layer quantizes (a spec with something on, and ``quantize``)."""
        return self.quantize and self.spec.enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return F.linear(x, self.weight, self.bias)
        n_tokens = x.numel() // x.shape[-1]
        if torch.is_grad_enabled() and self.weight.requires_grad:
            for role in ("wgrad_dy", "wgrad_x"):
                s = getattr(self.spec, role)
                need = max(s.block_size, s.hadamard)
                if s.enabled and need and n_tokens % need:
                    raise ValueError(
                        f"FP4Linear: the Wgrad GEMM blocks along the token axis, so the number of tokens "
                        f"(N = {n_tokens}, the product of x's leading dims {tuple(x.shape[:-1])}) must be a "
                        f"multiple of {need} for {role} ({s.short()})"
                    )
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            gemm_dtype = torch.get_autocast_dtype(device_type)
        else:
            gemm_dtype = x.dtype
        if self.training:
            self.calls += 1
            call_seed = mix_seed(self.seed, self.calls)
        else:
            call_seed = mix_seed(self.seed, _EVAL_CALL)
        backend = _resolve_backend(self.backend)
        with torch.autocast(device_type, enabled=False):
            return FP4LinearFunction.apply(x, self.weight, self.bias, self.spec, call_seed, backend, gemm_dtype)

    def get_extra_state(self):
        return {"seed": self.seed, "calls": self.calls}

    def set_extra_state(self, state):
        self.seed = int(state["seed"])
        self.calls = int(state["calls"])

    def extra_repr(self) -> str:
        on = "" if self.quantize else ", quantize=False"
        labels = ", ".join(f"{r}={getattr(self.spec, r).short()}" for r in ROLES)
        return f"{super().extra_repr()}, {labels}{on}"
