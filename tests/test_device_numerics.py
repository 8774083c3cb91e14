"""The same float32 bits on every device: what can be checked on a CPU.

* No number-producing module divides by a Python number or a module-level numeric
  constant (``x / 6.0``, ``x / E2M1_MAX``): CUDA computes such a division as a
  product with the reciprocal (eagerly, and in Inductor's code for any constant
  divisor), which differs from the CPU's exact division for about a third of
  float32 inputs when the divisor is not a power of two.
* In the ATen graphs of fp4lib's compiled kernels no division has a divisor
  Inductor could prove constant (what it rewrites as a reciprocal product on the
  GPU, whatever its division settings).
* Each kernel compiled as the library compiles it for CUDA (exact division,
  ``fp4lib.numerics.compiling.COMPILE_OPTIONS``) gives the eager formulation's bits here.
* A tensor quantized on a device equals the same tensor quantized on the CPU
  (the CUDA case runs under ``make gpu-check``).
"""

import ast
import importlib
import inspect
import math
import traceback
from pathlib import Path

import pytest
import torch

import fp4lib
from fp4lib import quantize
from fp4lib.numerics import compiling, kernels
from fp4lib.numerics.rounding import seed_term
from fp4lib.numerics.scales import exact_constant
from fp4lib.numerics.schemes import SCHEMES

pytestmark = pytest.mark.usefixtures("one_thread")

# Every module of the numerics and the engine bridges, and the training modules that touch tensors' values.
NUMERIC_MODULES = sorted([f"{p.parent.name}.{p.stem}" for layer in ("numerics", "engines")
                          for p in (Path(fp4lib.__file__).parent / layer).glob("*.py") if p.stem != "__init__"]
                         + ["training.operands", "training.layers"])

# Divisions by a number that never touch a tensor (plain Python arithmetic), by module
# and source text. Only for such cases: a tensor divisor must be a tensor.
ALLOWED = {
    ("numerics.formats", "p / 12"),  # bitsandbytes' fp4 table as exact Python fractions, before any tensor exists
}


def _is_numeric_constant(node, module) -> bool:
    """A literal, a constant expression of literals, or a module-level numeric name."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    if isinstance(node, ast.UnaryOp):
        return _is_numeric_constant(node.operand, module)
    if isinstance(node, ast.BinOp):
        return _is_numeric_constant(node.left, module) and _is_numeric_constant(node.right, module)
    if isinstance(node, ast.Name):
        return isinstance(getattr(module, node.id, None), (int, float))
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        owner = getattr(module, node.value.id, None)
        return inspect.ismodule(owner) and isinstance(getattr(owner, node.attr, None), (int, float))
    return False


def constant_divisions(source: str, module) -> list:
    """``(line, text)`` of every ``a / b`` or ``a /= b`` whose ``b`` is a numeric constant."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            divisor = node.right
        elif isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Div):
            divisor = node.value
        else:
            continue
        if _is_numeric_constant(divisor, module):
            found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_the_scan_finds_what_it_looks_for():
    src = "def f(x):\n    a = x / 6.0\n    b = x / E2M1_MAX\n    x /= 3\n    c = x / (1 << 24)\n    return x / y\n"
    assert [t for _, t in constant_divisions(src, fp4lib.numerics.scales)] == [
        "x / 6.0", "x / E2M1_MAX", "x /= 3", "x / (1 << 24)"]


@pytest.mark.parametrize("name", NUMERIC_MODULES)
def test_no_division_by_a_python_number(name):
    module = importlib.import_module(f"fp4lib.{name}")
    source = Path(module.__file__).read_text()
    bad = [(line, text) for line, text in constant_divisions(source, module) if (name, text) not in ALLOWED]
    assert not bad, (f"fp4lib/{name.replace('.', '/')}.py divides by a Python number (CUDA multiplies by its reciprocal instead): "
                     f"{bad}; divide by fp4lib.numerics.scales.exact_constant(t, value), or multiply by an exact "
                     "power of two")


def test_exact_constant_divides_as_the_cpu_divides_by_a_number():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g) * torch.rand(100_000, generator=g).mul(60).sub(30).exp2()
    for value in (6.0, 4.0, 448.0 * 6):
        d = exact_constant(x, value)
        assert d.dtype == torch.float32 and d.shape == x.shape and bool((d == value).all())
        assert torch.equal((x / d).view(torch.int32), (x / value).view(torch.int32))


