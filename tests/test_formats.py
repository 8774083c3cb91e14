"""Element formats: exhaustive over the 16 codes of E2M1, bitsandbytes "fp4" and NF4.

Every code value, every rounding boundary and exact tie, +-0, saturation and NaN are
pinned down explicitly (the OCP Microscaling v1.0 specification for E2M1;
bitsandbytes' own tables and CPU quantizer for its fp4 and NF4). Stochastic rounding is checked with an
explicit statistical bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fp4lib import BNB_FP4, E2M1, FORMATS, NF4

ALL_FORMATS = [E2M1, BNB_FP4, NF4]
FORMAT_IDS = [f.name for f in ALL_FORMATS]

# OCP MX v1.0 E2M1 values, in code order (code 8 is -0).
E2M1_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
# bitsandbytes' fp4 table = {0, 1/16, 8, 12, 4, 6, 2, 3} / 12, then negated (code 8 is +0).
BNB_FP4_TWELFTHS = [0, 1 / 16, 8, 12, 4, 6, 2, 3]
# bitsandbytes' NF4 table (7 decimals) in code order.
NF4_TABLE_7DP = [
    -1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0,
]


def f32(v: float) -> float:
    """Round a Python float to the nearest float32."""
    return float(np.float32(v))


def next_up(v: float) -> float:
    return float(np.nextafter(np.float32(v), np.float32(np.inf)))


def next_down(v: float) -> float:
    return float(np.nextafter(np.float32(v), np.float32(-np.inf)))


def enc(fmt, values, **kw) -> list:
    return fmt.encode(torch.tensor(values, dtype=torch.float32), **kw).tolist()


def sorted_distinct(fmt) -> list:
    return sorted(set(fmt.values.tolist()))


def float32_midpoints(fmt) -> list:
    """Midpoints of neighbouring distinct values, computed in float32 as bitsandbytes does."""
    g = torch.tensor(sorted_distinct(fmt), dtype=torch.float32)
    return ((g[:-1] + g[1:]) / 2).tolist()


def unpack_bnb(packed: torch.Tensor, n: int) -> list:
    """bitsandbytes' layout, decoded independently: element 2i in the high nibble."""
    b = packed.reshape(-1).tolist()
    out = []
    for byte in b:
        out += [byte >> 4, byte & 0xF]
    return out[:n]


# ----------------------------------------------------------------------------- values
def test_e2m1_values_match_design_table_exactly():
    v = E2M1.values
    assert v.dtype == torch.float32 and v.shape == (16,)
    assert v.tolist() == E2M1_TABLE
    # +0 at code 0, -0 at code 8: the sign bit is part of the value.
    assert torch.signbit(v).tolist() == [False] * 8 + [True] * 8
    assert E2M1.max == 6.0


def test_bnb_fp4_values_equal_bitsandbytes_table(bnb):
    ref = bnb.get_4bit_type("fp4", device="cpu")
    assert torch.equal(BNB_FP4.values, ref)
    expected = [t / 12 for t in BNB_FP4_TWELFTHS]
    expected = expected + [-e if e else 0.0 for e in expected]
    assert BNB_FP4.values.tolist() == [f32(e) for e in expected]
    assert BNB_FP4.values[1].item() == f32(1 / 192)
    # Code 8 is a second 0.0 (bitsandbytes writes it as the integer -0, i.e. +0).
    assert BNB_FP4.values[8].item() == 0.0 and not torch.signbit(BNB_FP4.values[8])
    assert BNB_FP4.max == 1.0


def test_nf4_values_equal_bitsandbytes_table(bnb):
    ref = bnb.get_4bit_type("nf4", device="cpu")
    assert torch.equal(NF4.values, ref)
    assert NF4.values.tolist() == sorted(NF4.values.tolist())  # NF4 is sorted in code order
    np.testing.assert_allclose(NF4.values.numpy(), NF4_TABLE_7DP, rtol=0, atol=5e-8)


def test_formats_registry_names_and_descriptions():
    assert FORMATS == {"e2m1": E2M1, "bnb_fp4": BNB_FP4, "nf4": NF4}
    # The bitsandbytes table must never be called plain FP4 without saying it is not E2M1.
    assert "not OCP E2M1" in BNB_FP4.description
    assert "bnb_fp4" in repr(BNB_FP4)


