"""The fake quantization of GEMM operands in training, and the scaled GEMM that consumes it.

One operand, one call: :func:`fake_quantize_operand` with ``factored=True`` returns
``(values, tensor_scale)``, the block-scaled E2M1 values (exact in bfloat16) and the
FP32 per-tensor scale that the GEMM applies to its output (:func:`scaled_gemm`).
Three interchangeable backends (:class:`~fp4lib.numerics.schemes.Backend`) compute
it, with identical bits:

* ``"reference"`` -- :func:`reference_operand`, a thin call of
  :func:`fp4lib.fake_quantize` (the one reference of the scale arithmetic) with the
  stochastic-rounding draws of :func:`fp4lib.numerics.rounding.cheap_uniform`;
* ``"fused"`` -- :func:`fp4lib.numerics.kernels.fake_quantize_fused`, the same as one fused
  formulation run eagerly;
* ``"compiled"`` -- that formulation under ``torch.compile``, each specialization
  checked against the fused one on its first call.

``"auto"`` means compiled where ``torch.compile`` works, else fused. Seeds for the
rounding draws and the random Hadamard signs derive from per-layer, per-step and
per-operand integers through :func:`mix_seed`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from ..numerics.hadamard import hadamard_along, hadamard_signs
from ..numerics.compiling import compile_works
from ..numerics.kernels import fake_quantize_compiled, fake_quantize_fused
from ..numerics.quantize import fake_quantize
from ..numerics.rounding import cheap_uniform, seed_term
from ..numerics.schemes import Backend, check_backend, scheme_info
from .specs import QuantSpec

__all__ = ["mix_seed", "tensor_amax_reduction", "reference_operand", "concrete_backend", "fake_quantize_operand",
           "fake_quantize_gemm_pair", "operand_factored", "scaled_gemm"]

_MASK64 = (1 << 64) - 1
_SEED_BITS = 31

Factored = Tuple[torch.Tensor, Optional[torch.Tensor]]

_AMAX_REDUCERS: List[Callable[[torch.Tensor], torch.Tensor]] = []


@contextlib.contextmanager
def tensor_amax_reduction(reduce: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, every operand with a per-tensor scale (a scheme whose record has
    ``tensor_scale``) takes that scale from ``reduce(amax)`` instead of its own amax.

    Under data parallelism ``reduce`` is an all-reduce of the maximum over the
    ranks (as Transformer Engine's amax reduction group), so that all ranks
    quantize an operand with one per-tensor scale. Forward and backward must both
    run inside the block, in the same order on every rank.
    """
    _AMAX_REDUCERS.append(reduce)
    try:
        yield
    finally:
        _AMAX_REDUCERS.pop()


def _group_amax(x: torch.Tensor, spec: QuantSpec) -> Optional[torch.Tensor]:
    if not _AMAX_REDUCERS or not scheme_info(spec.scheme).tensor_scale:
        return None
    return _AMAX_REDUCERS[-1](x.detach().abs().amax().float())


