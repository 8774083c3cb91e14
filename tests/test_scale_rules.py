"""NVFP4's block-scale rules beyond the standard one, and FP8 with current scaling.

* ``"up"``: the E4M3 block scale rounded up, so that stochastic rounding never
  clamps a block maximum and stays unbiased there;
* ``"4over6"``: four-over-six (Cook et al. 2025), each block's maximum mapped to 6
  or to 4, whichever gives the smaller squared error;
* FP8 E4M3 / E5M2 with one scale per tensor from its current amax.
"""

import itertools

import pytest
import torch

from fp4lib import fake_quantize, quantize
from fp4lib.numerics.constants import E4M3_MAX
from fp4lib.training.operands import fake_quantize_operand, reference_operand, tensor_amax_reduction
from fp4lib.training.specs import QuantSpec
from fp4lib.numerics.reference import fp8_fake_quantize
from fp4lib.numerics.scales import e4m3_round_up, nvfp4_tensor_scale

E4M3_VALUES = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # every finite, >= 0
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def test_e4m3_round_up_is_the_smallest_e4m3_number_at_least_v():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.rand(4000, generator=g).mul(24).sub(12).exp2(), E4M3_VALUES, torch.tensor([0.0, 460.0])])
    up = e4m3_round_up(v)
    brute = torch.stack([E4M3_VALUES[E4M3_VALUES >= t].min() if t <= E4M3_MAX else torch.tensor(E4M3_MAX)
                         for t in v])
    assert torch.equal(up, brute)


def _block_maxima_scaled(x, **kwargs):
    """|x| / (its block's decode scale) at each block's maximum, for NVFP4 of a (rows, 16k) tensor."""
    q = quantize(x, "nvfp4", backend="reference", **kwargs)
    scale = (q.scale.float() * q.global_scale).repeat_interleave(16, dim=-1)
    arg = x.abs().view(-1, 16).argmax(-1)
    return (x.abs() / scale).view(-1, 16).gather(1, arg[:, None]).squeeze(1)


def test_scale_rule_up_keeps_every_scaled_element_within_6_and_nearest_does_not():
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    near = _block_maxima_scaled(x)
    up = _block_maxima_scaled(x, scale_rule="up")
    assert float((near > 6).double().mean()) > 0.2  # E4M3 rounds the scale down in many Gaussian blocks
    # (6 up to float32 rounding of the scale products), at most one E4M3 step of headroom
    assert bool((up <= 6 * (1 + 2.0**-20)).all()) and bool((up > 6 / 1.125 - 1e-6).all())


def test_stochastic_rounding_is_unbiased_at_block_maxima_only_with_scales_rounded_up():
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    is_max = x.abs() == x.abs().view(-1, 16).amax(-1, keepdim=True).repeat_interleave(16, -1).view_as(x)
    n = 200
    bias = {}
    for rule in ("nearest", "up"):
        mean = torch.zeros_like(x)
        for s in range(n):
            g = torch.Generator().manual_seed(100 + s)
            mean += fake_quantize(x, "nvfp4", rounding="stochastic", generator=g, scale_rule=rule, backend="reference")
        # Toward zero is negative: the error in magnitude, relative to the block maximum.
        err = (mean / n - x) * x.sign() / x.abs().view(-1, 16).amax(-1, keepdim=True).repeat_interleave(16, -1).view_as(x)
        bias[rule] = (float(err[is_max].mean()), float(err[~is_max].mean()))
    # Measured: nearest about -0.023 of the block maximum at maxima; up within noise of zero.
    assert bias["nearest"][0] < -0.01
    assert abs(bias["up"][0]) < 0.004
    assert abs(bias["nearest"][1]) < 0.004 and abs(bias["up"][1]) < 0.004


