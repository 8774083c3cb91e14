"""FP4Linear and operand fake quantization (fp4lib.training.layers, fp4lib.training.operands, fp4lib.numerics.kernels).

* The fused fast path equals the core-based reference bit for bit (eager always;
  compiled where torch.compile works).
* FP4Linear's output and all three gradients equal an explicit reference:
  fake-quantized operands fed to plain matmuls.
* A disabled spec is exactly nn.Linear.
"""

import dataclasses
import logging
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fp4lib import fake_quantize, quantize
from fp4lib.training.operands import (
    fake_quantize_operand,
    mix_seed,
    reference_operand,
)
from fp4lib.numerics.hadamard import block_hadamard, hadamard_along, hadamard_signs
from fp4lib.numerics.compiling import compile_works
from fp4lib.training.layers import FP4Linear
from fp4lib.numerics.rounding import hash_uniform, seed_term
from fp4lib.training.specs import ROLES, LinearSpec, QuantSpec
from fp4lib.training.recipes import get_recipe
from fp4lib.numerics.rounding import cheap_uniform

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


pytestmark = pytest.mark.usefixtures("one_thread")


SPECS = [
    QuantSpec("e2m1_per_tensor"),
    QuantSpec("e2m1_per_tensor", rounding="stochastic"),
    QuantSpec("mxfp4"),
    QuantSpec("mxfp4", rounding="stochastic"),
    QuantSpec("mxfp4", scale_rule="ceil"),
    QuantSpec("mxfp4", rounding="stochastic", scale_rule="ceil"),
    QuantSpec("nvfp4"),
    QuantSpec("nvfp4", rounding="stochastic"),
    QuantSpec("nvfp4", tile=True),
    QuantSpec("nvfp4", rounding="stochastic", tile=True),
    QuantSpec("nvfp4", rounding="stochastic", scale_rule="up"),
    QuantSpec("nvfp4", scale_rule="4over6"),
    QuantSpec("nvfp4", rounding="stochastic", scale_rule="4over6"),
    QuantSpec("nvfp4", tile=True, scale_rule="4over6"),
    QuantSpec("fp8_e4m3"),
    QuantSpec("fp8_e5m2"),
]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as float32 bit patterns (so -0.0 != +0.0), NaN == NaN."""
    a, b = a.contiguous(), b.contiguous()
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def awkward(shape=(64, 96), seed=0) -> torch.Tensor:
    """Rows of very different magnitudes, exact zeros, -0.0, subnormals, E2M1 ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g).mul(20).exp2().div(2**10)
    x[:16] = 0.0
    x[1, 5] = -0.0
    x[2, :32] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4)  # amax 6: every tie
    x[3, 3] = 1e-42  # subnormal
    x[20:36] *= 1e-30
    return x


# ----------------------------------------------------------------------------
# Hash draws and the reference
# ----------------------------------------------------------------------------
def _lowbias32_int64(idx: torch.Tensor, seed: int) -> torch.Tensor:
    """The hash in plain int64 arithmetic with explicit 32-bit masks: an independent statement of it."""
    h = (idx.to(torch.int64) * 0x9E3779B1 + seed * 0x85EBCA77) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def test_hash_uniform_is_the_lowbias32_hash_and_cheap_uniform_lays_it_out():
    idx = torch.arange(5000, dtype=torch.int32).view(50, 100)
    for seed in (0, 1, 12345, 2**31 - 1):
        assert torch.equal(hash_uniform(idx, seed_term(seed)), _lowbias32_int64(idx, seed))
        assert torch.equal(cheap_uniform((50, 100), seed), _lowbias32_int64(idx, seed))
    big = torch.arange(2**31 - 1000, 2**31 - 1, dtype=torch.int32)  # the largest indices
    assert torch.equal(hash_uniform(big, seed_term(7)), _lowbias32_int64(big, 7))
    assert torch.equal(cheap_uniform((999,), 7, offset=2**31 - 1000), _lowbias32_int64(big, 7))
    with pytest.raises(ValueError, match="int32"):
        cheap_uniform((10,), 0, offset=2**31 - 5)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.rounding == "nearest"], ids=QuantSpec.short)
