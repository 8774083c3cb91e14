"""Why naive FP4 training fails: gradient underflow under one scale per tensor.

Chapter 5 of the book captures the output gradient ``dY`` of a layer (e.g. the
attention output projection) and asks what fraction of its nonzero entries round
to zero when quantized. A gradient tensor has a few large entries and many small
ones (amax/rms of 30 or more): with one scale per tensor, fitted to the largest
entry, most entries fall below E2M1's smallest step (0.5 of 6, i.e. amax/12 after
scaling) and vanish; with one scale per block of 16 or 32 only the entries that
are small relative to their own block do.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn

from ..numerics.constants import FP4_BITS
from ..numerics.schemes import SCHEME_INFO
from .operands import fake_quantize_operand
from .layers import FP4Linear
from .specs import QuantSpec
from .loop import default_loss

__all__ = ["UNDERFLOW_SCHEMES", "underflow_fraction", "amax_over_rms", "capture_grad_output", "underflow_report",
           "underflow_capture_hook"]

UNDERFLOW_SCHEMES = tuple(s.name for s in SCHEME_INFO.values() if s.operand and s.element_bits == FP4_BITS)
"""The 4-bit operand schemes, whose round-to-nearest can send a small gradient to 0."""


def underflow_fraction(x: torch.Tensor, scheme: str, axis: int = 1) -> float:
    """Fraction of the nonzero entries of ``x`` that round-to-nearest quantization sends to 0.

    Parameters
    ----------
    x:
        float32 2-D tensor ``(rows, cols)``, e.g. a captured gradient ``(tokens, features)``.
    scheme:
        ``"e2m1_per_tensor"`` (one absmax scale), ``"mxfp4"`` (blocks of 32) or
        ``"nvfp4"`` (blocks of 16).
    axis:
        The axis the blocks run along: 1 for dY in the Dgrad GEMM (features), 0
        in the Wgrad GEMM (tokens). Ignored for the per-tensor scheme.

    Examples
    --------
    >>> import torch
    >>> x = torch.ones(16, 16)
    >>> x[0, 0] = 100.0  # one outlier: everything else is below amax / 12
    >>> underflow_fraction(x, "e2m1_per_tensor"), underflow_fraction(x, "nvfp4")
    (0.99609375, 0.05859375)
    """
    if scheme not in UNDERFLOW_SCHEMES:
        raise ValueError(f"scheme must be one of {UNDERFLOW_SCHEMES}, got {scheme!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, cols), got shape {tuple(x.shape)}")
    x = x.float()
    nonzero = x != 0
    n = int(nonzero.sum())
    if n == 0:
        return 0.0
    xq = fake_quantize_operand(x, QuantSpec(scheme), axis=axis, backend="reference")
    return int(((xq == 0) & nonzero).sum()) / n


def amax_over_rms(x: torch.Tensor) -> float:
    """``max |x| / sqrt(mean(x^2))`` of a tensor: how peaked it is (1 for a constant).

    Examples
    --------
    >>> import torch
    >>> amax_over_rms(torch.ones(10))
    1.0
    """
    x = x.float()
    rms = float(x.pow(2).mean().sqrt())
    return float(x.abs().max()) / rms if rms > 0 else 0.0


def capture_grad_output(model: nn.Module, module_name: str, batch: Tuple[torch.Tensor, ...],
                        loss_fn: Callable = default_loss) -> torch.Tensor:
    """The gradient of the loss with respect to a module's output, for one batch.

    Runs one forward and backward pass of ``model`` on ``batch`` with a backward
    hook on ``model.get_submodule(module_name)``, then clears the parameter
    gradients and restores the FP4 layers' rounding counters, so that training
    is unaffected. Returns float32 ``(N, out_features)``, N the number of tokens.
    """
    module = model.get_submodule(module_name)
    store: Dict[str, torch.Tensor] = {}
    counters = {m: m.calls for m in model.modules() if isinstance(m, FP4Linear)}

    def hook(mod, grad_input, grad_output):
        store["dy"] = grad_output[0].detach().float().reshape(-1, grad_output[0].shape[-1]).clone()

    handle = module.register_full_backward_hook(hook)
    try:
        loss = loss_fn(model, batch)
        loss.backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        for m, c in counters.items():
            m.calls = c
    if "dy" not in store:
        raise ValueError(f"module {module_name!r} received no gradient (is it used in the loss?)")
    return store["dy"]


def underflow_report(dy: torch.Tensor) -> Dict[str, float]:
    """Underflow fractions of a captured gradient under each scheme and block axis, plus amax/rms.

    Keys: ``amax_over_rms``, ``e2m1_per_tensor``, ``nvfp4_dgrad`` / ``mxfp4_dgrad``
    (blocks along features, axis 1) and ``nvfp4_wgrad`` / ``mxfp4_wgrad`` (blocks
    along tokens, axis 0).
    """
    return {
        "amax_over_rms": amax_over_rms(dy),
        "e2m1_per_tensor": underflow_fraction(dy, "e2m1_per_tensor"),
        "nvfp4_dgrad": underflow_fraction(dy, "nvfp4", axis=1),
        "nvfp4_wgrad": underflow_fraction(dy, "nvfp4", axis=0),
        "mxfp4_dgrad": underflow_fraction(dy, "mxfp4", axis=1),
        "mxfp4_wgrad": underflow_fraction(dy, "mxfp4", axis=0),
    }


def underflow_capture_hook(steps: Tuple[int, ...], store: Dict[str, dict], batch: Tuple[torch.Tensor, ...],
                           n_layer: int, module_pattern: str = "transformer.h.{block}.attn.c_proj") -> Callable:
    """A :class:`~fp4lib.training.loop.Trainer` hook recording :func:`underflow_report` of a gradient.

    Before each step in ``steps`` (1-based) it captures, on the fixed ``batch``, the
    output gradient of ``module_pattern.format(block=b)`` for every block ``b`` in
    ``range(n_layer)`` and stores ``store[str(step)][module name] = report``.
    Training is unaffected (see :func:`capture_grad_output`).
    """

    def hook(trainer, step):
        if step not in steps:
            return
        rec = {}
        for b in range(n_layer):
            name = module_pattern.format(block=b)
            dy = capture_grad_output(trainer.model, name, tuple(t.to(trainer.device) for t in batch))
            rec[name] = underflow_report(dy.cpu())
        store[str(step)] = rec

    return hook
