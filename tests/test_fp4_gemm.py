"""Block-scaled FP4 GEMMs (fp4lib.engines.gemm.block_scaled_matmul, fp4_gemm): the emulation's
per-block arithmetic, its agreement with dequantize-then-matmul, and the real GEMM against
the emulation where a GPU has one."""

import pytest
import torch

from fp4lib import quantize
from fp4lib.engines.gemm import block_scaled_matmul, fp4_gemm, fp4_gemm_available, gemm_operand, swizzle_scales

SCHEMES = ["mxfp4", "nvfp4"]


def inputs(m=48, n=32, k=256, seed=0, heavy=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    if heavy:  # rows and blocks whose scales span many binades
        x = x * torch.rand(m, k // 32, generator=g).mul(16).exp2().repeat_interleave(32, 1)
    return x, w


def operands(scheme, m=48, n=32, k=256, seed=0, heavy=False, tile=False):
    x, w = inputs(m, n, k, seed, heavy)
    kw = {"tile": True} if tile else {}
    return quantize(x, scheme, backend="reference"), quantize(w, scheme, backend="reference", **kw)


def exact(a, b):
    """a @ b.T in float64 from the factored operands: the block-scaled values' products and
    sums are exact there; NVFP4's output scale is the float32 product of the two tensor
    scales, as the GEMM's alpha."""
    (va, sa), (vb, sb) = a.factored(), b.factored()
    out = va.double() @ vb.double().T
    return out if sa is None else out * (sa * sb).double()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_one_block_is_exact_up_to_the_final_rounding(scheme):
    k = 32 if scheme == "mxfp4" else 16
    a, b = operands(scheme, k=k)
    assert torch.equal(block_scaled_matmul(a, b), exact(a, b).float())


@pytest.mark.parametrize("heavy", [False, True], ids=["gaussian", "many-binades"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_matches_the_exact_product_to_float32_accumulation(scheme, heavy):
    a, b = operands(scheme, heavy=heavy)
    y, ref = block_scaled_matmul(a, b), exact(a, b)
    # one float32 rounding per block added: error at most blocks * 2^-24 of the running sums' size
    blocks = a.shape[1] // a.block_size
    bound = blocks * 2.0**-24 * (a.dequantize().double().abs() @ b.dequantize().double().abs().T)
    assert y.dtype == torch.float32 and y.shape == (48, 32)
    assert ((y.double() - ref).abs() <= bound + 1e-30).all()
    assert not torch.equal(y.double(), ref) or not heavy  # accumulation does round somewhere on wide ranges


def test_nvfp4_weight_tiles_enter_the_gemm_as_repeated_row_scales():
    a, w = operands("nvfp4", tile=True)
    assert w.tile and w.scale.shape == (2, 16)
    y = block_scaled_matmul(a, w)
    assert torch.allclose(y.double(), exact(a, w), rtol=1e-5, atol=1e-5)
    codes, scales = gemm_operand(w)
    assert codes.shape == (32, 128) and torch.equal(scales.view(torch.uint8),
                                                    swizzle_scales(w.scale.repeat_interleave(16, 0)).view(torch.uint8))


def test_bad_operands_are_named():
    a, b = operands("nvfp4")
    with pytest.raises(ValueError, match="same scheme"):
        block_scaled_matmul(a, operands("mxfp4")[1])
    with pytest.raises(ValueError, match="same K"):
        block_scaled_matmul(a, quantize(torch.randn(8, 128), "nvfp4"))
    with pytest.raises(ValueError, match="2-D MXFP4 or NVFP4"):
        block_scaled_matmul(quantize(torch.randn(8, 64), "nf4"), quantize(torch.randn(8, 64), "nf4"))
    with pytest.raises(ValueError, match="2-D MXFP4 or NVFP4"):
        gemm_operand(quantize(torch.randn(2, 8, 64), "nvfp4"))
    with pytest.raises(RuntimeError, match="CUDA device"):
        fp4_gemm(a, b)


def test_nvfp4_is_not_idempotent_on_many_binades():
    """Why the GPU test below quantizes the same inputs on both devices: re-quantizing a
    dequantized NVFP4 tensor need not give its bytes back (its amax, hence the per-tensor
    scale, changes, and with it block scales near E4M3's rounding boundaries)."""
    a, _ = operands("nvfp4", m=256, n=128, k=512, heavy=True)
    again = quantize(a.dequantize(), "nvfp4", backend="reference")
    assert not (torch.equal(again.packed, a.packed) and torch.equal(again.scale.view(torch.uint8),
                                                                    a.scale.view(torch.uint8)))


@pytest.mark.cuda
@pytest.mark.skipif(not fp4_gemm_available(), reason="needs a GPU with block-scaled FP4 GEMMs (compute capability 10.x or 12.x)")
@pytest.mark.parametrize("heavy", [False, True], ids=["gaussian", "many-binades"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_gpu_gemm_agrees_with_the_emulation(scheme, heavy):
    x, w = inputs(m=256, n=128, k=512, heavy=heavy)
    a, b = quantize(x, scheme, backend="reference"), quantize(w, scheme, backend="reference")
    y_cpu = block_scaled_matmul(a, b)
    for backend in ("reference", "auto"):  # the same inputs quantized on the GPU: the same bytes
        a_gpu = quantize(x.cuda(), scheme, backend=backend)
        b_gpu = quantize(w.cuda(), scheme, backend=backend)
        for q, q_gpu in ((a, a_gpu), (b, b_gpu)):
            assert torch.equal(q_gpu.packed.cpu(), q.packed)
            assert torch.equal(q_gpu.scale.cpu().view(torch.uint8), q.scale.view(torch.uint8))
            if q.global_scale is not None:
                assert torch.equal(q_gpu.global_scale.cpu(), q.global_scale)
    y = fp4_gemm(a_gpu, b_gpu).cpu().float()
    blocks = a.shape[1] // a.block_size
    bound = blocks * 2.0**-24 * (a.dequantize().abs() @ b.dequantize().abs().T)
    # bf16 output: up to two roundings to bfloat16 (the GEMM's, and NVFP4's after its scale)
    assert ((y - y_cpu).abs() <= 2 * bound + 2.0**-7 * y_cpu.abs() + 1e-30).all()
