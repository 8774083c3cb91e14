"""Handing fp4lib's FP4 tensors to torchao and to FP4 GEMM layouts (fp4lib.engines.torchao), checked
against torchao's own quantizers and layout functions."""

import pytest
import torch

from fp4lib import quantize
from fp4lib.engines.gemm import gemm_operand, swizzle_scales, unswizzle_scales
from fp4lib.engines.torchao import from_torchao, to_torchao

torchao = pytest.importorskip("torchao")
from torchao.prototype.mx_formats.mx_tensor import MXTensor, to_mx  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, nvfp4_quantize  # noqa: E402
from torchao.prototype.mx_formats.utils import from_blocked, to_blocked  # noqa: E402


def tensors():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(64, 128, generator=g)
    yield torch.randn(256, 64, generator=g) * torch.rand(256, 1, generator=g).mul(12).exp2()  # rows of many scales
    yield torch.distributions.StudentT(torch.tensor(2.0)).sample((128, 96))
    yield torch.randn(32, 64, generator=g).bfloat16()


def same(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("scheme", ["mxfp4", "nvfp4"])
def test_round_trip_keeps_codes_and_scales_identical(scheme):
    for x in tensors():
        q = quantize(x, scheme, backend="reference")
        t = to_torchao(q)
        assert isinstance(t, MXTensor if scheme == "mxfp4" else NVFP4Tensor)
        assert t.shape == x.shape and t.dtype == x.dtype
        back = from_torchao(t)
        assert torch.equal(back.packed, q.packed) and same(back.scale, q.scale)
        if scheme == "nvfp4":
            assert torch.equal(back.global_scale, q.global_scale)
        assert torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("scheme", ["mxfp4", "nvfp4"])
def test_torchao_dequantizes_our_bytes_to_within_an_ulp(scheme):
    for x in tensors():
        q = quantize(x, scheme, backend="reference")
        values, tensor_scale = q.factored()  # in float32, whatever x's dtype
        ours = values if tensor_scale is None else values * tensor_scale
        theirs = to_torchao(q).dequantize(torch.float32)
        ulp = torch.finfo(torch.float32).eps * ours.abs()
        assert torch.all((theirs - ours).abs() <= ulp), (scheme, float((theirs - ours).abs().max()))


def test_our_mxfp4_is_torchao_to_mx_with_the_ocp_floor_rule_bit_for_bit():
    for x in tensors():
        q = quantize(x, "mxfp4", backend="reference")
        scale, data = to_mx(x, torch.float4_e2m1fn_x2, 32)
        assert torch.equal(data, q.packed) and same(scale, q.scale)


def test_nvfp4_agrees_with_torchao_on_most_blocks_and_the_handover_keeps_ours():
    agree = total = 0
    for x in tensors():
        x = x.float()
        q = quantize(x, "nvfp4", backend="reference")
        amax = x.abs().max()
        scale, data = nvfp4_quantize(x, 16, per_tensor_scale=amax / (6 * 448))
        blocks_ours = q.packed.view(-1, 8)
        blocks_theirs = data.view(-1, 8)
        s_ours, s_theirs = q.scale.view(torch.uint8).reshape(-1), scale.view(torch.uint8).reshape(-1)
        same_block = (blocks_ours == blocks_theirs).all(-1) & (s_ours == s_theirs)
        agree += int(same_block.sum())
        total += same_block.numel()
        assert torch.equal(to_torchao(q).qdata, q.packed)  # the handover never re-quantizes
    assert agree / total > 0.95


def test_swizzled_scales_match_torchao_and_invert():
    for rows, cols in ((128, 4), (200, 12), (64, 8), (257, 5)):
        s = torch.randint(0, 255, (rows, cols), dtype=torch.uint8).view(torch.float8_e8m0fnu)
        sw = swizzle_scales(s)
        assert same(sw, to_blocked(s).reshape(-1))
        assert same(unswizzle_scales(sw, rows, cols), s)
        assert same(from_blocked(sw, rows, cols), s)


def test_gemm_operand_views_the_codes_as_float4_pairs():
    q = quantize(torch.randn(128, 64), "nvfp4", backend="reference")
    codes, scales = gemm_operand(q)
    assert codes.dtype == torch.float4_e2m1fn_x2 and codes.shape == (128, 32)
    assert same(scales, to_blocked(q.scale).reshape(-1))


def test_handover_errors_name_the_problem():
    with pytest.raises(ValueError, match="tiles"):
        to_torchao(quantize(torch.randn(32, 32), "nvfp4", tile=True))
    with pytest.raises(ValueError, match="no counterpart"):
        to_torchao(quantize(torch.randn(64), "nf4"))
    with pytest.raises(ValueError, match="at least 2-D"):
        to_torchao(quantize(torch.randn(64), "mxfp4"))
    with pytest.raises(TypeError, match="MXTensor or NVFP4Tensor"):
        from_torchao(torch.randn(4))


def test_engine_switch_table_names_our_recipes_and_torchaos_real_names():
    import importlib

    from fp4lib.engines.torchao import ENGINE_SWITCHES, TORCHAO_NAMES
    from fp4lib.training.recipes import RECIPES, get_recipe

    assert set(ENGINE_SWITCHES) <= set(RECIPES)
    assert {"bf16", "fp8", "nvfp4", "mxfp4"} <= set(ENGINE_SWITCHES)
    objects = {name: getattr(importlib.import_module(module), name) for name, module in TORCHAO_NAMES.items()}
    for recipe, (_, ao, _) in ENGINE_SWITCHES.items():
        for name in objects:
            if name in ao:
                assert ao.count(name) == 1
    # The FP8 row: torchao's tensorwise recipe casts like ours (E4M3 forward operands, E5M2 gradients).
    config = objects["Float8LinearConfig"].from_recipe_name("tensorwise")
    assert config.cast_config_input.target_dtype == torch.float8_e4m3fn
    assert config.cast_config_weight.target_dtype == torch.float8_e4m3fn
    assert config.cast_config_grad_output.target_dtype == torch.float8_e5m2
    assert get_recipe("fp8").linear.dgrad_dy.scheme == "fp8_e5m2"
    # The MXFP4 row: to_mx with the FLOOR rule is fp4lib's MXFP4, bit for bit.
    x = torch.randn(16, 64)
    scale, data = objects["to_mx"](x, torch.float4_e2m1fn_x2, 32, objects["ScaleCalculationMode"].FLOOR)
    assert torch.equal(data.view(torch.uint8), quantize(x, "mxfp4", backend="reference").packed)
    # The Megatron rows keep the last block in BF16 exactly where our recipe does.
    assert get_recipe("nvfp4").hp_last_blocks == 1 and get_recipe("nvfp4").hp_first_blocks == 0
    assert "--num-layers-at-end-in-bf16 1" in ENGINE_SWITCHES["nvfp4"][2]
    assert get_recipe("nvfp4_all_fp4").hp_last_blocks == 0 and "bf16" not in ENGINE_SWITCHES["nvfp4_all_fp4"][2]