# ------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FORMAT_IDS)
def test_decode_encode_of_every_code_value_is_that_value(fmt):
    v = fmt.values
    back = fmt.decode(fmt.encode(v))
    assert torch.equal(back, v)
    # torch.equal treats -0 == +0; the sign of zero must survive too.
    assert torch.equal(torch.signbit(back), torch.signbit(v))


def test_encode_of_every_code_value_gives_the_code_back():
    assert enc(E2M1, E2M1_TABLE) == list(range(16))  # -0.0 -> code 8
    assert enc(NF4, NF4.values.tolist()) == list(range(16))
    # bitsandbytes fp4 has 0.0 twice (codes 0 and 8): exact 0 encodes to code 0.
    assert enc(BNB_FP4, BNB_FP4.values.tolist()) == [0, 1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15]


def test_bnb_fp4_two_zeros_rule_matches_bitsandbytes_cpu(bnb):
    # bitsandbytes' CPU quantizer: exact 0 and tiny negatives -> code 0, tiny positives in (0, 1/384] -> code 8.
    mid = f32(f32(1 / 192) / 2)  # float32 midpoint of 0 and 1/192
    xs = [1.0, 0.0, -0.0, -1e-30, -1e-6, next_up(-mid), 1e-30, 1e-6, mid, next_up(mid), -mid, next_down(-mid)]
    want = [3, 0, 0, 0, 0, 0, 8, 8, 8, 1, 9, 9]
    assert enc(BNB_FP4, xs) == want
    packed, state = bnb.quantize_4bit(torch.tensor(xs), blocksize=64, quant_type="fp4")
    assert state.absmax.tolist() == [1.0]
    assert unpack_bnb(packed, len(xs)) == want


# ------------------------------------------------------------- E2M1 rounding
E2M1_TIES = [  # (x, code): exact midpoints round to the even mantissa (code bit 0 == 0)
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),
    (-0.25, 8), (-0.75, 10), (-1.25, 10), (-1.75, 12), (-2.5, 12), (-3.5, 14), (-5.0, 14),
]


@pytest.mark.parametrize("x,code", E2M1_TIES)
def test_e2m1_exact_ties_round_to_even(x, code):
    assert enc(E2M1, [x]) == [code]
    assert code & 1 == 0  # the chosen code has an even mantissa
    # and the sign bit is kept even when the magnitude rounds to 0
    assert (code >> 3) == (1 if x < 0 else 0)


def test_e2m1_signed_zeros():
    assert enc(E2M1, [0.0, -0.0, 1e-30, -1e-30, 0.1, -0.1]) == [0, 8, 0, 8, 0, 8]
    d = E2M1.decode(torch.tensor([8], dtype=torch.uint8))
    assert d.item() == 0.0 and torch.signbit(d).item()


def test_e2m1_one_ulp_either_side_of_every_midpoint_goes_to_the_nearer_value():
    mags = E2M1.values[:8].tolist()
    xs, want = [], []
    for i in range(7):
        m = (mags[i] + mags[i + 1]) / 2
        for sign, sbit in ((1.0, 0), (-1.0, 8)):
            xs += [sign * next_down(m), sign * next_up(m)]
            want += [i | sbit, (i + 1) | sbit]
    assert enc(E2M1, xs) == want


def test_e2m1_every_float32_between_grid_points_rounds_to_nearest_dense_sweep():
    # A dense sweep of [0, 6.5] (every 2^-12, which hits each midpoint exactly),
    # checked against the nearest value computed in float64.
    x = torch.arange(0, 6.5 * 4096 + 1, dtype=torch.float64) / 4096
    got = E2M1.decode(E2M1.encode(x.float())).double()
    grid = torch.tensor(E2M1.values[:8].tolist(), dtype=torch.float64)
    dist = (x.clamp(max=6)[:, None] - grid[None, :]).abs()
    best = dist.min(dim=1).values
    assert torch.equal((got - x.clamp(max=6)).abs(), best)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FORMAT_IDS)
