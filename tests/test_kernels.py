"""The fast quantize paths (fp4lib.numerics.kernels) must equal the plain-PyTorch reference bit for bit."""

import logging

import pytest
import torch

from fp4lib import BNB_FP4, quantize
from fp4lib.numerics import compiling, kernels
from fp4lib.numerics import quantize as quantize_module
from fp4lib.numerics.compiling import VerifiedCompiled, compile_works
from test_scale_rules import order_sensitive

SHAPES = [(4096,), (64, 48), (7, 13), (3, 1000), (1,), (130,)]
BLOCK_SHAPES = [(4, 64), (3, 5, 32), (64, 96), (1, 32)]


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


def assert_same(fast, ref):
    assert fast is not None
    assert torch.equal(fast.packed, ref.packed)
    assert fast.scale.dtype == ref.scale.dtype and torch.equal(_bits(fast.scale), _bits(ref.scale))
    assert (fast.global_scale is None) == (ref.global_scale is None)
    if ref.global_scale is not None:
        assert torch.equal(fast.global_scale.view(torch.int32), ref.global_scale.view(torch.int32))
    assert fast.shape == ref.shape and fast.dtype == ref.dtype and fast.tile == ref.tile
    assert fast.clip_fraction == ref.clip_fraction
    assert torch.equal(fast.dequantize(), ref.dequantize())


def _eager(x, scheme, **kw):
    """The fast formulation run without compiling, through quantize_packed's own wrapping."""
    real = kernels._verified

    class Eager:
        def call(self, key, label, *args):
            return {"bnb": kernels._bnb_packed, "e2m1": kernels._e2m1_packed}[key[0]](*args)

    kernels._verified = lambda name: Eager()
    try:
        bs = kw.pop("block_size", {"mxfp4": 32, "nvfp4": 16, "e2m1_per_tensor": 0}.get(scheme, 64))
        return kernels.quantize_packed(x.contiguous().float(), scheme, block_size=bs, dtype=x.dtype, **kw)
    finally:
        kernels._verified = real


