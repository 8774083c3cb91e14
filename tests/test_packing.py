"""Two 4-bit codes per byte: bitsandbytes' high-nibble-first and OCP's low-nibble-first."""

from __future__ import annotations

import pytest
import torch

from fp4lib import pack_nibbles, quantize, unpack_nibbles


def u8(values):
    return torch.tensor(values, dtype=torch.uint8)


@pytest.mark.parametrize(
    "codes,high_first,low_first",
    [
        ([0x1, 0x2], [0x12], [0x21]),
        ([0xA, 0x5, 0xF, 0x0], [0xA5, 0xF0], [0x5A, 0x0F]),
        ([0x1, 0x2, 0x3], [0x12, 0x30], [0x21, 0x03]),  # odd: padded with a zero code
        ([0xF], [0xF0], [0x0F]),
        ([0x0, 0x8], [0x08], [0x80]),
    ],
)
def test_nibble_order_examples(codes, high_first, low_first):
    assert pack_nibbles(u8(codes), "high_first").tolist() == high_first
    assert pack_nibbles(u8(codes), "low_first").tolist() == low_first
    assert unpack_nibbles(u8(high_first), len(codes), "high_first").tolist() == codes
    assert unpack_nibbles(u8(low_first), len(codes), "low_first").tolist() == codes


def test_default_order_is_bitsandbytes_high_first():
    assert pack_nibbles(u8([1, 2])).tolist() == [0x12]
    assert unpack_nibbles(u8([0x12]), 2).tolist() == [1, 2]


def test_packing_runs_along_the_last_axis():
    codes = torch.arange(2 * 3 * 5, dtype=torch.uint8).reshape(2, 3, 5) % 16
    p = pack_nibbles(codes, "low_first")
    assert p.shape == (2, 3, 3)
    c = codes[1, 2].tolist()
    assert p[1, 2].tolist() == [c[1] << 4 | c[0], c[3] << 4 | c[2], c[4]]  # last byte: pad nibble 0 on top
    assert torch.equal(unpack_nibbles(p, 5, "low_first"), codes)


def test_odd_lengths_and_partial_unpacking():
    codes = u8([3, 14, 7, 9, 1])
    p = pack_nibbles(codes, "high_first")
    assert p.tolist() == [0x3E, 0x79, 0x10]
    assert unpack_nibbles(p, 6).tolist() == [3, 14, 7, 9, 1, 0]  # the pad nibble
    assert unpack_nibbles(p, 3).tolist() == [3, 14, 7]
    assert unpack_nibbles(p, 0).tolist() == []


def test_unpack_rejects_n_that_does_not_fit():
    with pytest.raises(ValueError, match="n=7"):
        unpack_nibbles(u8([1, 2, 3]), 7)
    with pytest.raises(ValueError, match="n=-1"):
        unpack_nibbles(u8([1, 2, 3]), -1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.int32, torch.float32])
def test_bad_dtype_raises_type_error(dtype):
    with pytest.raises(TypeError, match="uint8"):
        pack_nibbles(torch.tensor([1, 2]).to(dtype))
    with pytest.raises(TypeError, match="uint8"):
        unpack_nibbles(torch.tensor([1, 2]).to(dtype), 2)


@pytest.mark.parametrize("order", ["high", "LOW_FIRST", "big_endian", None])
def test_bad_order_raises_value_error_listing_the_orders(order):
    with pytest.raises(ValueError, match=r"order.*high_first.*low_first"):
        pack_nibbles(u8([1, 2]), order)
    with pytest.raises(ValueError, match=r"order.*high_first.*low_first"):
        unpack_nibbles(u8([1]), 2, order)


def test_zero_dim_codes_raise():
    with pytest.raises(ValueError, match="at least one dimension"):
        pack_nibbles(torch.tensor(3, dtype=torch.uint8))


@pytest.mark.parametrize("order", ["high_first", "low_first"])
def test_codes_above_15_raise_instead_of_corrupting_the_neighbour(order):
    with pytest.raises(ValueError, match="0..15"):
        pack_nibbles(u8([1, 0x12]), order)


def test_schemes_use_their_ecosystems_nibble_order():
    # element 0 -> code 15 (NF4 1.0, bnb fp4 -1.0 is 11) / 7 (E2M1 6.0);
    # element 1 -> code 0 (NF4 -1.0) / 2 (E2M1 1.0)
    nf4 = quantize(torch.tensor([1.0, -1.0]), "nf4")
    assert nf4.nibble_order == "high_first" and nf4.packed.reshape(-1).tolist() == [0xF0]
    fp4 = quantize(torch.tensor([-1.0, 1.0]), "bnb_fp4")
    assert fp4.nibble_order == "high_first" and fp4.packed.reshape(-1).tolist() == [0xB3]
    row = torch.tensor([[6.0, 1.0] + [0.0] * 30])
    for scheme in ("mxfp4", "nvfp4"):
        q = quantize(row, scheme)
        assert q.nibble_order == "low_first"
        assert q.packed[0, 0].item() == 0x27, scheme
