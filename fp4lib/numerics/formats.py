"""The three 4-bit element formats: OCP E2M1, bitsandbytes' "fp4" table and NF4.

Each format is a table of 16 values indexed by a 4-bit code (bit 0 = least
significant bit). An :class:`ElementFormat` turns values already scaled into the
format's range into codes (``encode``) and codes back into values (``decode``).
Block scaling lives in :mod:`fp4lib.numerics.quantize`; chapter 1 of the book introduces
these formats.

* :data:`E2M1` -- OCP Microscaling v1.0 FP4: 1 sign, 2 exponent (bias 1) and
  1 mantissa bit, values {0, 0.5, 1, 1.5, 2, 3, 4, 6} and their negatives. No Inf,
  no NaN; ``nearest`` rounds ties to even and saturates to +-6.
* :data:`BNB_FP4` -- bitsandbytes' ``quant_type="fp4"`` table, normalised to
  absmax 1. It is **not** E2M1: a different bit assignment and a smallest
  subnormal of 1/192 instead of 1/12 of the maximum. ``nearest`` reproduces
  bitsandbytes' CPU quantizer bit for bit (exact ties go to the lower value).
* :data:`NF4` -- bitsandbytes' NormalFloat-4: 16 quantiles of a normal
  distribution, a lookup table rather than a float encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .constants import E2M1_EXP_BIAS, E2M1_MAX, EXP_MASK, MAN_MASK, SIGN_MASK
from .rounding import check_rounding, stochastic_round_index

__all__ = ["CodeFields", "ElementFormat", "E2M1", "BNB_FP4", "NF4", "FORMATS"]


@dataclass(frozen=True)
class CodeFields:
    """The bit fields of one 4-bit code.

    ``bits`` is the code as a 4-character string, most significant bit first.
    ``exponent`` and ``mantissa`` are the raw field values (``None`` for NF4,
    which has no fields); ``subnormal`` is ``True`` when the exponent field is 0
    and the code is a nonzero value.
    """

    code: int
    bits: str
    sign: int
    exponent: Optional[int]
    mantissa: Optional[int]
    subnormal: Optional[bool]
    value: float


class ElementFormat:
    """A 4-bit element format: a table of 16 float32 values indexed by code.

    Parameters
    ----------
    name:
        Short name, e.g. ``"e2m1"``.
    values:
        The 16 code values, indexed by code.
    kind:
        ``"e2m1"`` (OCP float, sign-magnitude, ties to even) or ``"table"``
        (bitsandbytes' lookup tables, ties to the lower value).
    description:
        One line for tables and plots.
    """

    def __init__(self, name: str, values: List[float], kind: str, description: str):
        if len(values) != 16:
            raise ValueError(f"values must have 16 entries, got {len(values)}")
        if kind not in ("e2m1", "table"):
            raise ValueError(f"kind must be 'e2m1' or 'table', got {kind!r}")
        self.name = name
        self.kind = kind
        self.description = description
        self._values = torch.tensor(values, dtype=torch.float32)
        # Sorted order of the table, stable so that of two equal entries the lower
        # code comes first (bitsandbytes' fp4 table has 0.0 at codes 0 and 8).
        order = torch.sort(self._values, stable=True).indices
        sorted_vals = self._values[order]
        self._order = order.to(torch.uint8)
        # Float32 midpoints exactly as bitsandbytes computes them.
        self._midpoints = (sorted_vals[:-1] + sorted_vals[1:]) * 0.5  # exact halving
        # Distinct values and one canonical code each, for stochastic rounding.
        distinct: List[float] = []
        codes: List[int] = []
        for v, c in zip(sorted_vals.tolist(), order.tolist()):
            if distinct and v == distinct[-1]:
                continue
            distinct.append(v)
            codes.append(c)
        self._grid = torch.tensor(distinct, dtype=torch.float32)
        self._grid_codes = torch.tensor(codes, dtype=torch.uint8)
        # E2M1 works on magnitudes: grid of the 8 non-negative values, codes 0..7.
        self._mag_grid = self._values[:8].clone()
        self._mag_mid = (self._mag_grid[:-1] + self._mag_grid[1:]) * 0.5
        self._cache: dict = {}

    # ------------------------------------------------------------------ values
    @property
    def values(self) -> torch.Tensor:
        """The 16 code values as a float32 tensor of shape (16,), indexed by code."""
        return self._values.clone()

    @property
    def max(self) -> float:
        """The largest representable magnitude (6.0 for E2M1, 1.0 for the tables)."""
        return float(self._values.abs().max())

    def __repr__(self) -> str:
        return f"ElementFormat({self.name!r}: {self.description})"

    def _on(self, device: torch.device, what: str) -> torch.Tensor:
        key = (what, device)
        t = self._cache.get(key)
        if t is None:
            t = getattr(self, what).to(device)
            self._cache[key] = t
        return t

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        x: torch.Tensor,
        rounding: str = "nearest",
        generator: Optional[torch.Generator] = None,
        uniforms: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Round ``x`` (already scaled into the format's range) to 4-bit codes.

        Parameters
        ----------
        x:
            Floating-point tensor of any shape. Values beyond the format's largest
            magnitude saturate to it. NaN raises ``ValueError``.
        rounding:
            ``"nearest"``: E2M1 rounds to nearest, ties to even; the
            bitsandbytes tables reproduce bitsandbytes' CPU quantizer (ties to the
            lower value). ``"stochastic"``: one of the two neighbouring values,
            chosen with probability proportional to closeness, so that
            ``E[decode(encode(x))] == x`` inside the range.
        generator:
            Optional ``torch.Generator`` (on ``x``'s device) seeding stochastic
            rounding.
        uniforms:
            Stochastic rounding only: the uniform [0, 1) draws to use, float32 of
            ``x``'s shape (e.g. :func:`fp4lib.numerics.rounding.cheap_uniform`), instead of
            drawing them from ``generator``.

        Returns
        -------
        torch.Tensor
            uint8 codes in 0..15, same shape as ``x``.

        Examples
        --------
        >>> import torch
        >>> from fp4lib import E2M1
        >>> E2M1.encode(torch.tensor([0.25, 0.75, 2.5, 5.0, 7.0, -1.0])).tolist()
        [0, 2, 4, 6, 7, 10]
        """
        check_rounding(rounding)
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        x = x.float()
        nan = torch.isnan(x)
        if bool(nan.any()):
            raise ValueError(
                f"x contains {int(nan.sum())} NaN value(s); {self.name} has no NaN encoding"
            )
        if uniforms is not None:
            if rounding != "stochastic":
                raise ValueError("uniforms are the draws of stochastic rounding; pass rounding='stochastic'")
            if uniforms.shape != x.shape:
                raise ValueError(f"uniforms must have x's shape {tuple(x.shape)}, got {tuple(uniforms.shape)}")
        if rounding == "nearest":
            return self._encode_nearest(x)
        return self._encode_stochastic(x, generator, uniforms)

    def _encode_nearest(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "e2m1":
            mag = x.abs()
            mid = self._on(x.device, "_mag_mid")
            idx = torch.bucketize(mag, mid, right=False)
            # bucketize sends an exact tie to the lower index; ties to even means
            # moving up when the lower code is odd.
            lower_odd_tie = (idx < 7) & ((idx & 1) == 1) & (mag == mid[idx.clamp(max=6)])
            idx = idx + lower_odd_tie.to(idx.dtype)
            sign = torch.signbit(x).to(torch.uint8) << 3
            return idx.to(torch.uint8) | sign
        mid = self._on(x.device, "_midpoints")
        order = self._on(x.device, "_order")
        idx = torch.bucketize(x, mid, right=False)
        return order[idx]

    def _encode_stochastic(self, x: torch.Tensor, generator: Optional[torch.Generator],
                           uniforms: Optional[torch.Tensor] = None) -> torch.Tensor:
        if uniforms is None:
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        else:
            u = uniforms.to(device=x.device, dtype=torch.float32)
        if self.kind == "e2m1":
            grid = self._on(x.device, "_mag_grid")
            idx = stochastic_round_index(x.abs(), grid, u)
            sign = torch.signbit(x).to(torch.uint8) << 3
            return idx.to(torch.uint8) | sign
        grid = self._on(x.device, "_grid")
        codes = self._on(x.device, "_grid_codes")
        return codes[stochastic_round_index(x, grid, u)]

    # ------------------------------------------------------------------ decode
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Map uint8 codes (0..15) of any shape to their float32 values.

        Examples
        --------
        >>> import torch
        >>> from fp4lib import E2M1
        >>> E2M1.decode(torch.tensor([1, 7, 15], dtype=torch.uint8)).tolist()
        [0.5, 6.0, -6.0]
        """
        if not torch.is_tensor(codes) or codes.dtype != torch.uint8:
            got = codes.dtype if torch.is_tensor(codes) else type(codes).__name__
            raise TypeError(f"codes must be a uint8 tensor, got {got}")
        if codes.numel() and int(codes.max()) > 15:
            raise ValueError(f"codes must lie in 0..15, got a maximum of {int(codes.max())}")
        return self._on(codes.device, "_values")[codes.long()]

    # ------------------------------------------------------------------ fields
    def fields(self, code: int) -> CodeFields:
        """Describe one code's bit fields (sign, exponent, mantissa, subnormal).

        Examples
        --------
        >>> from fp4lib import E2M1
        >>> E2M1.fields(0b0011)
        CodeFields(code=3, bits='0011', sign=0, exponent=1, mantissa=1, subnormal=False, value=1.5)
        """
        if not isinstance(code, int) or not 0 <= code <= 15:
            raise ValueError(f"code must be an int in 0..15, got {code!r}")
        value = float(self._values[code])
        bits = format(code, "04b")
        sign = (code & SIGN_MASK) >> 3
        if self.name == "nf4":
            return CodeFields(code, bits, int(value < 0), None, None, None, value)
        exponent = (code & EXP_MASK) >> 1
        mantissa = code & MAN_MASK
        subnormal = exponent == 0 and mantissa != 0
        return CodeFields(code, bits, sign, exponent, mantissa, subnormal, value)

    def table(self) -> List[CodeFields]:
        """:meth:`fields` for all 16 codes, in code order.

        Examples
        --------
        >>> from fp4lib import E2M1
        >>> [f.value for f in E2M1.table()][:8]
        [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
        """
        return [self.fields(c) for c in range(16)]


def _e2m1_values() -> List[float]:
    vals = []
    for code in range(16):
        sign = -1.0 if code & SIGN_MASK else 1.0
        exponent = (code & EXP_MASK) >> 1
        mantissa = code & MAN_MASK
        if exponent == 0:  # subnormal: 2^(1 - bias) * (0.m)
            mag = 2.0 ** (1 - E2M1_EXP_BIAS) * (mantissa * 0.5)
        else:  # normal: 2^(e - bias) * (1.m)
            mag = 2.0 ** (exponent - E2M1_EXP_BIAS) * (1 + mantissa * 0.5)
        vals.append(sign * mag)
    assert max(vals) == E2M1_MAX
    return vals


def _bnb_fp4_values() -> List[float]:
    # bitsandbytes' table in code order: {0, 1/16, 8, 12, 4, 6, 2, 3} / 12, then the
    # same negated (code 8 is 0.0 again). Float32 of the exact fractions equals
    # bitsandbytes' own float32 table.
    pos = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    pos = [p / 12 for p in pos]
    return pos + [-p if p else 0.0 for p in pos]


# bitsandbytes' NF4 table (QLoRA, Dettmers et al. 2023), as float32 literals.
_NF4_VALUES = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]

E2M1 = ElementFormat(
    "e2m1", _e2m1_values(), "e2m1", "OCP MX E2M1: 1 sign, 2 exponent (bias 1), 1 mantissa bit; max 6"
)
BNB_FP4 = ElementFormat(
    "bnb_fp4",
    _bnb_fp4_values(),
    "table",
    "bitsandbytes 'fp4' table (not OCP E2M1): {0, 1/16, 8, 12, 4, 6, 2, 3}/12, max 1",
)
NF4 = ElementFormat("nf4", _NF4_VALUES, "table", "bitsandbytes NF4: 16 normal quantiles, max 1")

FORMATS = {"e2m1": E2M1, "bnb_fp4": BNB_FP4, "nf4": NF4}