def mix_seed(*values: int) -> int:
    """Hash integers into one seed in [0, 2**31) (SplitMix64 finaliser, chained).

    Used to derive per-layer, per-step and per-operand seeds that do not collide.

    Examples
    --------
    >>> mix_seed(0, 1) == mix_seed(0, 1), mix_seed(0, 1) == mix_seed(1, 0)
    (True, False)
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> (64 - _SEED_BITS)


def reference_operand(x: torch.Tensor, spec: QuantSpec, axis: int, seed: int = 0,
                      tensor_amax: Optional[torch.Tensor] = None) -> Factored:
    """The slow, obviously-correct fake quantization of one 2-D GEMM operand, factored.

    ``x``: float32 ``(rows, cols)``; ``axis``: 0 or 1, the axis the blocks run
    along (ignored for per-tensor and tiles); ``seed``: stochastic rounding draws
    ``cheap_uniform((rows, cols), seed)[i, j]`` for element ``(i, j)``;
    ``tensor_amax``: a group's amax for the per-tensor scale. The Hadamard
    transform is applied by the caller.

    Returns ``(values, tensor_scale)`` as :func:`fp4lib.fake_quantize` with
    ``factored=True`` gives them (``(x, None)`` for ``scheme="none"``). A NaN or
    +-Inf anywhere gives all-NaN values.

    Examples
    --------
    >>> import torch
    >>> values, scale = reference_operand(torch.tensor([[0.3, -1.0, 2.9, 6.0] * 4]), QuantSpec("e2m1_per_tensor"),
    ...                                   axis=1)
    >>> values[0, :4].tolist(), scale.item()
    ([0.5, -1.0, 3.0, 6.0], 1.0)
    """
    if not spec.enabled:
        return x, None
    if not bool(torch.isfinite(x).all()):
        return torch.full_like(x, float("nan")), None
    kwargs = {"tile": True} if spec.tile else {"axis": axis}
    if spec.scale_rule is not None:
        kwargs["scale_rule"] = spec.scale_rule
    if tensor_amax is not None:
        kwargs["tensor_amax"] = tensor_amax
    if spec.rounding == "stochastic":
        kwargs.update(rounding="stochastic", uniforms=cheap_uniform(x.shape, seed, device=x.device))
    return fake_quantize(x, spec.scheme, factored=True, backend="reference", **kwargs)


def concrete_backend(backend: str) -> Backend:
    """The backend that runs: ``"auto"`` -> ``"compiled"`` where ``torch.compile`` works, else ``"fused"``."""
    backend = check_backend(backend)
    if backend == Backend.AUTO:
        return Backend.COMPILED if compile_works() else Backend.FUSED
    return backend


def operand_factored(x: torch.Tensor, spec: QuantSpec, axis: int, seed: int, backend: Backend) -> Factored:
    """``(values, tensor_scale)`` of one operand on a concrete backend (see :func:`concrete_backend`),
    unchecked: the path of every GEMM operand in training. :func:`fake_quantize_operand` is the checked one."""
    if not spec.enabled:
        return x, None
    amax = _group_amax(x, spec)
    if backend == Backend.REFERENCE:
        return reference_operand(x, spec, axis, seed, amax)
    fn = fake_quantize_compiled() if backend == Backend.COMPILED else fake_quantize_fused
    seed_t = seed_term(seed, x.device)  # filled on the device: no host-to-device copy
    return fn(x.contiguous(), seed_t, spec.scheme, axis, spec.rounding, spec.tile, spec.scale_rule, amax)


def fake_quantize_operand(x: torch.Tensor, spec: QuantSpec, axis: int, seed: int = 0, backend: str = "auto", *,
                          factored: bool = False):
    """Fake-quantize one 2-D float32 GEMM operand as ``spec`` says, on the chosen backend.

    ``axis``: 0 or 1, the axis the blocks run along (the GEMM's reduction axis);
    ``seed``: the stochastic-rounding draws (see :func:`reference_operand`);
    ``backend``: a :class:`~fp4lib.numerics.schemes.Backend`; all give the bits of
    :func:`reference_operand`. Returns the dequantized operand, or with
    ``factored=True`` the GEMM's form ``(values, tensor_scale)``. The Hadamard
    transform is not applied here (see :func:`fp4lib.numerics.hadamard.hadamard_along`).

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(32, 64)
    >>> spec = QuantSpec("nvfp4", rounding="stochastic")
    >>> ref = fake_quantize_operand(x, spec, axis=0, seed=7, backend="reference")
    >>> torch.equal(fake_quantize_operand(x, spec, axis=0, seed=7, backend="fused"), ref)
    True
    """
    values, tensor_scale = operand_factored(x, spec, axis, seed, concrete_backend(backend))
    if factored:
        return values, tensor_scale
    return values if tensor_scale is None else values * tensor_scale


def fake_quantize_gemm_pair(a: torch.Tensor, b: torch.Tensor, spec_a: QuantSpec, spec_b: QuantSpec, axis_a: int,
                            axis_b: int, seeds: Tuple[int, int], hadamard_seed: int,
                            backend: Backend) -> Tuple[Factored, Factored]:
    """Both operands of one GEMM (float32 2-D, blocks along ``axis_a`` / ``axis_b``): the random
    Hadamard transform if the specs ask for one (the same signs for both, so that it
    cancels in the product), then the factored fake quantization of each on ``backend``
    (a concrete one: see :func:`concrete_backend`)."""
    if spec_a.hadamard:
        signs = hadamard_signs(spec_a.hadamard, hadamard_seed, device=a.device)
        a = hadamard_along(a, axis_a, spec_a.hadamard, signs)
        b = hadamard_along(b, axis_b, spec_a.hadamard, signs)
    return (
        operand_factored(a, spec_a, axis_a, seeds[0], backend),
        operand_factored(b, spec_b, axis_b, seeds[1], backend),
    )


def scaled_gemm(a: Tuple[torch.Tensor, Optional[torch.Tensor]], b: Tuple[torch.Tensor, Optional[torch.Tensor]],
                gemm_dtype: torch.dtype) -> torch.Tensor:
    """``(a_values @ b_values) * (a_scale * b_scale)``, as a block-scaled FP4 GEMM computes it.

    ``a``, ``b``: ``(values, tensor_scale)`` pairs of 2-D float32 operands (see
    :func:`fake_quantize_operand`); ``values`` already carry their block scales.
    The products are formed from ``values`` cast to ``gemm_dtype`` (a lossless
    cast for quantized operands, whose E2M1 x E4M3 or E2M1 x E8M0 products fit in
    bfloat16), accumulated in float32, and the per-tensor scales multiply the
    float32 result once, as the hardware's epilogue does with its ``alpha``.
    Returns float32; the caller casts to its output dtype, one rounding in all.
    """
    (av, a_scale), (bv, b_scale) = a, b
    if gemm_dtype == torch.float32:
        y = av @ bv
    else:
        av, bv = av.to(gemm_dtype), bv.to(gemm_dtype)
        if av.is_cuda:  # tensor-core products, float32 accumulation and output
            y = torch.mm(av, bv, out_dtype=torch.float32)
        else:  # the same arithmetic: the products of these values are exact in float32
            y = av.float() @ bv.float()
    alpha = None
    for s in (a_scale, b_scale):
        if s is not None:
            alpha = s if alpha is None else alpha * s
    return y if alpha is None else y * alpha