def test_nearest_rounding_on_each_device_matches_brute_force(fmt, device):
    # A sweep over [-1.1 max, 1.1 max] plus every float32 midpoint, rounded on the
    # device and checked on the CPU: nearest by float64 brute force away from the
    # midpoints; at them, E2M1 takes the even code and the bitsandbytes tables the
    # lower value (their float32 midpoints are not always exact, so "nearest" is
    # decided by the float32 midpoint, as in bitsandbytes).
    mids = torch.tensor(float32_midpoints(fmt))
    sweep = torch.linspace(-1.1 * fmt.max, 1.1 * fmt.max, 8801)
    x = torch.cat([sweep, mids, torch.tensor([0.0, -0.0])])
    codes = fmt.encode(x.to(device))
    assert codes.device.type == device and codes.dtype == torch.uint8
    got = fmt.decode(codes).cpu().double()
    vals = torch.tensor(sorted_distinct(fmt), dtype=torch.float64)
    xc = x.double().clamp(-fmt.max, fmt.max)
    dist = (xc[:, None] - vals[None, :]).abs()
    near_mid = ((x[:, None] - mids[None, :]).abs() <= 1e-6).any(dim=1)
    assert torch.equal((got - xc).abs()[~near_mid], dist.min(dim=1).values[~near_mid])
    at_mid = slice(x.numel() - 2 - mids.numel(), x.numel() - 2)
    if fmt is E2M1:
        assert torch.all(codes.cpu()[at_mid] % 2 == 0)  # ties to the even code
        # midpoints -5, -3.5, -2.5, -1.75, -1.25, -0.75, -0.25, 0.25, ..., 5
        assert got[at_mid].tolist() == [-4, -4, -2, -2, -1, -1, 0, 0, 1, 1, 2, 2, 4, 4]
    else:
        assert torch.equal(got[at_mid], vals[:-1])  # ties to the lower value
    assert codes.cpu()[-2:].tolist() == {"e2m1": [0, 8], "bnb_fp4": [0, 0], "nf4": [7, 7]}[fmt.name]


@pytest.mark.parametrize(
    "x,code",
    [(6.0, 7), (6.5, 7), (7.0, 7), (1e30, 7), (3.4028234663852886e38, 7), (math.inf, 7),
     (-6.0, 15), (-7.0, 15), (-1e30, 15), (-math.inf, 15)],
)
def test_e2m1_saturates_to_six(x, code):
    assert enc(E2M1, [x]) == [code]
    assert E2M1.decode(torch.tensor([code], dtype=torch.uint8)).item() == math.copysign(6.0, x)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_nan_raises_value_error(fmt, rounding):
    with pytest.raises(ValueError, match="2 NaN"):
        fmt.encode(torch.tensor([1.0, math.nan, 0.0, math.nan]), rounding=rounding)


@pytest.mark.parametrize("fmt", [BNB_FP4, NF4], ids=["bnb_fp4", "nf4"])
def test_table_formats_saturate_at_one(fmt):
    codes = enc(fmt, [1.0, 1.5, 1e30, math.inf, -1.0, -1.5, -math.inf])
    assert fmt.decode(torch.tensor(codes, dtype=torch.uint8)).tolist() == [1.0] * 4 + [-1.0] * 3


# ---------------------------------------------- bitsandbytes table ties (vs bnb)
@pytest.mark.parametrize("fmt,quant_type", [(BNB_FP4, "fp4"), (NF4, "nf4")], ids=["bnb_fp4", "nf4"])
def test_table_ties_go_to_the_lower_value_exactly_like_bitsandbytes_cpu(bnb, fmt, quant_type):
    grid = sorted_distinct(fmt)
    mids = float32_midpoints(fmt)
    xs = [1.0]
    for m in mids:
        xs += [m, next_down(m), next_up(m)]
    x = torch.tensor(xs, dtype=torch.float32)
    # One block (bitsandbytes' partial block divides by absmax 1.0): the scaled
    # values are exactly the crafted ones.
    packed, state = bnb.quantize_4bit(x, blocksize=4096, quant_type=quant_type)
    assert state.absmax.tolist() == [1.0]
    ref = unpack_bnb(packed, x.numel())
    ours = fmt.encode(x).tolist()
    assert ours == ref
    # and the rule itself, independent of bitsandbytes: a tie goes to the lower value,
    # one ulp either side goes to the nearer one.
    dec = fmt.decode(fmt.encode(x)).tolist()
    for i, m in enumerate(mids):
        at, below, above = dec[1 + 3 * i : 4 + 3 * i]
        assert (at, below, above) == (grid[i], grid[i], grid[i + 1]), (i, m)


