"""The scale arithmetic of every scheme, written once: the reference quantizers
(:mod:`fp4lib.numerics.reference`) and the compiled kernels
(:mod:`fp4lib.numerics.kernels`) both call these functions, which are plain tensor
operations that compile.

Every division is a true float32 division on every device: a divisor that is a
Python number is made a run-time tensor first (:func:`exact_constant`), since CUDA
would multiply by its reciprocal instead, and so is the numerator of a reciprocal
(``1.0 / t`` compiles to an approximate reciprocal on a GPU).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .constants import (
    BNB_ABSMAX_FLOOR,
    E2M1_EMAX,
    E2M1_MAX,
    E2M1_MAX_RCP,
    E4M3_MAX,
    E8M0_EXP_BIAS,
    E8M0_MAX_EXP,
    E8M0_MIN_EXP,
    E8M0_NAN,
    FLOAT32_EXP_BIAS,
    FLOAT32_MAN_BITS,
    FLOAT32_MAX,
    NVFP4_4OVER6_EXPAND,
    NVFP4_4OVER6_SCALE_MAX,
    NVFP4_4OVER6_TARGET,
)
from .schemes import FP8_SCHEMES, ErrorMetric, ScaleFormula, scheme_info

__all__ = ["pow2", "exact_constant", "e8m0_to_float", "e2m1_tensor_scale", "bnb_scale_blocks", "bnb_scale_tail",
           "mx_scale_exponents", "nvfp4_tensor_scale", "e4m3_round_up", "nvfp4_block_scales", "nvfp4_four_over_six",
           "fp8_tensor_scale"]


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


def exact_constant(like: torch.Tensor, value: float) -> torch.Tensor:
    """``value`` as a float32 tensor of ``like``'s shape and device, computed at run time.

    The divisor of a device-independent division. ``t / 6.0`` divides exactly on
    the CPU, but CUDA multiplies by the reciprocal of a Python number (or of a
    CPU scalar tensor), and Inductor does the same on the GPU for any divisor it
    can prove constant (``full_like`` included): about a third of float32
    quotients by 6 come out one ulp off. ``t / exact_constant(t, 6.0)`` is a true
    division everywhere: eagerly on any device, and in compiled code where
    Inductor divides exactly (``eager_numerics.division_rounding``, which
    :mod:`fp4lib.numerics.kernels` sets for its kernels). ``value`` must be a float32 number.

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


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 scales (``torch.float8_e8m0fnu``) as float32 powers of two; the NaN code gives NaN."""
    e = scale.view(torch.uint8).to(torch.int32) - E8M0_EXP_BIAS
    out = pow2(e.clamp(max=E8M0_MAX_EXP))
    return torch.where(scale.view(torch.uint8) == E8M0_NAN, torch.full_like(out, float("nan")), out)


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
    is what makes the codes bit-identical to its ``quantize_4bit``. The reciprocal
    is a true division of tensors, correctly rounded on every device (a compiled
    ``1.0 / t`` is approximate on a GPU).
    """
    absmax = blocks.abs().amax(dim=-1)
    absmax_c = absmax.clamp(min=BNB_ABSMAX_FLOOR)
    scaled = torch.clamp(blocks * (exact_constant(absmax_c, 1.0) / absmax_c).unsqueeze(-1), -1, 1)
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
    rules = scheme_info("mxfp4").scale_rules
    if scale_rule not in rules:
        raise ValueError(f"scale_rule must be one of {tuple(r.value for r in rules)}, got {scale_rule!r}")
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
    return s_enc, exact_constant(s_enc, 1.0) / s_enc


def nvfp4_tensor_scale(amax: torch.Tensor, scale_max: float = E4M3_MAX) -> Tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 per-tensor scales ``(s_enc, s_dec)`` in float32.

    ``s_enc = 6 * scale_max / amax`` (1 when amax is 0, capped at the float32
    maximum), ``s_dec = 1 / s_enc``: a true float32 division of the exact product
    ``6 * scale_max`` (2688, or 1536), as Transformer Engine's kernels compute it in
    2025 and 2026 alike, so there is no :class:`~fp4lib.numerics.schemes.ScaleFormula`
    choice here. (Transformer Engine's pure-PyTorch reference gives ``s_enc`` the
    float32 maximum instead of 1 for an all-zero tensor; its kernels give 1. Every
    code and block scale of such a tensor is 0 either way.) ``scale_max`` is the largest block scale the
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


