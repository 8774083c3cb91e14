"""Orthonormal block Hadamard transforms with optional random signs."""

from __future__ import annotations

import math

import pytest
import torch

from fp4lib.numerics.hadamard import block_hadamard, hadamard_matrix, inverse_block_hadamard, random_signs

SIZES = [16, 32, 64, 128]


def sylvester_by_kron(n: int) -> torch.Tensor:
    """Unnormalised Sylvester Hadamard matrix, built independently with kron."""
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


@pytest.mark.parametrize("b", SIZES)
def test_hadamard_matrix_is_orthonormal_and_sylvester(b):
    h = hadamard_matrix(b)
    assert h.shape == (b, b) and h.dtype == torch.float32
    assert torch.allclose(h @ h.T, torch.eye(b), atol=1e-6)
    assert torch.allclose(h.T @ h, torch.eye(b), atol=1e-6)
    assert torch.equal(h, h.T)
    assert torch.equal(torch.sign(h).double(), sylvester_by_kron(b))
    assert torch.allclose(h.abs(), torch.full((b, b), 1 / math.sqrt(b)), rtol=1e-7, atol=0)
    assert hadamard_matrix(b, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("with_signs", [False, True], ids=["plain", "signs"])
def test_inverse_undoes_the_transform(b, with_signs):
    x = torch.randn(3, 5, 2 * b)
    signs = random_signs(b, torch.Generator().manual_seed(b)) if with_signs else None
    y = block_hadamard(x, b, signs)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.allclose(y, x, atol=1e-3)
    assert torch.allclose(inverse_block_hadamard(y, b, signs), x, atol=1e-6)
    # orthogonal: every block keeps its norm
    norms = lambda t: t.reshape(3, 5, 2, b).norm(dim=-1)  # noqa: E731
    assert torch.allclose(norms(y), norms(x), rtol=1e-5)


@pytest.mark.parametrize("b", SIZES)
def test_transform_is_diag_signs_times_h_per_block(b):
    x = torch.randn(4, 3 * b, dtype=torch.float64)
    s = random_signs(b, torch.Generator().manual_seed(1)).double()
    m = torch.diag(s) @ sylvester_by_kron(b) / math.sqrt(b)
    ref = torch.cat([x[:, i * b : (i + 1) * b] @ m for i in range(3)], dim=1)
    assert torch.allclose(block_hadamard(x, b, s), ref, atol=1e-12)
    plain = torch.cat([x[:, i * b : (i + 1) * b] @ (sylvester_by_kron(b) / math.sqrt(b)) for i in range(3)], 1)
    assert torch.allclose(block_hadamard(x, b), plain, atol=1e-12)


def test_signs_matter_and_wrong_signs_do_not_invert():
    x = torch.randn(2, 64)
    s1 = random_signs(32, torch.Generator().manual_seed(1))
    s2 = random_signs(32, torch.Generator().manual_seed(2))
    assert not torch.equal(s1, s2)
    y = block_hadamard(x, 32, s1)
    assert not torch.allclose(y, block_hadamard(x, 32), atol=1e-3)
    assert not torch.allclose(inverse_block_hadamard(y, 32, s2), x, atol=1e-3)


@pytest.mark.parametrize("b", SIZES)
def test_random_signs_are_plus_minus_one_and_reproducible(b):
    a = random_signs(b, torch.Generator().manual_seed(123))
    c = random_signs(b, torch.Generator().manual_seed(123))
    d = random_signs(b, torch.Generator().manual_seed(124))
    assert a.shape == (b,) and a.dtype == torch.float32
    assert torch.equal(a.abs(), torch.ones(b))
    assert torch.equal(a, c)
    assert not torch.equal(a, d)
    assert 0 < int((a > 0).sum()) < b  # both signs occur


@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("with_signs", [False, True], ids=["plain", "signs"])
def test_an_outlier_is_spread_evenly_over_its_block(b, with_signs):
    x = torch.zeros(2 * b)
    x[b + 5] = 12.0  # an outlier in the second block
    signs = random_signs(b, torch.Generator().manual_seed(0)) if with_signs else None
    y = block_hadamard(x, b, signs)
    assert torch.all(y[:b] == 0)  # the other block is untouched
    assert torch.allclose(y[b:].abs(), torch.full((b,), 12.0 / math.sqrt(b)), rtol=1e-6)
    assert y.abs().max().item() == pytest.approx(12.0 / math.sqrt(b), rel=1e-6)


def test_dtype_is_kept():
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert block_hadamard(x, 16).dtype == torch.bfloat16
    assert inverse_block_hadamard(x, 32).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [8, 48, 256, 0, 17])
def test_invalid_block_sizes_raise(bad):
    for call in (
        lambda: hadamard_matrix(bad),
        lambda: random_signs(bad),
        lambda: block_hadamard(torch.randn(512), bad),
        lambda: inverse_block_hadamard(torch.randn(512), bad),
    ):
        with pytest.raises(ValueError, match=r"block_size.*16, 32, 64, 128"):
            call()


@pytest.mark.parametrize("shape", [(20,), (3, 24), (2, 16, 8), ()])
def test_last_axis_not_a_multiple_of_the_block_raises(shape):
    with pytest.raises(ValueError, match=r"multiple of block_size=16"):
        block_hadamard(torch.randn(shape), 16)
    with pytest.raises(ValueError, match=r"multiple of block_size=16"):
        inverse_block_hadamard(torch.randn(shape), 16)


def test_signs_of_the_wrong_shape_raise():
    with pytest.raises(ValueError, match=r"signs must have shape \(16,\)"):
        block_hadamard(torch.randn(32), 16, torch.ones(32))
    with pytest.raises(ValueError, match=r"signs must have shape \(32,\)"):
        inverse_block_hadamard(torch.randn(32), 32, torch.ones(2, 16))


def test_non_float_tensor_raises_type_error():
    with pytest.raises(TypeError, match="floating-point"):
        block_hadamard(torch.ones(16, dtype=torch.int64), 16)
    with pytest.raises(TypeError, match="floating-point"):
        inverse_block_hadamard(torch.ones(16, dtype=torch.int32), 16)


@pytest.mark.parametrize("fn", [block_hadamard, inverse_block_hadamard], ids=["forward", "inverse"])
def test_non_tensor_raises_type_error(fn):
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn([0.0] * 16, 16)