@pytest.mark.parametrize("fmt", [BNB_FP4, NF4], ids=["bnb_fp4", "nf4"])
def test_table_nearest_matches_brute_force_argmin_on_a_dense_sweep(fmt):
    # Away from the (float32-rounded) midpoints, nearest rounding is argmin of |x - v|.
    x = torch.linspace(-1.2, 1.2, 48001, dtype=torch.float32)
    mids = torch.tensor(float32_midpoints(fmt))
    near_mid = ((x[:, None] - mids[None, :]).abs() < 1e-6).any(dim=1)
    x = x[~near_mid]
    vals = torch.tensor(sorted_distinct(fmt), dtype=torch.float64)
    best = vals[(x.double()[:, None] - vals[None, :]).abs().argmin(dim=1)]
    assert torch.equal(fmt.decode(fmt.encode(x)).double(), best)


# ---------------------------------------------------------------------- fields
def test_e2m1_fields_for_all_16_codes():
    for code in range(16):
        f = E2M1.fields(code)
        s, e, m = code >> 3, (code >> 1) & 0b11, code & 1
        assert (f.code, f.bits, f.sign, f.exponent, f.mantissa) == (code, format(code, "04b"), s, e, m)
        assert f.subnormal == (e == 0 and m == 1)
        if e == 0:  # subnormal or zero: (-1)^s * 2^(1 - bias) * (m / 2), bias 1
            expected = (-1) ** s * (m / 2)
        else:  # normal: (-1)^s * 2^(e - bias) * (1 + m / 2)
            expected = (-1) ** s * 2.0 ** (e - 1) * (1 + m / 2)
        assert f.value == expected and math.copysign(1, f.value) == (-1) ** s
        assert f.value == E2M1.values[code].item()
    subnormals = [c for c in range(16) if E2M1.fields(c).subnormal]
    assert subnormals == [1, 9]


def test_fields_bits_string_is_msb_first():
    assert E2M1.fields(0b0001).bits == "0001"
    assert E2M1.fields(0b1000).bits == "1000"
    assert E2M1.fields(0b0110).exponent == 3 and E2M1.fields(0b0110).value == 4.0


def test_nf4_fields_have_no_exponent_or_mantissa():
    for code in range(16):
        f = NF4.fields(code)
        assert f.exponent is None and f.mantissa is None and f.subnormal is None
        assert f.sign == (1 if code < 7 else 0)
        assert f.value == NF4.values[code].item()


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FORMAT_IDS)
def test_table_has_16_entries_in_code_order(fmt):
    t = fmt.table()
    assert len(t) == 16
    assert [f.code for f in t] == list(range(16))
    assert [f.value for f in t] == fmt.values.tolist()


@pytest.mark.parametrize("bad", [-1, 16, 3.0, "3", None])
def test_fields_rejects_bad_codes(bad):
    with pytest.raises(ValueError, match="code"):
        E2M1.fields(bad)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FORMAT_IDS)