_FORMULAS = tuple(f.value for f in ScaleFormula)
_METRICS = tuple(m.value for m in ErrorMetric)


def _formula(formula: str) -> str:
    if formula not in _FORMULAS:
        raise ValueError(f"formula must be one of {_FORMULAS}, got {formula!r}")
    return str(formula)


def _e4m3_scales(ideal: torch.Tensor, s_dec: torch.Tensor, rule: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s_dec_b, s_enc_b)`` from float32 ideal block scales: E4M3 rounding under ``rule``, then the encode scale."""
    if rule == "up":
        s_dec_b = e4m3_round_up(ideal)
    else:
        s_dec_b = ideal.to(torch.float8_e4m3fn).to(torch.float32)
    denom = s_dec_b * s_dec
    s_enc_b = torch.where(denom > 0, exact_constant(denom, 1.0) / denom, torch.zeros_like(denom)).clamp(max=FLOAT32_MAX)
    return s_dec_b, s_enc_b


def nvfp4_block_scales(amax_b: torch.Tensor, s_enc: torch.Tensor, s_dec: torch.Tensor, rule: str = "nearest",
                       target: float = E2M1_MAX, formula: str = "te2025") -> Tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 block scales ``(s_dec_b, s_enc_b)`` from block amax values and the tensor's scales.

    ``s_dec_b = e4m3(ideal)``, returned as float32 values of E4M3 numbers: rounded
    to nearest even and saturating at 448 (``rule="nearest"``, the standard), or
    rounded up (``rule="up"``), so that no block maximum lands above ``target`` and
    stochastic rounding never has to clamp it. ``target`` is the E2M1 value the
    block maximum maps to: 6, or 4 for four-over-six's second candidate.

    The ideal scale depends on ``formula`` (:class:`~fp4lib.numerics.schemes.ScaleFormula`),
    all in float32:

    * ``"te2025"`` (default): ``(amax_b / target) * s_enc``, a true division
      (Transformer Engine's order until 2025);
    * ``"te2026"``: ``amax_b * (s_enc * fl(1/6))`` with ``fl(1/6)`` the float32
      0x3E2AAAAB, multiplied (Transformer Engine's 2026 kernels and reference), then
      capped at 448 before the cast; ``target`` must be 6 (four-over-six's
      candidates are made in :func:`nvfp4_four_over_six`).

    The two can differ in the last bit, which moves a block scale lying on an E4M3
    rounding midpoint to the neighbouring E4M3 number (chapter 2 counts them on a
    bf16 tensor): with a tensor amax of 4.375 and a block maximum of 1.640625,
    ``"te2025"`` gives exactly 168, the midpoint of 160 and 176, which rounds to
    even, 160; ``"te2026"`` gives 168.00002, which rounds to 176.

    ``s_enc_b = 1 / (s_dec_b * s_dec)``, or 0 for a block whose scale rounds to 0
    (it holds only magnitudes below about 2e-6 of the tensor's amax, and decodes to
    zeros). Transformer Engine gives such a block the float32 maximum as its encode
    scale instead, so its nonzero elements saturate to the codes of +-6 (7 and 15)
    and its zeros get code 0; fp4lib's elements become +-0, codes 0 for positive
    and 8 for negative ones (and for -0.0). Both decode every element of the block
    to zero, and the choice between four-over-six's candidates is unaffected.
    """
    if _formula(formula) == "te2026":
        if target != E2M1_MAX:
            raise ValueError("formula='te2026' makes four-over-six's candidates in nvfp4_four_over_six; target must be 6")
        ideal = amax_b * (s_enc * exact_constant(s_enc, E2M1_MAX_RCP))
        ideal = ideal.clamp(max=E4M3_MAX)
    else:
        ideal = (amax_b / exact_constant(amax_b, target)) * s_enc
    return _e4m3_scales(ideal, s_dec, rule)