@pytest.mark.parametrize("axis", [0, 1])
def test_reference_nearest_is_the_core_fake_quantize(spec, axis):
    x = awkward()
    ref = fake_quantize_operand(x, spec, axis, backend="reference")
    if spec.scheme == "e2m1_per_tensor":
        s = x.abs().max() / 6  # one scale: amax / 6
        grid = torch.cat([-E2M1_GRID.flip(0), E2M1_GRID]) * s
        assert torch.isin(ref, grid).all()  # on the scaled E2M1 grid
        nearest = (x.unsqueeze(-1) - grid).abs().min(-1).values
        assert torch.all((ref - x).abs() == nearest)  # and the nearest point of it
    elif spec.scheme.startswith("fp8"):
        dtype, fmax = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}[spec.scheme]
        s_enc = torch.full((), fmax) / x.abs().max()  # one scale: fmax / amax (a true float32 division)
        s = 1.0 / s_enc
        assert same_bits(ref, (x * s_enc).to(dtype).float() * s)
        assert ((ref - x).abs() <= x.abs() * 2.0 ** -(4 if dtype == torch.float8_e4m3fn else 3) + s * 2.0**-9).all()
    else:
        kw = {"tile": True} if spec.tile else {}
        kw["scale_rule"] = spec.scale_rule
        assert same_bits(ref, fake_quantize(x, spec.scheme, axis=-1 if spec.tile else axis, **kw))


SR_SPECS = [s for s in SPECS if s.rounding == "stochastic"]


def _e2m1_gap(x: torch.Tensor, spec: QuantSpec):
    """For operand ``x`` quantized along axis 1: the width of the E2M1 grid interval
    holding each element (in ``x``'s units) and whether the element lies within the
    grid's range (|x| <= 6 decode scales; MXFP4's floor rule and NVFP4's nearest E4M3
    scale can put a block maximum above 6, where it is clamped).

    The decode scales come from :func:`fp4lib.quantize` with round-to-nearest: every
    scale rule, four-over-six included, picks its scales without the rounding draws.
    """
    q = quantize(x, spec.scheme, tile=spec.tile, scale_rule=spec.scale_rule, backend="reference")
    s = q.block_scales()
    if spec.scheme != "e2m1_per_tensor":
        if spec.tile:
            s = s.repeat_interleave(16, 0).repeat_interleave(16, 1)
        else:
            s = s.repeat_interleave(q.block_size, -1)
    y = (x / s).abs()  # the element in units of its decode scale
    gap = torch.where(y < 2, 0.5, torch.where(y < 4, 1.0, 2.0)) * s  # E2M1: 0 .5 1 1.5 2 3 4 6
    return gap, y <= 6