# ----------------------------------------------------------------------------
# The compiled kernels' graphs: no constant divisor
# ----------------------------------------------------------------------------
def _is_power_of_two(v) -> bool:
    return isinstance(v, (int, float)) and v != 0 and math.isfinite(v) and math.frexp(abs(v))[0] == 0.5


_CONSTANT_MAKERS = {"full", "full_like", "scalar_tensor", "lift_fresh_copy", "ones_like", "ones", "zeros_like"}


def _constant_divisors(gm) -> list:
    """Divisions by a constant, and reciprocals (``1.0 / t`` is traced as one): Triton computes
    both approximately on a GPU, where an eager division rounds correctly."""
    bad = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and "reciprocal" in str(node.target):
            bad.append(f"{node.target} of {node.args[0]}")
            continue
        if node.op != "call_function" or "div" not in str(node.target) or len(node.args) < 2:
            continue
        d = node.args[1]
        if isinstance(d, (int, float)):
            if not _is_power_of_two(d):
                bad.append(f"{node.target} by {d}")
        elif isinstance(d, torch.fx.Node):
            if d.op == "get_attr" or (d.op == "call_function" and
                                      str(d.target).split(".")[1] in _CONSTANT_MAKERS):
                bad.append(f"{node.target} by {d.target}{d.args}")
    return bad


def _graphs_of(fn, *args):
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    torch.compile(fn, backend=aot_autograd(fw_compiler=keep), dynamic=False)(*args)
    return graphs


E2M1_CASES = [("e2m1_per_tensor", None, False), ("mxfp4", "floor", False), ("mxfp4", "ceil", False),
              ("nvfp4", "nearest", False), ("nvfp4", "up", False), ("nvfp4", "4over6", False),
              ("nvfp4", "nearest", True)]
FAKE_QUANT_CASES = [("nvfp4", 0, "stochastic", False, "nearest"), ("nvfp4", 1, "nearest", True, "nearest"),
                    ("nvfp4", 1, "nearest", False, "4over6"), ("nvfp4", 0, "stochastic", False, "up"),
                    ("mxfp4", 1, "stochastic", False, "floor"), ("mxfp4", 0, "nearest", False, "ceil"),
                    ("e2m1_per_tensor", 1, "stochastic", False, None), ("fp8_e4m3", 1, "nearest", False, None),
                    ("fp8_e5m2", 0, "nearest", False, None)]


def _x(rows=64, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, cols // 16, generator=g).mul(30).sub(15).exp2(
        ).repeat_interleave(16, 1)


def test_no_compiled_kernel_divides_by_a_constant():
    x = _x()
    bad = []
    for scheme, rule, tile in E2M1_CASES:
        for gm in _graphs_of(kernels._e2m1_packed, x, scheme, rule, tile):
            bad += [(scheme, rule, tile, b) for b in _constant_divisors(gm)]
    for gm in _graphs_of(kernels._bnb_packed, x.reshape(-1, 64), (0.1, 0.5), torch.arange(3, dtype=torch.uint8)):
        bad += [("bnb", b) for b in _constant_divisors(gm)]
    for scheme, axis, rounding, tile, rule in FAKE_QUANT_CASES:
        for gm in _graphs_of(kernels.fake_quantize_fused, x, seed_term(7), scheme, axis, rounding, tile, rule):
            bad += [(scheme, axis, rounding, tile, rule, b) for b in _constant_divisors(gm)]
    assert not bad, bad


def test_the_scan_of_graphs_sees_a_constant_divisor():
    def f(x):
        return x / 6.0, x / torch.full_like(x, 3.0), x / 2.0, x / exact_constant(x, 6.0), 1.0 / x, \
            exact_constant(x, 1.0) / x

    found = [b for gm in _graphs_of(f, torch.ones(4)) for b in _constant_divisors(gm)]
    assert len(found) == 3, found
    assert sum("reciprocal" in b for b in found) == 1 and sum("by 6.0" in b for b in found) == 1, found
    assert sum("full_like" in b for b in found) == 1, found


