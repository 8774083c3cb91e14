"""Compiling fp4lib's kernels, and checking what was compiled before trusting it.

Compiled kernels are checked before they are trusted: :class:`VerifiedCompiled`
runs the eager formulation beside the compiled one on the first call of each
specialization and compares the bits; a mismatch (a miscompile, a stale on-disk
kernel cache) or a compiler error switches that specialization to the eager
formulation, with a warning that names it.

The same bits on every device: the scale formulas divide tensor by tensor (never
by a Python number, which CUDA multiplies by its reciprocal; see
:func:`fp4lib.numerics.scales.exact_constant`), and every fp4lib kernel is compiled with
Inductor's exact float32 division (:data:`COMPILE_OPTIONS`), without which Triton
divides approximately on the GPU. On CUDA GPUs below compute capability 8.9
(A100, T4), Triton cannot cast to float8, so the NVFP4 and FP8 kernels, which do,
run their eager formulation there: chosen once per device and logged
(:func:`float8_compiles`).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Dict, Optional

import torch

from .schemes import SCHEME_INFO

__all__ = ["COMPILE_OPTIONS", "FLOAT8_SCHEMES", "compile_works", "compile_kernel", "float8_compiles",
           "VerifiedCompiled"]

_log = logging.getLogger(__name__)

_RECOMPILE_LIMIT = 128

COMPILE_OPTIONS = {"eager_numerics.division_rounding": True}
"""Inductor options of every fp4lib kernel: float32 division rounded as eager PyTorch
does (Triton's ``div_rn``) instead of Triton's approximate division on the GPU. Passed
to ``torch.compile`` for these kernels only; the user's own compiles are untouched.
(No effect on the CPU, where compiled code divides exactly anyway.)"""

FLOAT8_SCHEMES = tuple(name for name, info in SCHEME_INFO.items() if info.scale_format == "e4m3" or info.dtype)
"""Schemes whose kernels cast to float8 (E4M3 block scales, FP8 values)."""


# ----------------------------------------------------------------------------
# Compiling, checked
# ----------------------------------------------------------------------------
class _NoCudaRuntimeNotice(logging.Filter):
    """Drops the one notice a CUDA build of torch logs when it compiles CPU kernels on a
    machine without a GPU ("No CUDA runtime is found, using CUDA_HOME=..."): it concerns
    CUDA extensions, which fp4lib never builds there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return torch.cuda.is_available() or not str(record.msg).startswith("No CUDA runtime is found")


@functools.lru_cache(maxsize=None)
def _quiet_cuda_notice() -> None:
    logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNotice())


@functools.lru_cache(maxsize=None)
def compile_works() -> bool:
    """True when ``torch.compile`` runs here (on CPU it needs a C++ compiler).

    When it does not, the first call warns once, naming the error, so that the
    ``"auto"`` backends' choice of the eager paths is never silent.
    """
    _quiet_cuda_notice()
    try:
        f = torch.compile(lambda t: t * 2 + 1)
        ok = bool(torch.equal(f(torch.ones(4)), torch.full((4,), 3.0)))
        problem = None if ok else "a compiled test function returned wrong values"
    except Exception as e:  # any failure of the toolchain means: do not compile here
        problem = f"{type(e).__name__}: {str(e)[:200]}"
    if problem is not None:
        _log.warning("torch.compile does not work here (%s); fp4lib runs its eager paths instead "
                     "(identical numbers, slower)", problem)
        return False
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), _RECOMPILE_LIMIT))
    return True


def _compile_options() -> dict:
    import torch._inductor.config as inductor_config

    numerics = getattr(inductor_config, "eager_numerics", None)
    if numerics is None or not hasattr(numerics, "division_rounding"):  # older torch: no such option
        return {}
    return dict(COMPILE_OPTIONS)


def compile_kernel(fn: Callable, dynamic: Optional[bool] = None, options: Optional[dict] = None) -> Callable:
    """``torch.compile(fn)`` with :data:`COMPILE_OPTIONS` (exact division), as every fp4lib kernel.

    ``options``: further Inductor options of this kernel (scheduling choices such as
    which intermediate results to keep in memory, which do not change any value)."""
    _quiet_cuda_notice()
    return torch.compile(fn, dynamic=dynamic, options={**_compile_options(), **(options or {})})


@functools.lru_cache(maxsize=None)
def _float8_compiles(device_type: str, index: Optional[int]) -> bool:
    if device_type != "cuda":
        return True
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    cap = torch.cuda.get_device_capability(device)
    ok = cap >= (8, 9)
    if not ok:
        _log.warning("fp4lib: %s has compute capability %d.%d, below 8.9: Triton cannot cast to float8 there, so "
                     "the %s kernels run their eager (fused) formulation on it; identical numbers, slower",
                     torch.cuda.get_device_name(device), cap[0], cap[1], ", ".join(FLOAT8_SCHEMES))
    return ok


def float8_compiles(device: torch.device) -> bool:
    """Whether compiled kernels may cast to float8 on ``device``: the CPU, or a CUDA GPU of
    compute capability 8.9 or above (L4, H100, B200). Below (A100, T4) Triton rejects
    float8 casts, so :data:`FLOAT8_SCHEMES` run eagerly there; said once per device (logging)."""
    device = torch.device(device)
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _float8_compiles(device.type, index)


def _bits(t):
    if t is None or not torch.is_tensor(t):
        return t
    if t.dtype in (torch.float32, torch.int32):
        return t.view(torch.int32)
    if t.element_size() == 1:
        return t.view(torch.uint8)
    return t


def _same_bits(a, b) -> bool:
    a, b = _bits(a), _bits(b)
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return a is None and b is None


class VerifiedCompiled:
    """A compiled function, trusted per specialization only after a bit-for-bit check.

    ``eager``: the eager formulation; ``compiled``: the same under
    ``torch.compile`` (or ``None`` where every call passes its key's own as
    ``compiled=``: the same function for every call with that key, since a key is
    verified once). ``call(key, label, *args)``: the first call for each
    ``key`` runs both and compares every output's bits. If they differ, or
    compiling fails, that key runs eagerly from then on, with a warning naming
    ``label``. ``valid_output``: the index of a boolean output that says whether
    the input was one the kernel is defined for (finite); a call on any other
    input returns the eager result and settles nothing.
    """

    def __init__(self, eager: Callable, compiled: Optional[Callable], valid_output: Optional[int] = None):
        self.fn = eager
        self.compiled = compiled
        self.valid_output = valid_output
        self.verified = set()
        self.fallback: Dict[tuple, str] = {}

    def call(self, key: tuple, label: str, *args, compiled: Optional[Callable] = None):
        if key in self.fallback:
            return self.fn(*args)
        compiled = self.compiled if compiled is None else compiled
        if compiled is None:
            raise TypeError(f"{label}: no compiled function given")
        if key in self.verified:
            return compiled(*args)
        eager = self.fn(*args)
        if self.valid_output is not None and not bool(eager[self.valid_output]):
            return eager
        try:
            fast = compiled(*args)
        except Exception as e:  # a compiler error: report it, then run eagerly
            self.fallback[key] = f"compiling failed ({type(e).__name__}: {str(e)[:200]})"
        else:
            if all(_same_bits(a, b) for a, b in zip(fast, eager)):
                self.verified.add(key)
                return fast
            self.fallback[key] = "the compiled kernel's bits differ from the eager formulation's"
        _log.warning("%s: %s; using the eager formulation for it (identical to the reference, slower)",
                     label, self.fallback[key])
        return eager