def _sr_input(seed: int = 0) -> torch.Tensor:
    """Rows of magnitudes over 2^-10 .. 2^10, a few elements exactly on the grid."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 64, generator=g) * torch.rand(32, 1, generator=g).mul(20).exp2().div(2**10)
    x[0, :8] = torch.tensor([6.0, 0.5, -1.0, 1.5, -2.0, 3.0, -4.0, 0.0])
    return x


@pytest.mark.parametrize("spec", SR_SPECS, ids=QuantSpec.short)
def test_reference_stochastic_picks_a_neighbour_of_nearest(spec):
    """Stochastic rounding lands on the nearest grid value or on the grid value on the other
    side of x: either SR == RTN, or they are one grid interval apart with x between them."""
    x = _sr_input(1)
    rtn = fake_quantize_operand(x, dataclasses.replace(spec, rounding="nearest"), 1, backend="reference")
    gap, in_range = _e2m1_gap(x, spec)
    for seed in (3, 4):
        sr = fake_quantize_operand(x, spec, 1, seed=seed, backend="reference")
        differ = sr != rtn
        assert differ.any()
        assert not (differ & ~in_range).any()  # a clamped element has one candidate
        d = (sr - rtn)[differ].abs()
        assert torch.allclose(d, gap[differ], rtol=1e-6, atol=0), (d / gap[differ]).aminmax()
        assert torch.all((sr - x)[differ] * (rtn - x)[differ] <= 0)  # x lies between them


@pytest.mark.parametrize("spec", SR_SPECS, ids=QuantSpec.short)
def test_stochastic_rounding_mean_converges_to_input(spec):
    """Unbiasedness: the mean of n = 400 draws (seeds 0..399, the fused kernel) is within
    k = 6 standard-error bounds of x, elementwise, for every element inside the grid's range.

    One draw takes one of the two grid values around x, ``gap`` apart, so it lies in an
    interval of width ``gap``; Hoeffding's inequality bounds the mean of n independent
    draws: P(|mean - E| >= k * gap / (2 sqrt(n))) <= 2 exp(-k^2 / 2) = 3e-8 for k = 6, so
    the 2048 elements x 8 specs would all pass for an unbiased rounding but for a
    chance of about 5e-4. Round-to-nearest, deterministic, misses x by up to gap / 2 and
    fails the same bound (k * gap / (2 sqrt(n)) = 0.15 gap) wherever x is farther than that from
    the grid: on 15% (per-tensor scale, where most elements are tiny next to the one scale) to
    70% of the elements here.
    """
    x = _sr_input(0)
    gap, in_range = _e2m1_gap(x, spec)
    n, k = 400, 6.0
    bound = k * gap / (2 * math.sqrt(n))
    draws = torch.stack([fake_quantize_operand(x, spec, 1, seed=s, backend="fused") for s in range(n)])
    mean = draws.double().mean(0)
    err = (mean - x.double()).abs()
    assert in_range.float().mean() > 0.9
    worst = (err / bound)[in_range].max()
    assert bool(torch.all(err[in_range] <= bound[in_range])), f"mean off by {float(worst):.2f} bounds"
    # Each element takes at most two values: a draw never leaves the interval around x.
    assert torch.all(((draws - x).abs() <= gap * (1 + 1e-6))[:, in_range])

    rtn = fake_quantize_operand(x, dataclasses.replace(spec, rounding="nearest"), 1, backend="fused")
    rtn_err = (rtn.double() - x.double()).abs()
    assert not bool(torch.all(rtn_err[in_range] <= bound[in_range]))
    assert (rtn_err > bound)[in_range].float().mean() > 0.1  # 15% to 70% of the elements, by scheme


def test_per_tensor_scale_is_amax_over_6():
    x = torch.tensor([[12.0, 1.0, 0.9, -3.1] * 4])
    out = fake_quantize_operand(x, QuantSpec("e2m1_per_tensor"), axis=1, backend="reference")
    # scale 2: 1/2 = 0.5 -> 0.5; 0.9/2 = 0.45 -> 0.5; -3.1/2 = -1.55 -> -1.5
    assert out[0, :4].tolist() == [12.0, 1.0, 1.0, -3.0]


# ----------------------------------------------------------------------------
# Fast path == reference, bit for bit
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.short)
@pytest.mark.parametrize("axis", [0, 1])
def test_fused_matches_reference_bit_for_bit(spec, axis):
    for seed in (0, 1):
        x = awkward(seed=seed)
        ref = fake_quantize_operand(x, spec, axis, seed=seed + 10, backend="reference")
        fast = fake_quantize_operand(x, spec, axis, seed=seed + 10, backend="fused")
        assert same_bits(fast, ref), (spec, axis, seed)


@pytest.mark.parametrize("spec", SPECS, ids=QuantSpec.short)
def test_fused_matches_reference_on_random_tensors(spec):
    """Random amax values: a tensor scale computed one ulp off would show here."""
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(32, 64, generator=g) * torch.rand(32, 1, generator=g).mul(20).exp2().div(2**10)
        for axis in (0, 1):
            ref = fake_quantize_operand(x, spec, axis, seed=seed, backend="reference")
            assert same_bits(fake_quantize_operand(x, spec, axis, seed=seed, backend="fused"), ref), (seed, axis)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3], SPECS[7]], ids=QuantSpec.short)
def test_nonfinite_operand_gives_all_nan_in_both_paths(bad, spec):
    x = torch.randn(32, 64)
    x[4, 4] = bad
    for backend in ("reference", "fused"):
        assert torch.isnan(fake_quantize_operand(x, spec, 1, backend=backend)).all()


@pytest.mark.skipif(not compile_works(), reason="torch.compile needs a working C++ compiler")
@pytest.mark.parametrize("spec", [QuantSpec("nvfp4", rounding="stochastic"), QuantSpec("fp8_e5m2"),
                                  QuantSpec("nvfp4", rounding="stochastic", scale_rule="up"),
                                  QuantSpec("nvfp4", tile=True, scale_rule="4over6")], ids=QuantSpec.short)
def test_compiled_matches_reference_bit_for_bit(spec):
    """The most involved specialisations: NVFP4 with stochastic rounding or four-over-six,
    blocks along axis 0, and FP8's cast.

    Compiling takes a few seconds the first time (inductor caches it on disk);
    ``benchmarks/train_step.py`` checks every recipe's compiled training step too."""
    x = awkward((64, 64), seed=2)
    ref = fake_quantize_operand(x, spec, 0, seed=5, backend="reference")
    assert same_bits(fake_quantize_operand(x, spec, 0, seed=5, backend="compiled"), ref)