def _te_sum(e: torch.Tensor, dims, term: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """A block's error sum in Transformer Engine's order (in float32 for ``"te2026"``, as
    Transformer Engine sums; in float64 for ``"te2025"``), keeping the block axes as size 1:
    one element after another along the block (the last of two axes for a 16x16 tile), then
    a tile's 16 row sums pairwise (rows i and i + 8, then i + 4, i + 2, i + 1). ``term``:
    applied to each element before it is added (``e`` itself when ``None``)."""
    term = term or (lambda t: t)
    dims = sorted(d % e.dim() for d in ((dims,) if isinstance(dims, int) else dims))
    along = dims[-1]
    acc = term(e.narrow(along, 0, 1))
    for i in range(1, e.shape[along]):
        acc = acc + term(e.narrow(along, i, 1))
    if len(dims) == 2:
        rows = dims[0]
        n = acc.shape[rows]
        while n > 1:
            n //= 2
            acc = acc.narrow(rows, 0, n) + acc.narrow(rows, n, n)
        # The one sum left, taken out and put back on an axis that is now literally of
        # size 1: with dynamic shapes Inductor carries the tile's 16 rows as an expression
        # of the tensor's (rows // (rows // 16)), cannot show that the narrowed axis has
        # size 1, and then broadcast it wrongly against the tile.
        acc = acc.select(rows, 0).unsqueeze(rows)
    return acc


def _error_sum64(blocks: torch.Tensor, s_enc: torch.Tensor, s_dec_b: torch.Tensor, s_enc_b: torch.Tensor, dims,
                 round_nearest: Callable[[torch.Tensor], torch.Tensor], metric: str) -> torch.Tensor:
    """Four-over-six's ``"te2025"`` error of one candidate block scale, summed in float64 in
    :func:`_te_sum`'s order (the block axes kept as size 1).

    Each element's error ``q * S - x * s_enc`` is made in float32 and squared (or its
    magnitude taken) in float64, exactly. The order of the sum is fixed, so every path
    and device adds the same numbers in the same order. Two formulations, the same
    operations on the same values: when the block axis is not the tensor's last (blocks
    along the token axis), each element's error is made from its own slice and added as
    it is made, which compiles to one pass without storing the errors. The error is made
    from the element's magnitude ``|x|``, as :func:`nvfp4_four_over_six` says.
    """
    def err32(b):
        a = b.abs()
        return round_nearest(a * s_enc_b) * s_dec_b - a * s_enc

    def term(e):
        e = e.double()
        return e.square() if metric == "mse" else e.abs()

    dims = sorted(d % blocks.dim() for d in ((dims,) if isinstance(dims, int) else dims))
    if len(dims) == 1 and dims[0] != blocks.dim() - 1:
        return _te_sum(blocks, dims, lambda b: term(err32(b)))
    return _te_sum(err32(blocks), dims, term)


def nvfp4_four_over_six(blocks: torch.Tensor, amax_b: torch.Tensor, s_enc: torch.Tensor, s_dec: torch.Tensor,
                        dims, round_nearest: Callable[[torch.Tensor], torch.Tensor], metric: str = "mse",
                        formula: str = "te2025", amax: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Four-over-six block scales ``(s_dec_b, s_enc_b)`` (Cook et al. 2025, arXiv 2512.02010).

    Each block gets one of two scales: the standard one, which maps its maximum to
    6, or one that maps it to 4, whichever gives the smaller error after
    round-to-nearest: the summed squared error (``metric="mse"``, the default and
    the four-over-six authors') or the summed absolute error (``"mae"``,
    Transformer Engine's default). Near 6 the E2M1 grid steps by 2; mapping the
    maximum to 4 trades range for the finer steps below 4. ``blocks``: the tensor's
    blocks in float32, ``amax_b`` their maxima broadcastable against them, ``dims``
    the block axes (two for a 16x16 tile: its rows, then its columns),
    ``round_nearest`` E2M1 round-to-nearest-even on values, which is only given
    magnitudes: every error below is made from ``|x|`` instead of ``x``, which gives the
    same error with its sign dropped, since the grid, its rounding and each float32
    operation here are symmetric about zero (a zero error may lose its sign, which
    neither its square nor its magnitude keeps). The tensor's scales
    must come from ``nvfp4_tensor_scale(amax, 256)`` so that both candidates fit
    E4M3. A tie, or a NaN error, keeps 6.

    ``formula="te2025"`` (default): the candidates are ``(amax_b / 6) * s_enc``
    and ``(amax_b / 4) * s_enc`` (the authors' formulas), and a candidate's error
    with block scale ``S`` is summed in float64 over the block from
    ``q * S - x * s_enc``, where ``q * S`` is exact (an E2M1 value times an E4M3
    one): every term is computed exactly alike on every path, and no block of
    finite float32 values overflows or underflows it. The terms are added in a
    fixed order, one element after another along the block (a 16x16 tile: along
    each row, then the 16 row sums pairwise, as :func:`_te_sum`), so that the sum,
    and with it the choice in a near-tie, is the same on every path and device.

    ``formula="te2026"``: Transformer Engine's arithmetic, which ``amax`` (the
    tensor's amax, from which ``s_enc`` was computed) is needed for. The candidates
    are ``base = (amax_b / 6) * s_enc`` and ``base * 1.5``, each capped at 448 and
    cast to E4M3; a candidate's error is computed in the input's domain,
    ``((q * S) * amax) / 1536 - x``, squared or absolute in float32, and summed in
    float32 in Transformer Engine's order (see :func:`_te_sum`). Those float32 sums
    are what Transformer Engine's and the authors' selections compare, so they share
    their limits: under MSE an element's squared error overflows float32 to inf
    once the error passes about 1.8e19 and underflows to 0 below about 2.6e-23
    (errors are a fraction of the block's magnitudes), so a block of very large or
    very small values can tie at inf or at 0 and keep 6 where the exact comparison
    would pick 4; the ``"te2025"`` float64 sum has no such limit for float32 inputs.
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if _formula(formula) == "te2026":
        if amax is None:
            raise ValueError("formula='te2026' computes four-over-six's errors from the tensor's amax; pass amax")
        base = (amax_b / exact_constant(amax_b, E2M1_MAX)) * s_enc
        candidates = (_e4m3_scales(base.clamp(max=E4M3_MAX), s_dec, "nearest"),
                      _e4m3_scales((base * NVFP4_4OVER6_EXPAND).clamp(max=E4M3_MAX), s_dec, "nearest"))
        denom = exact_constant(blocks, E2M1_MAX * NVFP4_4OVER6_SCALE_MAX)
        errors = []
        mags = blocks.abs()
        for s_dec_b, s_enc_b in candidates:
            d = ((round_nearest(mags * s_enc_b) * s_dec_b) * amax) / denom - mags
            errors.append(_te_sum(d * d if metric == "mse" else d.abs(), dims))
    else:
        candidates = (nvfp4_block_scales(amax_b, s_enc, s_dec),
                      nvfp4_block_scales(amax_b, s_enc, s_dec, target=NVFP4_4OVER6_TARGET))
        errors = [_error_sum64(blocks, s_enc, s_dec_b, s_enc_b, dims, round_nearest, metric)
                  for s_dec_b, s_enc_b in candidates]
    use4 = errors[1] < errors[0]
    (d6, e6), (d4, e4) = candidates
    return torch.where(use4, d4, d6), torch.where(use4, e4, e6)


def fp8_tensor_scale(amax: torch.Tensor, scheme: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor current scaling for FP8: ``(s_enc, s_dec)`` with ``s_enc = fmax / amax``.

    Examples
    --------
    >>> import torch
    >>> [float(s) for s in fp8_tensor_scale(torch.tensor(448.0), "fp8_e4m3")]
    [1.0, 1.0]
    """
    if scheme not in FP8_SCHEMES:
        raise ValueError(f"scheme must be one of {FP8_SCHEMES}, got {scheme!r}")
    return _current_scale(amax, scheme_info(scheme).element_max)