@pytest.mark.parametrize("scheme", ["bnb_fp4", "nf4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bnb_eager_formulation_matches_reference(scheme, shape, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    x.view(-1)[0] = 0.0  # exact zeros take the tie-to-lower path
    fast = _eager(x, scheme)
    if x.numel() < 64:
        assert fast is None  # no full block: the reference does it
        return
    assert_same(fast, quantize(x, scheme, backend="reference"))


@pytest.mark.parametrize("scheme", ["mxfp4", "nvfp4", "e2m1_per_tensor"])
@pytest.mark.parametrize("shape", BLOCK_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_eager_formulation_matches_reference(scheme, shape, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 5).to(dtype)
    x.view(-1)[:32] = 0.0  # an all-zero block
    assert_same(_eager(x, scheme), quantize(x, scheme, backend="reference"))


@pytest.mark.parametrize("rule", ["floor", "ceil"])
def test_mx_scale_rules_and_clip_fraction(rule):
    x = torch.randn(256, 64) * torch.logspace(-30, 30, 64)  # blocks spanning the E8M0 range
    fast = _eager(x, "mxfp4", scale_rule=rule)
    ref = quantize(x, "mxfp4", scale_rule=rule, backend="reference")
    assert_same(fast, ref)


def test_nvfp4_tiles_and_tiny_tensors():
    x = torch.randn(48, 64) * 1e-30  # block scales deep in E4M3's subnormals without the tensor scale
    assert_same(_eager(x, "nvfp4", tile=True), quantize(x, "nvfp4", tile=True, backend="reference"))
    assert_same(_eager(x, "nvfp4"), quantize(x, "nvfp4", backend="reference"))


def test_ties_and_midpoints_match_reference():
    mids = BNB_FP4._midpoints
    block = torch.cat([torch.tensor([1.0]), mids, torch.nextafter(mids, torch.tensor(2.0))])
    x = torch.cat([block, torch.zeros(64 - block.numel()), torch.zeros(64)])
    for scheme in ("bnb_fp4", "nf4"):
        assert_same(_eager(x, scheme), quantize(x, scheme, backend="reference"))
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4).reshape(1, 32)
    for scheme in ("mxfp4", "e2m1_per_tensor"):
        assert_same(_eager(ties, scheme), quantize(ties, scheme, backend="reference"))


@pytest.mark.skipif(not compile_works(), reason="torch.compile needs a working C++ compiler")
def test_compiled_path_matches_reference():
    torch.manual_seed(1)
    for scheme in ("bnb_fp4", "nf4", "mxfp4", "nvfp4", "e2m1_per_tensor"):
        for shape in [(256, 256), (1024, 96)]:
            x = torch.randn(shape) * torch.rand(shape) * 10
            assert_same(quantize(x, scheme, backend="compiled"), quantize(x, scheme, backend="reference"))
    x = torch.randn(512, 512)
    assert_same(quantize(x, "nvfp4", tile=True, backend="compiled"), quantize(x, "nvfp4", tile=True, backend="reference"))


@pytest.mark.skipif(not compile_works(), reason="torch.compile needs a working C++ compiler")
@pytest.mark.parametrize("formula", ["te2025", "te2026"])
def test_tiled_four_over_six_kernel_compiled_for_any_shape_matches_eager(formula):
    # quantize's kernel compiles the first shape as it is and later ones for any shape.
    # Four-over-six's tile sums once came out of such a compile with their reduced axis
    # broadcast against the tile's 16 rows: each row took another tile's choice of scale.
    # Both formulas (their graphs differ), and a tensor of a single row of tiles.
    kernel = compiling.compile_kernel(kernels._e2m1_packed, dynamic=True)
    g = torch.Generator().manual_seed(4)
    for shape in [(32, 64), (64, 64), (48, 128), (16, 32)]:
        x = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g).mul(8).exp2()
        got = kernel(x, "nvfp4", "4over6", True, formula, "mse")
        want = kernels._e2m1_packed(x, "nvfp4", "4over6", True, formula, "mse")
        for a, b in zip(got, want):
            assert torch.equal(_bits(a.reshape(-1)), _bits(b.reshape(-1))), shape


def test_four_over_six_error_sums_across_blocks_are_the_last_axis_sums():
    # _across_blocks lays each 16 neighbouring blocks of the last axis out transposed, so
    # that the error sums run along the middle axis: every block's float64 sum must be the
    # one made along the last axis, bit for bit (the same terms, added in the same order).
    from fp4lib.numerics.scales import _error_sum64, nvfp4_block_scales, nvfp4_tensor_scale

    x = order_sensitive((32, 64), 6)
    last = x.view(32, 4, 16)
    across = kernels._across_blocks(x)
    assert across.shape == (8, 16, 16) and torch.equal(across[1, :, 3], x.view(-1, 16)[16 + 3].abs())
    s_enc, s_dec = nvfp4_tensor_scale(x.abs().max(), 256.0)
    amax_b = last.abs().amax(dim=2, keepdim=True)
    for target in (6.0, 4.0):
        s_dec_b, s_enc_b = nvfp4_block_scales(amax_b, s_enc, s_dec, target=target)
        want = _error_sum64(last, s_enc, s_dec_b, s_enc_b, 2, kernels._round_magnitude, "mse")
        got = _error_sum64(across, s_enc, s_dec_b.reshape(8, 1, 16), s_enc_b.reshape(8, 1, 16), 1,
                           kernels._round_magnitude, "mse")
        assert torch.equal(got.reshape(-1).view(torch.int64), want.reshape(-1).view(torch.int64))


@pytest.mark.parametrize("formula", ["te2025", "te2026"])
@pytest.mark.parametrize("metric", ["mse", "mae"])
def test_four_over_six_scales_from_blocks_across_equal_the_block_views(formula, metric):
    x = order_sensitive((48, 128), 7)
    args = (x, "nvfp4", 1, False, "4over6", None, formula, metric)
    want = kernels._stage_scales(*args)
    got = kernels._stage_scales(*args, kernels._across_blocks(x))
    assert got[0].shape == want[0].shape == (48, 8, 1)
    for a, b in zip(got, want):
        assert torch.equal(_bits(a), _bits(b))
    for wrong in [("nvfp4", 0, False, "4over6"), ("nvfp4", 1, True, "4over6"), ("fp8_e4m3", 1, False, None)]:
        with pytest.raises(ValueError, match="only for NVFP4 blocks along axis 1"):
            kernels._stage_scales(x, *wrong, None, formula, metric, kernels._across_blocks(x))


@pytest.mark.skipif(not compile_works(), reason="torch.compile needs a working C++ compiler")
def test_compiled_four_over_six_along_the_last_axis_sums_across_blocks_with_the_eager_bits(monkeypatch):
    # The compiled training kernel takes the transposed copy for four-over-six along the last
    # axis where the tensor holds whole groups of 16 blocks (here 48 x 128), and the plain block
    # view otherwise (24 x 16: 24 blocks); the eager formulation's bits either way, and
    # trusted (no fallback). Also with a group's amax given, and on a NaN after verification.
    from fp4lib.numerics.rounding import seed_term

    copies = []
    real = kernels.compile_kernel

    def spy(fn, *args, **kwargs):
        compiled = real(fn, *args, **kwargs)
        if fn.__name__ != "_across_blocks":
            return compiled
        return lambda x: copies.append(tuple(x.shape)) or compiled(x)

    monkeypatch.setattr(kernels, "compile_kernel", spy)
    fq = kernels._CompiledFakeQuantize()
    cases = [((48, 128), "nearest", None, "te2025", "mse"), ((48, 128), "stochastic", None, "te2026", "mae"),
             ((48, 128), "nearest", torch.tensor(2.0**23), "te2025", "mse"), ((24, 16), "nearest", None, "te2025", "mse")]
    for shape, rounding, group_amax, formula, metric in cases:
        x = order_sensitive(shape, 8)
        args = (x, seed_term(3), "nvfp4", 1, rounding, False, "4over6", group_amax, formula, metric)
        got, want = fq(*args), kernels.fake_quantize_fused(*args)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, want)), (shape, rounding, formula)
    assert set(copies) == {(48, 128)}
    assert not fq.kernel.fallback, fq.kernel.fallback
    x = order_sensitive((48, 128), 9)
    x[5, 17] = float("nan")
    values, _ = fq(x, seed_term(3), "nvfp4", 1, "nearest", False, "4over6", None, "te2025", "mse")
    assert torch.isnan(values).all()