# ----------------------------------------------------------------------------
# Hadamard
# ----------------------------------------------------------------------------
def test_hadamard_along_axis0_is_block_hadamard_of_transpose():
    x = torch.randn(64, 24)
    s = hadamard_signs(16, 4)
    assert torch.allclose(hadamard_along(x, 0, 16, s), block_hadamard(x.t().contiguous(), 16, s).t(), atol=1e-6)
    assert torch.equal(hadamard_along(x.t().contiguous(), 1, 16, s), block_hadamard(x.t().contiguous(), 16, s))


def test_hadamard_cancels_in_all_three_gemm_layouts():
    x, w, dy = torch.randn(64, 32), torch.randn(48, 32), torch.randn(64, 48)
    s = hadamard_signs(16, 9)
    assert torch.allclose(hadamard_along(x, 1, 16, s) @ hadamard_along(w, 1, 16, s).t(), x @ w.t(), atol=1e-5)
    assert torch.allclose(hadamard_along(dy, 1, 16, s) @ hadamard_along(w, 0, 16, s), dy @ w, atol=1e-5)
    assert torch.allclose(hadamard_along(dy, 0, 16, s).t() @ hadamard_along(x, 0, 16, s), dy.t() @ x, atol=1e-5)


# ----------------------------------------------------------------------------
# FP4Linear against an explicit reference
# ----------------------------------------------------------------------------
def explicit_reference(x, w, b, spec: LinearSpec, call_seed: int):
    """Y, dX, dW, db from the reference's factored operands and plain matmuls; dY = given.

    Each GEMM multiplies the block-scaled values and applies both per-tensor scales
    to its output, as a block-scaled FP4 GEMM does.
    """
    seeds = {r: mix_seed(call_seed, ROLES[r][2]) for r in ROLES}
    had = {g: mix_seed(call_seed, i) for g, i in (("fprop", 6), ("dgrad", 7), ("wgrad", 8))}
    x2 = x.reshape(-1, x.shape[-1])

    def pair(a, bb, ra, rb, gemm):
        sa, sb = getattr(spec, ra), getattr(spec, rb)
        if sa.hadamard:
            signs = hadamard_signs(sa.hadamard, had[gemm])
            a = hadamard_along(a, ROLES[ra][1], sa.hadamard, signs)
            bb = hadamard_along(bb, ROLES[rb][1], sa.hadamard, signs)
        return (reference_operand(a, sa, ROLES[ra][1], seeds[ra]),
                reference_operand(bb, sb, ROLES[rb][1], seeds[rb]))

    def times_scales(product, sa, sb):
        scales = [s for s in (sa, sb) if s is not None]
        alpha = scales[0] * scales[1] if len(scales) == 2 else (scales[0] if scales else None)
        return product if alpha is None else product * alpha

    (xv, sx), (wv, sw) = pair(x2, w, "fprop_x", "fprop_w", "fprop")
    y = times_scales(xv @ wv.t(), sx, sw) + b

    def grads(dy):
        dy2 = dy.reshape(-1, w.shape[0])
        (dyv, sdy), (wv2, sw2) = pair(dy2, w, "dgrad_dy", "dgrad_w", "dgrad")
        dx = times_scales(dyv @ wv2, sdy, sw2).reshape(x.shape)
        (dyv3, sdy3), (xv3, sx3) = pair(dy2, x2, "wgrad_dy", "wgrad_x", "wgrad")
        dw = times_scales(dyv3.t() @ xv3, sdy3, sx3)
        return dx, dw, dy2.sum(0)

    return y.reshape(*x.shape[:-1], w.shape[0]), grads


LAYER_SPECS = {
    name: get_recipe(name).linear
    for name in ("fp4_naive", "mxfp4", "nvfp4", "nvfp4_fwd_only", "nvfp4_bwd_only", "nvfp4_no_tiles")
}