# ----------------------------------------------------------------------------
# Compiled with the options used for CUDA: the eager bits
# ----------------------------------------------------------------------------
def _bits(t):
    if t is None or not torch.is_tensor(t):
        return t
    t = t.detach().cpu()
    return t.view(torch.int32) if t.dtype == torch.float32 else (t.view(torch.uint8) if t.element_size() == 1 else t)


def _same(a, b):
    a, b = _bits(a), _bits(b)
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.fixture(scope="module")
def compiles():
    if not compiling.compile_works():
        pytest.skip("torch.compile does not work here")


def test_kernels_are_compiled_with_exact_division(compiles):
    assert compiling.COMPILE_OPTIONS == {"eager_numerics.division_rounding": True}
    assert compiling._compile_options() == compiling.COMPILE_OPTIONS  # this torch has the option
    import torch._inductor.config as inductor_config

    assert not inductor_config.eager_numerics.division_rounding  # set for fp4lib's kernels only


def test_compiled_quantize_kernels_give_the_eager_bits(compiles):
    x = _x()
    compiled = compiling.compile_kernel(kernels._e2m1_packed, dynamic=False)
    for scheme, rule, tile in E2M1_CASES:
        fast, eager = compiled(x, scheme, rule, tile), kernels._e2m1_packed(x, scheme, rule, tile)
        assert all(_same(a, b) for a, b in zip(fast, eager)), (scheme, rule, tile)
    mids = tuple(float(m) for m in fp4lib.NF4._midpoints)
    order = fp4lib.NF4._on(x.device, "_order")
    blocks = x.reshape(-1, 64)
    fast = compiling.compile_kernel(kernels._bnb_packed, dynamic=True)(blocks, mids, order)
    assert all(_same(a, b) for a, b in zip(fast, kernels._bnb_packed(blocks, mids, order)))


def _x_with_edges(seed=0):
    """``_x`` with an all-zero block row, a row of tiny values (an amax near the float32
    subnormals) and a row of signed zeros."""
    x = _x(64, 128, seed=seed)
    x[3] = 0.0
    x[17] = x[17] * 2.0**-120
    x[40] = -0.0
    return x


def test_compiled_fake_quant_kernels_give_the_eager_bits(compiles, device):
    # Both stages compiled with the library's own options, on each device; the block scales
    # of stage 1 compared bit for bit as well as the values (a scale one ulp off seldom
    # changes a rounded value of a small tensor).
    from fp4lib.numerics.schemes import resolve_scale_rule

    x = _x_with_edges().to(device)
    scales = compiling.compile_kernel(kernels._stage_scales, dynamic=False, options=kernels._SCALES_OPTIONS)
    apply = compiling.compile_kernel(kernels._stage_apply, dynamic=False, options=kernels._APPLY_OPTIONS)
    for scheme, axis, rounding, tile, rule in FAKE_QUANT_CASES:
        if scheme in compiling.FLOAT8_SCHEMES and not compiling.float8_compiles(x.device):
            continue
        case = (scheme, axis, rounding, tile, rule)
        stage_args = (x, scheme, axis, tile, resolve_scale_rule(scheme, rule), None, "te2025", "mse")
        fast_scales, eager_scales = scales(*stage_args), kernels._stage_scales(*stage_args)
        assert all(_same(a, b) for a, b in zip(fast_scales, eager_scales)), case
        args = (x, seed_term(11, device), scheme, axis, rounding, tile, rule)
        fast = kernels.fake_quantize_fused(*args, stages=(scales, apply))
        eager = kernels.fake_quantize_fused(*args)
        assert all(_same(a, b) for a, b in zip(fast, eager)), case


# ----------------------------------------------------------------------------
# One tensor, every device: the same bytes
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantizing_on_a_device_gives_the_cpu_bytes(device, scheme):
    x = _x(32, 256, seed=3)
    rules = {"mxfp4": ["floor", "ceil"], "nvfp4": ["nearest", "up", "4over6"]}.get(scheme, [None])
    for rule in rules:
        ref = quantize(x, scheme, scale_rule=rule, backend="reference")
        # on the CPU the compiled kernels are compared with the reference in test_kernels.py
        for backend in ("reference", "auto") if device == "cpu" else ("reference", "compiled"):
            q = quantize(x.to(device), scheme, scale_rule=rule, backend=backend)
            assert _same(q.packed, ref.packed) and _same(q.scale, ref.scale), (rule, backend)
            assert _same(q.global_scale, ref.global_scale)