def test_auto_uses_the_fast_path_only_where_it_pays_and_applies(monkeypatch):
    calls = []
    real = kernels.quantize_packed
    monkeypatch.setattr(quantize_module, "quantize_packed", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    quantize(torch.randn(64, 64), "nvfp4")  # small: the reference
    quantize(torch.randn(256, 256), "nvfp4", rounding="stochastic")  # stochastic: the reference
    quantize(torch.randn(256, 256), "nf4", double_quant=True)  # double quantization: the reference
    assert calls == []
    if compile_works():
        monkeypatch.setattr(quantize_module, "_AUTO_SEEN", {})
        x = torch.randn(512, 128)
        quantize(x, "nvfp4")  # a shape's first call does not wait for a compile
        assert calls == []
        quantize(x, "nvfp4")  # from its second on, it is worth compiling
        assert calls == ["nvfp4"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("scheme,where", [("nf4", 3), ("nf4", 65_600), ("nvfp4", 70_000)])
def test_nonfinite_raises_like_reference(bad, scheme, where):
    x = torch.randn(65_610 if scheme == "nf4" else 65_536 * 2)
    x[where] = bad
    with pytest.raises(ValueError, match=rf"non-finite .* index \({where},\)"):
        quantize(x, scheme)


def test_compiled_backend_refuses_what_it_does_not_cover():
    with pytest.raises(ValueError, match="backend='compiled' covers"):
        quantize(torch.randn(64), "nf4", double_quant=True, backend="compiled")
    with pytest.raises(ValueError, match="backend must be one of"):
        quantize(torch.randn(64), "nf4", backend="fast")


def test_a_kernel_whose_bits_differ_is_not_trusted(caplog):
    def eager(x):
        return (x * 2,)

    def miscompiled(x):
        return (x * 2 + 1e-3,)

    k = VerifiedCompiled(eager, miscompiled)
    x = torch.randn(8)
    with caplog.at_level(logging.WARNING, logger="fp4lib.numerics.compiling"):
        out = k.call(("key",), "my kernel", x)
    assert "my kernel: the compiled kernel's bits differ" in caplog.text
    assert torch.equal(out[0], x * 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fp4lib.numerics.compiling"):
        assert torch.equal(k.call(("key",), "my kernel", x)[0], x * 2)  # eager from then on, quietly
    assert caplog.records == []
    good = VerifiedCompiled(eager, eager)
    good.call(("k",), "fine", x)
    assert ("k",) in good.verified


def test_a_call_may_bring_its_own_compiled_function_and_is_verified_all_the_same(caplog):
    def eager(x):
        return (x * 2,)

    k = VerifiedCompiled(eager, eager)
    x = torch.randn(8)
    with caplog.at_level(logging.WARNING, logger="fp4lib.numerics.compiling"):
        out = k.call(("own",), "own kernel", x, compiled=lambda t: (t * 2 + 1e-3,))
    assert "own kernel: the compiled kernel's bits differ" in caplog.text and torch.equal(out[0], x * 2)
    seen = []
    assert torch.equal(k.call(("other",), "other", x, compiled=lambda t: seen.append(1) or eager(t))[0], x * 2)
    assert torch.equal(k.call(("other",), "other", x, compiled=lambda t: seen.append(2) or eager(t))[0], x * 2)
    assert seen == [1, 2] and ("other",) in k.verified  # a verified key runs the function it is given
    with pytest.raises(TypeError, match="bare: no compiled function given"):
        VerifiedCompiled(eager, None).call(("k",), "bare", x)


def test_a_function_with_its_own_code_computes_the_same():
    def f(x, scale=2.0, *, shift=1.0):
        return x * scale + shift

    g = kernels._own_code(f)
    assert g.__code__ is not f.__code__ and g.__name__ == f.__name__ and g.__doc__ == f.__doc__
    x = torch.randn(5)
    assert torch.equal(g(x), f(x)) and torch.equal(g(x, 3.0, shift=-1.0), f(x, 3.0, shift=-1.0))


@pytest.mark.skipif(not compile_works(), reason="torch.compile needs a working C++ compiler")
def test_each_training_specialization_compiles_copies_of_its_own(monkeypatch):
    # torch.compile keeps compiled specializations on the code object and checks their
    # guards in turn on every call: each stage is compiled as copies, one per combination
    # of what that stage depends on, so that a call meets only its own entry. Each still
    # gives the eager bits.
    from fp4lib.numerics.rounding import seed_term

    codes = []
    real = kernels.compile_kernel
    monkeypatch.setattr(kernels, "compile_kernel", lambda fn, *a, **k: codes.append((fn.__name__, fn.__code__)) or
                        real(fn, *a, **k))
    fq = kernels._CompiledFakeQuantize()
    calls = [((32, 64), "nvfp4", 1, "stochastic", None), ((64, 64), "nvfp4", 1, "stochastic", None),
             ((32, 64), "nvfp4", 0, "nearest", None), ((32, 64), "mxfp4", 1, "nearest", None),
             ((32, 128), "nvfp4", 1, "nearest", "4over6"),
             ((32, 64), "nvfp4", 1, "nearest", None),  # the first call's block scales, another rounding
             ((32, 64), "nvfp4", 1, "nearest", "nearest")]  # the same as the call before, its rule named
    for shape, scheme, axis, rounding, rule in calls * 2:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(len(codes)))
        args = (x, seed_term(5), scheme, axis, rounding, False, rule)
        got, want = fq(*args), kernels.fake_quantize_fused(*args)
        assert torch.equal(_bits(got[0]), _bits(want[0])), (shape, scheme, axis, rounding, rule)
        assert (got[1] is None and want[1] is None) or torch.equal(_bits(got[1]), _bits(want[1]))
    names = [name for name, _ in codes]
    assert len(fq.compiled) == 7
    assert (names.count("_stage_scales"), names.count("_stage_apply"), names.count("_across_blocks")) == (5, 6, 1)
    assert len({id(code) for _, code in codes}) == len(codes)
    assert all(code is not getattr(kernels, name).__code__ for name, code in codes)
    assert not fq.kernel.fallback, fq.kernel.fallback
    entries = getattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list", None)  # torch's own debugging aid
    if entries is not None:
        assert [len(entries(code)) for _, code in codes] == [1] * len(codes)


def test_a_cuda_build_of_torch_compiling_for_the_cpu_adds_no_notice_without_a_gpu(monkeypatch, caplog):
    """Chapters compare stored outputs: the CUDA_HOME notice of PyPI's CUDA torch on a CPU-only machine is dropped."""
    import logging

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    compiling._quiet_cuda_notice()
    log = logging.getLogger("torch.utils.cpp_extension")
    with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
        log.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        log.warning("another notice")
    assert [r.getMessage() for r in caplog.records] == ["another notice"]


def _round_by_thresholds(s):
    """E2M1 round-to-nearest-even as the sum of the threshold tests of the E2M1 midpoints."""
    m = s.abs()
    q = torch.zeros_like(m)
    for mid, step, tie_up in kernels._E2M1_STEPS:
        q = q + ((m >= mid) if tie_up else (m > mid)).to(m.dtype) * step
    return torch.copysign(q, s)


def _round_stochastic_by_division(s, u):
    """E2M1 stochastic rounding written with the divisions of the rule: lo = floor(m / step) * step,
    up when u < (m - lo) / step."""
    m = s.abs().clamp(max=6.0)
    step = torch.where(m < 2.0, 0.5, torch.where(m < 4.0, 1.0, 2.0))
    lo = torch.floor(m / step) * step
    return torch.copysign(lo + torch.where(u < (m - lo) / step, step, 0.0), s)


def test_round_stochastic_multiplies_by_the_reciprocal_with_the_same_bits():
    # Every 251st float32 magnitude in [0, 6], every binade edge and grid point with its
    # neighbours, subnormals, saturation, NaN, both signs; each with draws exactly at and
    # just below its probability of going up, and others (all float32 magnitudes in [0, 6]
    # agree: checked once).
    top = int(torch.tensor(6.0).view(torch.int32))
    sweep = torch.arange(0, top + 1, 251, dtype=torch.int32).view(torch.float32)
    points = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 1e-45, 1.2e-38, float("nan")])
    near = torch.cat([points, torch.nextafter(points, torch.tensor(0.0)), torch.nextafter(points, torch.tensor(1e38))])
    s = torch.cat([sweep, near, -near])
    m = s.abs().clamp(max=6.0)
    step = torch.where(m < 2.0, 0.5, torch.where(m < 4.0, 1.0, 2.0))
    p_up = (m - torch.floor(m / step) * step) / step  # the division form's probability of going up
    at, below = p_up.nan_to_num(0.5), torch.nextafter(p_up.nan_to_num(0.5), torch.tensor(0.0))
    for u in (at, below, torch.rand(s.shape), torch.full(s.shape, 0.5), torch.zeros(s.shape)):
        got = kernels._round_stochastic(s, u)
        assert torch.equal(got.view(torch.int32), _round_stochastic_by_division(s, u).view(torch.int32))


