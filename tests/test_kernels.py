"""The fused quantize path must equal the plain-PyTorch reference bit for bit."""

import pytest
import torch

from fp4lib import quantize
from fp4lib.kernels import compile_available, quantize_fast

SHAPES = [(4096,), (64, 48), (7, 13), (3, 1000), (1,), (130,)]


@pytest.mark.parametrize("scheme", ["bnb_fp4", "nf4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_eager_formulation_matches_reference(scheme, shape, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    x.view(-1)[0] = 0.0  # exact zeros take the tie-to-lower path
    fast = quantize_fast(x, scheme, compile=False)
    ref = quantize(x, scheme)
    assert torch.equal(fast.packed, ref.packed)
    assert torch.equal(fast.scale, ref.scale)
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    assert torch.equal(fast.dequantize(), ref.dequantize())


def test_zero_blocks_and_exact_midpoints_match_reference():
    from fp4lib import BNB_FP4

    mids = BNB_FP4._midpoints
    block = torch.cat([torch.tensor([1.0]), mids, torch.nextafter(mids, torch.tensor(2.0))])
    x = torch.cat([block, torch.zeros(64 - block.numel()), torch.zeros(64)])
    for scheme in ("bnb_fp4", "nf4"):
        assert torch.equal(quantize_fast(x, scheme, compile=False).packed, quantize(x, scheme).packed)


@pytest.mark.skipif(not compile_available(), reason="torch.compile needs a working C++ compiler")
def test_compiled_path_matches_reference():
    torch.manual_seed(1)
    for scheme in ("bnb_fp4", "nf4"):
        for shape in [(256, 256), (1000, 3)]:
            x = torch.randn(shape) * torch.rand(shape) * 10
            fast, ref = quantize_fast(x, scheme), quantize(x, scheme)
            assert torch.equal(fast.packed, ref.packed)
            assert torch.equal(fast.scale, ref.scale)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", [3, 4100])  # a full block, and the partial last block
def test_nonfinite_raises_like_reference(bad, where):
    x = torch.randn(4130)
    x[where] = bad
    with pytest.raises(ValueError, match=rf"non-finite .* index \({where},\)"):
        quantize_fast(x, "nf4", compile=False)


def test_other_schemes_fall_back_to_reference():
    x = torch.randn(4, 64)
    assert torch.equal(quantize_fast(x, "nvfp4").packed, quantize(x, "nvfp4").packed)
    with pytest.raises(ValueError, match="block_size"):
        quantize_fast(x, "nf4", block_size=100)