@pytest.mark.parametrize("name", sorted(LAYER_SPECS))
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_fp4linear_forward_and_gradients_match_explicit_reference(name, backend):
    spec = LAYER_SPECS[name]
    torch.manual_seed(0)
    layer = FP4Linear(64, 96, bias=True, spec=spec, backend=backend, seed=17)
    x = torch.randn(4, 16, 64, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y) * torch.rand(4, 16, 1) * 1e-3
    y.backward(dy)
    call_seed = mix_seed(17, 1)  # the first training-mode call
    y_ref, grads = explicit_reference(x.detach(), layer.weight.detach(), layer.bias.detach(), spec, call_seed)
    dx_ref, dw_ref, db_ref = grads(dy)
    assert same_bits(y, y_ref)
    assert same_bits(x.grad, dx_ref)
    assert same_bits(layer.weight.grad, dw_ref)
    assert same_bits(layer.bias.grad, db_ref)


def test_fresh_noise_each_step_and_replayable_from_state_dict():
    spec = get_recipe("nvfp4").linear
    layer = FP4Linear(32, 32, bias=False, spec=spec, backend="fused")
    x = torch.randn(32, 32)

    def wgrad():
        layer.weight.grad = None
        layer(x).sum().backward()
        return layer.weight.grad.clone()

    state = {k: v for k, v in layer.state_dict().items()}
    g1, g2 = wgrad(), wgrad()
    assert not torch.equal(g1, g2)  # new stochastic-rounding draws
    layer.load_state_dict(state)
    assert layer.calls == 0 and torch.equal(wgrad(), g1)


def test_disabled_spec_is_exactly_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(48, 32)
    fp4 = FP4Linear(48, 32, spec=LinearSpec())
    fp4.load_state_dict(ref.state_dict(), strict=False)
    x1 = torch.randn(3, 5, 48, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ref(x1), fp4(x2)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
    assert torch.equal(ref.weight.grad, fp4.weight.grad) and torch.equal(ref.bias.grad, fp4.bias.grad)


def test_quantize_switch_off_is_exactly_nn_linear():
    layer = FP4Linear(32, 32, spec=get_recipe("nvfp4").linear, backend="fused")
    x = torch.randn(16, 32)
    layer.quantize = False
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.quantize = True
    assert not torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_from_linear_shares_parameters():
    lin = nn.Linear(32, 16)
    fp4 = FP4Linear.from_linear(lin, get_recipe("nvfp4").linear, backend="fused")
    assert fp4.weight is lin.weight and fp4.bias is lin.bias
    assert fp4.weight.device.type == "cpu"


def test_autocast_bf16_runs_gemms_in_bf16_and_keeps_fp32_grads():
    layer = FP4Linear(32, 32, spec=get_recipe("nvfp4").linear, backend="fused")
    x = torch.randn(32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(scheme="fp8"), "scheme"),
        (dict(scheme="nvfp4", rounding="up"), "rounding"),
        (dict(scheme="nvfp4", hadamard=12), "hadamard"),
        (dict(scheme="mxfp4", tile=True), "tile"),
        (dict(scheme="nvfp4", scale_rule="ceil"), "scale_rule"),
        (dict(scheme="mxfp4", scale_rule="4over6"), "scale_rule"),
        (dict(scheme="e2m1_per_tensor", scale_rule="up"), "scale_rule"),
        (dict(scheme="fp8_e4m3", rounding="stochastic"), "round-to-nearest"),
    ],
)
def test_quantspec_rejects_bad_fields(kwargs, words):
    with pytest.raises(ValueError, match=words):
        QuantSpec(**kwargs)


def test_linearspec_checks_hadamard_pairs_and_tiles():
    with pytest.raises(ValueError, match="wgrad_dy.hadamard=16 and wgrad_x.hadamard=0"):
        LinearSpec(wgrad_dy=QuantSpec("nvfp4", hadamard=16), wgrad_x=QuantSpec("nvfp4"))
    with pytest.raises(ValueError, match="fprop_x: tile"):
        LinearSpec(fprop_x=QuantSpec("nvfp4", tile=True))
    with pytest.raises(TypeError, match="dgrad_dy"):
        LinearSpec(dgrad_dy="nvfp4")