def test_decode_rejects_non_uint8_and_codes_above_15(fmt):
    for bad in (torch.tensor([1, 2]), torch.tensor([1, 2], dtype=torch.int8), torch.tensor([1.0]), [1, 2]):
        with pytest.raises(TypeError, match="uint8"):
            fmt.decode(bad)
    with pytest.raises(ValueError, match="16"):
        fmt.decode(torch.tensor([3, 16], dtype=torch.uint8))
    with pytest.raises(ValueError, match="255"):
        fmt.decode(torch.tensor([255], dtype=torch.uint8))
    # empty and 0-d inputs are fine
    assert fmt.decode(torch.empty(0, dtype=torch.uint8)).shape == (0,)
    assert fmt.decode(torch.tensor(3, dtype=torch.uint8)).shape == ()


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FORMAT_IDS)
def test_encode_rejects_non_float_input_and_unknown_rounding(fmt):
    with pytest.raises(TypeError, match="floating-point"):
        fmt.encode(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fmt.encode([0.5])
    with pytest.raises(ValueError, match="nearest"):
        fmt.encode(torch.tensor([0.5]), rounding="up")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_encode_accepts_other_float_dtypes(dtype):
    x = torch.tensor(E2M1_TABLE, dtype=dtype)
    assert E2M1.encode(x).tolist() == list(range(16))
    assert E2M1.encode(x).dtype == torch.uint8


# -------------------------------------------------------- stochastic rounding
N_DRAWS = 200_000

SR_CASES = [  # (format, x, lower neighbour, upper neighbour)
    (E2M1, 2.3, 2.0, 3.0),
    (E2M1, -0.8, -1.0, -0.5),
    (E2M1, 4.9, 4.0, 6.0),
    (E2M1, 0.1, 0.0, 0.5),
    (BNB_FP4, 0.3, 0.25, f32(1 / 3)),
    (BNB_FP4, -0.002, f32(-1 / 192), 0.0),
    (NF4, 0.2, NF4.values[9].item(), NF4.values[10].item()),
    (NF4, -0.9, -1.0, NF4.values[1].item()),
]
SR_IDS = [f"{f.name}:{x}" for f, x, _, _ in SR_CASES]


@pytest.mark.parametrize("fmt,x,lo,hi", SR_CASES, ids=SR_IDS)
def test_stochastic_rounding_is_unbiased_within_five_standard_errors(fmt, x, lo, hi):
    x32 = f32(x)
    g = torch.Generator().manual_seed(1234)
    codes = fmt.encode(torch.full((N_DRAWS,), x32), rounding="stochastic", generator=g)
    vals = fmt.decode(codes).double()
    # Only the two neighbours ever appear, and both do.
    assert set(vals.unique().tolist()) == {lo, hi}
    # Each draw is lo + (hi - lo) * Bernoulli(p), p = (x - lo) / (hi - lo):
    # the standard error of the mean is (hi - lo) * sqrt(p (1 - p) / N).
    p = (x32 - lo) / (hi - lo)
    se = (hi - lo) * math.sqrt(p * (1 - p) / N_DRAWS)
    bias = vals.mean().item() - x32
    assert abs(bias) < 5 * se, f"bias {bias:.3g} vs 5 SE {5 * se:.3g}"
    # and the up-fraction is p (same bound, on the fraction itself)
    up = (vals == hi).double().mean().item()
    assert abs(up - p) < 5 * math.sqrt(p * (1 - p) / N_DRAWS)


def test_stochastic_rounding_is_unbiased_across_the_whole_e2m1_range():
    # 401 values spread over [-6, 6], 2000 draws each: the mean error of every value
    # is within 5 of its own standard errors.
    xs = torch.linspace(-6, 6, 401)
    reps = 2000
    g = torch.Generator().manual_seed(7)
    codes = E2M1.encode(xs.repeat(reps, 1), rounding="stochastic", generator=g)
    vals = E2M1.decode(codes).double()
    grid = torch.tensor(sorted_distinct(E2M1), dtype=torch.float64)
    x = xs.double()
    i = (torch.bucketize(x, grid, right=True) - 1).clamp(0, grid.numel() - 2)
    lo, hi = grid[i], grid[i + 1]
    p = (x - lo) / (hi - lo)
    se = (hi - lo) * torch.sqrt(p * (1 - p) / reps)
    err = (vals.mean(dim=0) - x).abs()
    on_grid = se == 0
    assert torch.all(err[on_grid] == 0)
    assert torch.all(err[~on_grid] < 5 * se[~on_grid])
    # every draw is one of the two neighbours
    assert torch.all((vals == lo) | (vals == hi))


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FORMAT_IDS)
def test_stochastic_rounding_never_moves_values_on_the_grid(fmt):
    v = fmt.values
    x = v.repeat(1000)
    g = torch.Generator().manual_seed(3)
    back = fmt.decode(fmt.encode(x, rounding="stochastic", generator=g))
    assert torch.equal(back, x)


def test_stochastic_rounding_saturates():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([7.0, 1e30, math.inf, -7.0, -math.inf] * 100)
    vals = E2M1.decode(E2M1.encode(x, rounding="stochastic", generator=g))
    assert vals.tolist() == [6.0, 6.0, 6.0, -6.0, -6.0] * 100


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FORMAT_IDS)
def test_stochastic_rounding_is_reproducible_with_a_seeded_generator(fmt):
    x = torch.rand(4096) * 2 * fmt.max - fmt.max
    a = fmt.encode(x, rounding="stochastic", generator=torch.Generator().manual_seed(42))
    b = fmt.encode(x, rounding="stochastic", generator=torch.Generator().manual_seed(42))
    c = fmt.encode(x, rounding="stochastic", generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # different draws, but each still one of the two neighbours of x
    grid = torch.tensor(sorted_distinct(fmt))
    i = (torch.bucketize(x, grid, right=True) - 1).clamp(0, grid.numel() - 2)
    for codes in (a, c):
        vals = fmt.decode(codes)
        assert torch.all((vals == grid[i]) | (vals == grid[i + 1]))