def _block_sq_errors(x, s_enc, target, rule="nearest"):
    """Brute force, float64: each 1x16 block's squared error with the scale mapping its max to ``target``."""
    blocks = x.view(-1, 16).double()
    amax = blocks.abs().amax(-1, keepdim=True)
    s_dec_b = ((amax.float() / target) * s_enc).to(torch.float8_e4m3fn).double()
    scaled = torch.where(s_dec_b > 0, blocks * s_enc.double() / s_dec_b, torch.zeros_like(blocks))
    grid = torch.cat([-E2M1_GRID.flip(0), E2M1_GRID]).double()
    q = grid[(scaled.clamp(-6, 6).unsqueeze(-1) - grid).abs().argmin(-1)]
    return ((q * s_dec_b / s_enc.double() - blocks) ** 2).sum(-1)


def test_four_over_six_picks_the_candidate_with_the_smaller_error_per_block():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g) * torch.rand(256, 1, generator=g).mul(8).exp2()
    q = quantize(x, "nvfp4", scale_rule="4over6", backend="reference")
    s_enc, s_dec = nvfp4_tensor_scale(x.abs().max(), 256.0)
    assert q.global_scale == s_dec
    err = ((q.dequantize().double() - x.double()) ** 2).view(-1, 16).sum(-1)
    best = torch.minimum(_block_sq_errors(x, s_enc, 6.0), _block_sq_errors(x, s_enc, 4.0))
    assert torch.allclose(err, best, rtol=1e-5, atol=1e-12)
    assert float(q.scale.float().max()) <= E4M3_MAX
    # Both candidates are used, and the total error is below the standard rule's.
    standard = ((quantize(x, "nvfp4", backend="reference").dequantize() - x) ** 2).sum()
    assert float(err.sum()) < float(standard)