def test_fp4linear_rejects_sizes_and_token_counts_off_the_blocks():
    spec = get_recipe("nvfp4").linear
    with pytest.raises(ValueError, match="in_features = 40"):
        FP4Linear(40, 32, spec=spec)
    layer = FP4Linear(32, 32, spec=spec, backend="fused")
    with pytest.raises(ValueError, match=r"number of tokens \(N = 20"):
        layer(torch.randn(4, 5, 32))
    with torch.no_grad():  # no Wgrad, no constraint on the token count
        assert layer(torch.randn(4, 5, 32)).shape == (4, 5, 32)
    with pytest.raises(ValueError, match="backend"):
        FP4Linear(32, 32, spec=spec, backend="triton")


# ----------------------------------------------------------------------------
# bfloat16 autocast: the same simulation as float32
# ----------------------------------------------------------------------------
BF16_FIDELITY_RECIPES = ("fp4_naive", "mxfp4", "nvfp4", "nvfp4_no_tiles", "nvfp4_no_sr", "nvfp4_no_rht", "fp8",
                         "nvfp4_4over6", "nvfp4_unbiased_sr")


def _three_gemms(spec, autocast: bool):
    """Y, dX and dW of a fresh 256 x 256 FP4Linear (same seed, same inputs), with or without bf16 autocast."""
    torch.manual_seed(0)
    layer = FP4Linear(256, 256, bias=False, spec=spec, backend="fused", seed=5)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 128, 256, generator=gen) * torch.rand(2, 128, 1, generator=gen)).requires_grad_(True)
    dy = (torch.randn(2, 128, 256, generator=gen) * 1e-3).bfloat16()  # the same bf16 gradient for both
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        y.backward(dy)
    else:
        y = layer(x)
        y.backward(dy.float())
    return y.detach(), x.grad, layer.weight.grad


@pytest.mark.parametrize("name", BF16_FIDELITY_RECIPES)
def test_bf16_autocast_output_is_the_bf16_rounding_of_the_float32_path(name):
    # The GEMM operands are E2M1 values times their block scales (exact in bf16); the
    # per-tensor scales multiply the float32 output. So under bf16 autocast every
    # GEMM's output is the float32 path's output rounded once to bf16, up to the
    # order of the float32 additions. (Folding the per-tensor scale into the
    # operands instead matched on only 43-55% of the elements.)
    spec = get_recipe(name).linear
    y32, dx32, dw32 = _three_gemms(spec, autocast=False)
    y16, dx16, dw16 = _three_gemms(spec, autocast=True)
    for gemm, lo, hi in (("fprop", y16, y32), ("dgrad", dx16, dx32), ("wgrad", dw16, dw32)):
        same = float((lo.float() == hi.bfloat16().float()).double().mean())
        assert same >= 0.99, (name, gemm, same)


def test_bf16_operands_of_every_quantized_role_are_exact():
    x = torch.randn(64, 128) * 3e-3
    for name in ("fp4_naive", "mxfp4", "nvfp4", "fp8", "nvfp4_4over6", "nvfp4_unbiased_sr"):
        lin = get_recipe(name).linear
        for role, (_, axis, _) in ROLES.items():
            spec = getattr(lin, role)
            values, _ = fake_quantize_operand(x, dataclasses.replace(spec, hadamard=0), axis, seed=3, factored=True)
            assert torch.equal(values.bfloat16().float(), values), (name, role)


def test_compiled_backend_that_disagrees_with_fused_falls_back_loudly(caplog):
    # A compiled kernel whose bits differ from the fused path (a miscompile, a stale
    # kernel cache) must not be used: the first call per spec and shape compares them.
    from fp4lib.numerics import kernels

    def bad_apply(*args):
        values, scale = kernels._stage_apply(*args)
        return values + 1.0, scale

    wrapper = kernels._CompiledFakeQuantize()
    wrapper._stages = lambda *spec: (kernels._stage_scales, bad_apply)
    x = torch.randn(32, 64)
    seed_t = seed_term(3)
    with caplog.at_level(logging.WARNING, logger="fp4lib.numerics.compiling"):
        out = wrapper(x, seed_t, "nvfp4", 1, "stochastic")
    assert re.search(r"scheme=nvfp4, block axis 1, rounding=stochastic.*bits differ", caplog.text)
    ref = kernels.fake_quantize_fused(x, seed_t, "nvfp4", 1, "stochastic")
    assert same_bits(out[0], ref[0]) and same_bits(out[1], ref[1])
    assert same_bits(wrapper(x, seed_t, "nvfp4", 1, "stochastic")[0], ref[0])  # and stays on the fused path