def test_round_magnitude_matches_round_nearest_on_every_magnitude():
    # Four-over-six's errors round magnitudes by adding and subtracting a shifted
    # constant; for every m >= 0 the bits of _round_nearest (all nonnegative float32
    # checked once; here a sweep of them, every midpoint, grid point and binade edge with
    # its neighbours, subnormals, saturation and infinity). NaN stays NaN.
    top = 0x7F800000  # +inf
    sweep = torch.arange(0, top + 1, 4099, dtype=torch.int64).to(torch.int32).view(torch.float32)
    points = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 1e30,
                           1e-45, 1.2e-38, float("inf")])
    near = torch.cat([points, torch.nextafter(points, torch.tensor(0.0)), torch.nextafter(points, torch.tensor(1e38))])
    m = torch.cat([sweep, near])
    assert torch.equal(kernels._round_magnitude(m).view(torch.int32), kernels._round_nearest(m).view(torch.int32))
    assert kernels._round_magnitude(torch.tensor([float("nan")])).isnan().all()
    # The shift is added in float32 even where torch's default dtype is float64.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = kernels._round_magnitude(near)
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), kernels._round_nearest(near).view(torch.int32))


def test_e2m1_roundings_are_symmetric_about_zero():
    # Four-over-six makes its errors from magnitudes, which gives the signed errors' squares
    # only if every rounding it may be given maps -x to minus the rounding of x: ties,
    # saturation and the zero code included.
    from fp4lib.numerics.reference import _e2m1_nearest

    points = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 1e30,
                           1e-45, 1.2e-38, float("inf")])
    near = torch.cat([points, torch.nextafter(points, torch.tensor(0.0)), torch.nextafter(points, torch.tensor(1e38))])
    x = torch.cat([near, torch.randn(100_000) * 3])
    for rounding in (kernels._round_nearest, _e2m1_nearest):
        assert torch.equal(rounding(-x).view(torch.int32), (-rounding(x)).view(torch.int32)), rounding.__name__


def test_round_nearest_matches_the_threshold_tests_bit_for_bit():
    # Every midpoint, grid point and binade edge with its float32 neighbours, subnormals,
    # saturation, infinities and NaN, both signs (all float32 inputs agree: checked once).
    points = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 1e30,
                           1e-45, 1.2e-38, float("inf"), float("nan")])
    near = torch.cat([points, torch.nextafter(points, torch.tensor(0.0)), torch.nextafter(points, torch.tensor(1e38))])
    s = torch.cat([near, -near, torch.randn(100_000) * 3])
    assert torch.equal(kernels._round_nearest(s).view(torch.int32), _round_by_thresholds(s).view(torch.int32))