def order_sensitive(shape, seed):
    """Each element its own magnitude (2**-20 to 2**20): a block's error sums depend on their order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.rand(shape, generator=g).mul(40).sub(20).exp2()


@pytest.mark.parametrize("rounding", ["signed", "magnitude"])
@pytest.mark.parametrize("layout", ["last axis", "first axis", "tile"])
def test_four_over_six_error_sums_add_in_one_fixed_order(layout, rounding):
    # The float64 sum of a block's errors adds the elements one after another along the
    # block (a tile: along each row, then the row sums pairwise), whichever axis the blocks
    # run along: the same numbers as Python's own float additions in that order. The sums
    # make each error from the element's magnitude; the errors here are made from the
    # signed values, so this also checks that the two give the same squares, with the
    # kernels' signed rounding and with their magnitude-only one.
    from fp4lib.numerics.kernels import _round_magnitude, _round_nearest
    from fp4lib.numerics.scales import _error_sum64, nvfp4_block_scales

    # 64 x 64: 16 tiles, enough that some sums tell the orders apart whichever CPU kernels
    # drew the data (with 4 tiles, ATen's default kernels drew data where only 2 did).
    x = order_sensitive((64, 64), 5)
    s_enc, s_dec = nvfp4_tensor_scale(x.abs().max(), 256.0)
    if layout == "tile":
        v, dims = x.view(4, 16, 4, 16), (1, 3)
    elif layout == "last axis":
        v, dims = x.view(64, 4, 16), (2,)
    else:
        v, dims = x.view(4, 16, 64), (1,)
    amax_b = v.abs().amax(dim=dims, keepdim=True)
    s_dec_b, s_enc_b = nvfp4_block_scales(amax_b, s_enc, s_dec, target=4.0)
    err = ((_round_nearest(v * s_enc_b) * s_dec_b - v * s_enc).double() ** 2).expand(v.shape)
    got = _error_sum64(v, s_enc, s_dec_b, s_enc_b, dims, _round_nearest if rounding == "signed" else _round_magnitude,
                       "mse")
    pairwise_differs = 0
    for idx in itertools.product(*(range(n) for n in got.shape)):
        sel = tuple(slice(None) if d in dims else i for d, i in enumerate(idx))
        e = err[sel]
        if layout == "tile":
            rows = []
            for r in range(16):
                acc = float(e[r, 0])
                for c in range(1, 16):
                    acc += float(e[r, c])
                rows.append(acc)
            while len(rows) > 1:
                half = len(rows) // 2
                rows = [rows[i] + rows[i + half] for i in range(half)]
            want = rows[0]
        else:
            want = float(e[0])
            for t in e[1:]:
                want += float(t)
        terms = [float(t) for t in e.reshape(-1)]
        while len(terms) > 1:  # another order, halves added pairwise
            half = len(terms) // 2
            terms = [terms[i] + terms[i + half] for i in range(half)]
        pairwise_differs += terms[0] != want
        assert float(got[idx]) == want
    assert pairwise_differs >= 3  # the data tell the orders apart


@pytest.mark.parametrize("rule", ["up", "4over6"])
@pytest.mark.parametrize("tile", [False, True])
def test_compiled_packed_quantize_matches_the_reference_for_each_rule(rule, tile):
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(4))
    ref = quantize(x, "nvfp4", scale_rule=rule, tile=tile, backend="reference")
    fast = quantize(x, "nvfp4", scale_rule=rule, tile=tile, backend="auto")
    assert torch.equal(fast.packed, ref.packed)
    assert torch.equal(fast.scale.view(torch.uint8), ref.scale.view(torch.uint8))
    assert torch.equal(fast.global_scale, ref.global_scale)


@pytest.mark.parametrize("scheme, dtype, fmax", [("fp8_e4m3", torch.float8_e4m3fn, 448.0),
                                                 ("fp8_e5m2", torch.float8_e5m2, 57344.0)])
def test_fp8_current_scaling_maps_amax_to_the_format_maximum(scheme, dtype, fmax):
    g = torch.Generator().manual_seed(5)
    for x in (torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g) * 1e-6):
        values, s_dec = fp8_fake_quantize(x, scheme)
        assert float(values.abs().max()) == fmax
        assert torch.equal(values.to(dtype).float(), values)  # FP8 numbers
        assert torch.equal(fake_quantize(x, scheme), values * s_dec)
    with pytest.raises(ValueError, match="no"):
        fake_quantize(x, scheme, rounding="stochastic")


def test_scale_rules_are_checked_per_scheme():
    x = torch.randn(4, 32)
    for scheme, bad in itertools.product(("mxfp4", "nvfp4", "nf4"), ("4over6", "ceil", "up")):
        ok = (scheme == "mxfp4" and bad == "ceil") or (scheme == "nvfp4" and bad in ("4over6", "up"))
        if ok:
            quantize(x, scheme, scale_rule=bad)
        else:
            with pytest.raises(ValueError, match="scale_rule"):
                quantize(x, scheme, scale_rule=bad)


@pytest.mark.parametrize("spec", [QuantSpec("nvfp4", rounding="stochastic"), QuantSpec("e2m1_per_tensor"),
                                  QuantSpec("fp8_e5m2"), QuantSpec("mxfp4")], ids=QuantSpec.short)
def test_a_group_amax_sets_the_per_tensor_scale_on_every_path(spec):
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(6))
    group = x.abs().amax() * 3  # as if another rank held a larger value
    with tensor_amax_reduction(lambda amax: torch.maximum(amax, group)):
        ref = reference_operand(x, spec, 1, seed=2, tensor_amax=_expected_amax(x, spec, group))
        for backend in ("reference", "fused"):
            values, scale = fake_quantize_operand(x, spec, 1, seed=2, backend=backend, factored=True)
            assert torch.equal(values, ref[0]) and (scale is None or torch.equal(scale, ref[1])), backend
    own = fake_quantize_operand(x, spec, 1, seed=2, backend="fused", factored=True)
    assert torch.equal(own[0], ref[0]) == (spec.scheme == "mxfp4")  # MXFP4 has no per-tensor scale
    with pytest.raises(ValueError, match="below the tensor's own amax"):
        quantize(x, "nvfp4", tensor_amax=x.abs().amax() / 2)


def _expected_amax(x, spec, group):
    return group if spec.scheme != "mxfp4" else None