@pytest.mark.parametrize("spec_args", FAKE_QUANT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fake_quant_on_a_device_gives_the_cpu_bits(device, spec_args):
    if device == "cpu":
        pytest.skip("the CPU is the reference here; its backends are compared in test_kernels.py")
    from fp4lib.training.operands import fake_quantize_operand
    from fp4lib.training.specs import QuantSpec

    scheme, axis, rounding, tile, rule = spec_args
    spec = QuantSpec(scheme, rounding=rounding, tile=tile, scale_rule=rule)
    x = _x(64, 128, seed=5)
    ref = fake_quantize_operand(x, spec, axis, seed=99, backend="reference", factored=True)
    for backend in ("reference", "fused", "compiled"):
        got = fake_quantize_operand(x.to(device), spec, axis, seed=99, backend=backend, factored=True)
        assert all(_same(a, b) for a, b in zip(got, ref)), backend
    # The compiled kernel was trusted, not replaced by its eager formulation after a mismatch
    # (which would also give the reference's bits).
    from fp4lib.numerics.kernels import fake_quantize_compiled

    verified = getattr(fake_quantize_compiled(), "kernel", None)
    if verified is not None:
        fell_back = {k: why for k, why in verified.fallback.items() if k[-1] == device}
        assert not fell_back, fell_back


def test_float8_kernels_compile_on_the_cpu():
    assert compiling.float8_compiles(torch.device("cpu"))


# ----------------------------------------------------------------------------
# GPU paths that a CPU can still check
# ----------------------------------------------------------------------------
def test_float8_kernels_run_eagerly_below_sm89_and_say_so_once(monkeypatch, caplog):
    import logging

    compiling._float8_compiles.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    try:
        with caplog.at_level(logging.WARNING, logger="fp4lib.numerics.compiling"):
            assert not compiling._float8_compiles("cuda", 0)
            assert not compiling._float8_compiles("cuda", 0)
        assert len(caplog.records) == 1 and "8.0, below 8.9" in caplog.text and "A100" in caplog.text
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        assert compiling._float8_compiles("cuda", 1)
    finally:
        compiling._float8_compiles.cache_clear()


def test_seeds_are_made_on_the_operands_device_and_hadamard_matrices_are_cached():
    from fp4lib.numerics.hadamard import _cached_matrix, hadamard_matrix

    t = seed_term(12345, torch.device("cpu"))
    assert t.dtype == torch.int32 and t.shape == () and int(t) == int(seed_term(12345))
    m = _cached_matrix(16, torch.float32, None)
    assert m is _cached_matrix(16, torch.float32, "cpu") and m is _cached_matrix(16, torch.float32, torch.device("cpu"))
    public = hadamard_matrix(16)
    public.zero_()  # a caller's copy: the cache is untouched
    assert torch.equal(m, hadamard_matrix(16)) and bool((m != 0).all())


def test_a_training_step_reads_the_device_once():
    """One host read per step (loss and gradient norm together), one per evaluation."""
    from fp4lib.training.run import build_run, PRESETS
    from fp4lib.training.loop import Trainer

    model, _, train, val, _ = build_run("nvfp4", "tiny", seed=0, backend="fused")
    steps = 4
    cfg = PRESETS["tiny"].train_config(steps=steps, eval_every=0, ckpt_every=0, progress=False, device="cpu")
    reads = []
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "__float__", "__bool__")}

    def counting(name):
        def read(self, *args, **kwargs):
            # AdamW's own reads of its CPU step counters are left out: on a GPU the
            # trainer runs the fused AdamW, which keeps them on the device.
            if not any("torch/optim/" in f.filename for f in traceback.extract_stack()):
                reads.append(name)
            return originals[name](self, *args, **kwargs)
        return read

    trainer = Trainer(model, train, val, cfg)
    try:
        for name in originals:
            setattr(torch.Tensor, name, counting(name))
        trainer.train()
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    assert len(reads) == steps + 1, reads  # the steps, and the final evaluation
