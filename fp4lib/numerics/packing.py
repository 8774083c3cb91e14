"""Two 4-bit codes per byte, in either nibble order.

* ``"high_first"`` (bitsandbytes): element ``2i`` in the high nibble (bits 7..4),
  element ``2i+1`` in the low nibble (bits 3..0).
* ``"low_first"`` (OCP / PyTorch ``float4_e2m1fn_x2``, torchao MX): element ``2i``
  in the low nibble, element ``2i+1`` in the high nibble.

Bit 0 is the least significant bit. Chapter 2 of the book shows both layouts.
"""

from __future__ import annotations

import torch

__all__ = ["NIBBLE_ORDERS", "pack_nibbles", "unpack_nibbles"]

NIBBLE_ORDERS = ("high_first", "low_first")


def _check_order(order: str) -> None:
    if order not in NIBBLE_ORDERS:
        raise ValueError(f"order must be one of {NIBBLE_ORDERS}, got {order!r}")


def pack_nibbles(codes: torch.Tensor, order: str = "high_first") -> torch.Tensor:
    """Pack uint8 codes (0..15) along the last axis, two per byte.

    An odd last axis is padded with one zero code. Returns uint8 of shape
    ``(*codes.shape[:-1], ceil(codes.shape[-1] / 2))``.

    Examples
    --------
    >>> import torch
    >>> c = torch.tensor([0x1, 0x2, 0x3], dtype=torch.uint8)
    >>> [hex(b) for b in pack_nibbles(c, "high_first").tolist()]
    ['0x12', '0x30']
    >>> [hex(b) for b in pack_nibbles(c, "low_first").tolist()]
    ['0x21', '0x3']
    """
    _check_order(order)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"codes must lie in 0..15 (4 bits), got a maximum of {int(codes.max())}")
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    even = codes[..., 0::2]
    odd = codes[..., 1::2]
    if order == "high_first":
        return (even << 4) | odd
    return (odd << 4) | even


def unpack_nibbles(packed: torch.Tensor, n: int, order: str = "high_first") -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``n`` codes along the last axis.

    Examples
    --------
    >>> import torch
    >>> unpack_nibbles(torch.tensor([0x12, 0x30], dtype=torch.uint8), 3).tolist()
    [1, 2, 3]
    """
    _check_order(order)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if not 0 <= n <= 2 * packed.shape[-1]:
        raise ValueError(f"n={n} does not fit in {packed.shape[-1]} bytes (at most {2 * packed.shape[-1]} codes)")
    hi = packed >> 4
    lo = packed & 0x0F
    first, second = (hi, lo) if order == "high_first" else (lo, hi)
    out = torch.stack((first, second), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return out[..., :n]
