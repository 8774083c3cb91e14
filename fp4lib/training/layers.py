"""FP4 linear layers: the three GEMMs of a linear layer with fake-quantized operands.

:class:`FP4Linear` is a drop-in ``nn.Linear`` whose Fprop, Dgrad and Wgrad GEMMs
(chapter 4 of the book; the table is in :mod:`fp4lib.training.specs`) see operands
quantized by a :class:`~fp4lib.training.specs.LinearSpec`, one
:class:`~fp4lib.training.specs.QuantSpec` per operand. Quantization is simulated: each
operand is quantized and dequantized ("fake quant", :mod:`fp4lib.training.operands`) and
the GEMM multiplies the block-scaled values in high precision, applying the
per-tensor scales to its output, as FP4 hardware does. The master weights, the
gradients handed to the optimizer and the optimizer state stay in high precision.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..numerics.constants import NVFP4_TILE
from ..numerics.schemes import Backend, check_backend, scheme_info
from .operands import concrete_backend, fake_quantize_gemm_pair, mix_seed, operand_factored, scaled_gemm
from .specs import GEMMS, ROLES, LinearSpec, QuantSpec

__all__ = ["FP4Linear", "FP4LinearFunction"]

_HADAMARD_STREAM = {"fprop": 6, "dgrad": 7, "wgrad": 8}
_EVAL_CALL = -1  # the seed stream of forward passes in eval mode


def _weight_axis_free(spec: QuantSpec) -> bool:
    """True when the quantized weight does not depend on the block axis."""
    return spec.enabled and spec.rounding == "nearest" and not spec.hadamard and (spec.tile or scheme_info(spec.scheme).family == "tensor")


def _gemm_operands(gemm: str, a: torch.Tensor, b: torch.Tensor, spec: LinearSpec, seeds: dict, had: dict,
                   backend: Backend):
    """The two operands of ``gemm`` quantized by their roles' specs, blocks along their roles' axes."""
    ra, rb = GEMMS[gemm]
    return fake_quantize_gemm_pair(a, b, getattr(spec, ra), getattr(spec, rb), ROLES[ra][1], ROLES[rb][1],
                                   (seeds[ra], seeds[rb]), had[gemm], backend)


class FP4LinearFunction(torch.autograd.Function):
    """``Y = X W^T + b`` with fake-quantized operands in all three GEMMs.

    ``forward(x, weight, bias, spec, call_seed, backend, gemm_dtype)``: ``x`` of
    shape ``(*, in_features)``, ``weight`` ``(out_features, in_features)``,
    ``bias`` ``(out_features,)`` or ``None``; ``call_seed`` an int from which every
    operand's rounding and Hadamard seeds derive. Quantization runs in float32.
    Each GEMM multiplies block-scaled values (exact in bfloat16), accumulates in
    float32 and applies the operands' per-tensor scales to its float32 output
    (:func:`scaled_gemm`), whether ``gemm_dtype`` is float32 or bfloat16 (under
    autocast): the two agree up to the final rounding to ``gemm_dtype``. The bias
    and its gradient stay in high precision. Returns ``(*, out_features)`` in
    ``gemm_dtype``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spec: LinearSpec, call_seed: int, backend: Backend, gemm_dtype):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features).float().contiguous()  # (N, in)
        w32 = weight.float()  # (out, in)
        seeds = {r: mix_seed(call_seed, ROLES[r][2]) for r in ROLES}
        had = {g: mix_seed(call_seed, s) for g, s in _HADAMARD_STREAM.items()}
        xq, wq = _gemm_operands("fprop", x2, w32, spec, seeds, had, backend)
        y = scaled_gemm(xq, (wq[0].t(), wq[1]), gemm_dtype)  # (N, out), float32
        if bias is not None:
            y = y + bias.float()
        reuse_w = spec.dgrad_w == spec.fprop_w and _weight_axis_free(spec.fprop_w) and not spec.dgrad_dy.hadamard
        ctx.save_for_backward(x2, weight, wq[0] if reuse_w else None, wq[1] if reuse_w else None)
        ctx.reuse_w = reuse_w
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.spec, ctx.seeds, ctx.had, ctx.backend, ctx.gemm_dtype = spec, seeds, had, backend, gemm_dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.to(gemm_dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, wq_values, wq_scale = ctx.saved_tensors
        spec, seeds, had, backend, dt = ctx.spec, ctx.seeds, ctx.had, ctx.backend, ctx.gemm_dtype
        dy2 = dy.reshape(-1, weight.shape[0]).float().contiguous()  # (N, out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.reuse_w and not spec.dgrad_dy.hadamard:
                dyq = operand_factored(dy2, spec.dgrad_dy, ROLES["dgrad_dy"][1], seeds["dgrad_dy"], backend)
                wq = (wq_values, wq_scale)
            else:
                dyq, wq = _gemm_operands("dgrad", dy2, weight.float(), spec, seeds, had, backend)
            dx = scaled_gemm(dyq, wq, dt).to(dt).reshape(ctx.x_shape).to(ctx.x_dtype)  # (N, in)
        if ctx.needs_input_grad[1]:
            dyq, xq = _gemm_operands("wgrad", dy2, x2, spec, seeds, had, backend)
            dw = scaled_gemm((dyq[0].t(), dyq[1]), xq, dt).to(dt).to(weight.dtype)  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


def _check_divisible(name: str, size: int, spec: QuantSpec, what: str) -> None:
    need = max(spec.block_size, NVFP4_TILE if spec.tile else 0, spec.hadamard)
    if need and size % need:
        raise ValueError(f"FP4Linear: {name} = {size} must be a multiple of {need} for {what} ({spec.short()})")


class FP4Linear(nn.Linear):
    """A drop-in ``nn.Linear`` whose three GEMMs see fake-quantized operands.

    Parameters
    ----------
    in_features, out_features, bias, device, dtype:
        As for ``nn.Linear``.
    spec:
        The :class:`LinearSpec`. All off (the default) is exactly ``nn.Linear``.
    backend:
        ``"auto"`` (compiled where ``torch.compile`` works, else fused),
        ``"compiled"``, ``"fused"`` or ``"reference"``; identical results.
    seed:
        Base seed of this layer's stochastic rounding and Hadamard signs. Each
        training-mode forward call advances a counter, so every step draws fresh
        noise; the counter and seed are saved in ``state_dict`` (extra state), so
        a resumed run draws the same noise as an uninterrupted one.

    Attributes
    ----------
    quantize:
        Set to ``False`` to run in high precision without changing the spec (the
        "switch to high precision for the final stretch" of training).

    Examples
    --------
    >>> import torch
    >>> nv = QuantSpec("nvfp4")
    >>> layer = FP4Linear(64, 32, spec=LinearSpec(fprop_x=nv, fprop_w=nv), backend="fused")
    >>> layer(torch.randn(2, 16, 64)).shape
    torch.Size([2, 16, 32])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 spec: LinearSpec = LinearSpec(), backend: str = "auto", seed: int = 0):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if not isinstance(spec, LinearSpec):
            raise TypeError(f"spec must be a LinearSpec, got {type(spec).__name__}")
        check_backend(backend)
        for role, (gemm, axis, _) in ROLES.items():
            s = getattr(spec, role)
            if role.endswith("_w"):
                if s.tile:
                    _check_divisible("in_features", in_features, s, role)
                    _check_divisible("out_features", out_features, s, role)
                else:
                    _check_divisible("in_features" if axis == 1 else "out_features",
                                     in_features if axis == 1 else out_features, s, role)
            elif gemm == "fprop":
                _check_divisible("in_features", in_features, s, role)
            elif gemm == "dgrad":
                _check_divisible("out_features", out_features, s, role)
        self.spec = spec
        self.backend = backend
        self.seed = int(seed)
        self.calls = 0
        self.quantize = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LinearSpec, *, backend: str = "auto", seed: int = 0) -> "FP4Linear":
        """An FP4Linear sharing ``linear``'s weight and bias Parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  spec=spec, backend=backend, seed=seed)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    @property
    def active(self) -> bool:
        """True when this layer quantizes (a spec with something on, and ``quantize``)."""
        return self.quantize and self.spec.enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return F.linear(x, self.weight, self.bias)
        n_tokens = x.numel() // x.shape[-1]
        if torch.is_grad_enabled() and self.weight.requires_grad:
            for role in ("wgrad_dy", "wgrad_x"):
                s = getattr(self.spec, role)
                need = max(s.block_size, s.hadamard)
                if s.enabled and need and n_tokens % need:
                    raise ValueError(
                        f"FP4Linear: the Wgrad GEMM blocks along the token axis, so the number of tokens "
                        f"(N = {n_tokens}, the product of x's leading dims {tuple(x.shape[:-1])}) must be a "
                        f"multiple of {need} for {role} ({s.short()})"
                    )
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            gemm_dtype = torch.get_autocast_dtype(device_type)
        else:
            gemm_dtype = x.dtype
        if self.training:
            self.calls += 1
            call_seed = mix_seed(self.seed, self.calls)
        else:
            call_seed = mix_seed(self.seed, _EVAL_CALL)
        backend = concrete_backend(self.backend)
        with torch.autocast(device_type, enabled=False):
            return FP4LinearFunction.apply(x, self.weight, self.bias, self.spec, call_seed, backend, gemm_dtype)

    def get_extra_state(self):
        return {"seed": self.seed, "calls": self.calls}

    def set_extra_state(self, state):
        self.seed = int(state["seed"])
        self.calls = int(state["calls"])

    def extra_repr(self) -> str:
        on = "" if self.quantize else ", quantize=False"
        labels = ", ".join(f"{r}={getattr(self.spec, r).short()}" for r in ROLES)
        return f"{super().extra_repr()}, {labels}{on}"
