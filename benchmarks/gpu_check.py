"""GPU readiness in one command (``make gpu-check``): what only a CUDA machine can check.

    python benchmarks/gpu_check.py             # all five parts; writes the "gpu_check" section
    python benchmarks/gpu_check.py --steps 50  # shorter timings

On a machine with CUDA it

1. runs the CUDA-parametrized unit tests (``pytest -m cuda``);
2. compares bitsandbytes' CUDA ``quantize_4bit``/``dequantize_4bit`` with fp4lib, bit
   for bit: fp4 and nf4; 1-D, 2-D and odd shapes; float32, float16 and bfloat16.
   The absmax values must be identical, and so must the dequantized values of
   bitsandbytes' own codes decoded by both. The 4-bit codes must be identical
   except where bitsandbytes' CUDA kernel breaks a tie its own way (a scaled value
   within 2^-20 of a midpoint of the table) or picks the other code of zero;
   those are counted and shown;
3. runs the bf16 fidelity check on CUDA: under bf16 autocast every GEMM's output
   of an FP4Linear equals the float32 path's output rounded to bf16, for at
   least 99% of the elements (on GPUs with native bf16, compute capability 8.0+;
   on a T4 it says the check is skipped);
4. on a GPU with block-scaled FP4 GEMMs (compute capability 10.x or 12.x), runs
   ``fp4lib.engines.gemm.fp4_gemm`` for MXFP4 and NVFP4 and compares it with the CPU
   emulation ``block_scaled_matmul``: equal up to one float32 rounding per block
   accumulated; on other GPUs it says the GEMM is skipped;
5. times about 200 training steps of the ``gpu`` preset for bf16, nvfp4 and mxfp4
   (compiled fake quantization) and writes ms/step and tokens/s into
   ``benchmarks/RESULTS.md``.

The whole run takes a few minutes on one H100-class GPU. It exits 1 when a check
fails, and also when ``nvidia-smi`` lists a GPU that torch cannot see (a CPU
build of torch, a driver mismatch): then nothing was checked. Only on a machine
with no NVIDIA GPU at all does it say there is nothing to check and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from results_md import machine, write_section  # noqa: E402

SECTION = "gpu_check"
QUANT_TYPES = {"fp4": "bnb_fp4", "nf4": "nf4"}
SHAPES = [(4096,), (1,), (33,), (64, 96), (3, 48), (257, 129), (2, 3, 48), (1024, 1024)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TIE_WINDOW = 2.0**-20
TIMED_RECIPES = ("bf16", "nvfp4", "mxfp4")
FIDELITY = 0.99


def nvidia_smi_gpus() -> list:
    """The GPUs ``nvidia-smi -L`` lists (empty when there is no nvidia-smi or no GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return [l for l in out.stdout.splitlines() if l.startswith("GPU ")] if out.returncode == 0 else []


def native_bf16(device: str = "cuda") -> bool:
    """bf16 in hardware: the CPU here, or a GPU of compute capability 8.0+ (not a T4's emulation)."""
    if torch.device(device).type != "cuda":
        return True
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation argument
        return torch.cuda.get_device_capability(device) >= (8, 0)


def warmup_steps(steps: int) -> int:
    """Warm-up steps left out of the median: a tenth, at least 10, and never all of them."""
    return min(max(10, steps // 10), steps - 1)


def run_cuda_tests() -> bool:
    print("1. CUDA-parametrized unit tests (pytest -m cuda)", flush=True)
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                            str(ROOT / "tests")], cwd=ROOT)
    return code == 0


def compare_bnb(quant_type: str, shape, dtype, device: str = "cuda") -> dict:
    """bitsandbytes on ``device`` against fp4lib on the CPU, for one random tensor."""
    from fp4lib import quantize
    from fp4lib.engines.bnb import bnb_dequantize, bnb_quantize, from_bnb

    gen = torch.Generator().manual_seed(hash((quant_type, shape, str(dtype))) % 2**31)
    x = torch.randn(shape, generator=gen).to(dtype)
    packed, state = bnb_quantize(x.to(device), quant_type, block_size=64)
    theirs = from_bnb(packed.cpu(), state)
    theirs.scale = state.absmax.cpu()
    ours = quantize(x, QUANT_TYPES[quant_type], block_size=64)
    fmt = ours.element_format
    c_theirs, c_ours = theirs.codes(), ours.codes()
    differ = c_theirs != c_ours
    same_value = differ & (fmt.decode(c_theirs) == fmt.decode(c_ours))
    flat = x.float().reshape(-1)
    block = torch.arange(flat.numel()) // 64
    scaled = flat / ours.scale[block]
    table = torch.sort(fmt.values).values
    mids = (table[:-1] + table[1:]) / 2
    near_tie = (scaled[:, None] - mids[None, :]).abs().amin(dim=1) <= TIE_WINDOW
    tie = differ & ~same_value & near_tie
    other = differ & ~same_value & ~near_tie
    # bitsandbytes' own codes, decoded by bitsandbytes (on the device) and by fp4lib
    dq_theirs = bnb_dequantize(packed, state).cpu()
    dq_ours = theirs.dequantize()
    return {
        "quant_type": quant_type, "shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
        "absmax_identical": bool(torch.equal(state.absmax.cpu(), ours.scale)),
        "codes_differing": int(differ.sum()), "zero_codes": int(same_value.sum()), "ties": int(tie.sum()),
        "other": int(other.sum()),
        "decode_identical": bool(torch.equal(dq_theirs.to(dq_ours.dtype), dq_ours)),
        "n": x.numel(),
    }


def bf16_fidelity(device: str = "cuda") -> list:
    """Share of GEMM outputs under bf16 autocast equal to the bf16 rounding of the float32 path."""
    from fp4lib.training.layers import FP4Linear
    from fp4lib.training.recipes import get_recipe

    def three_gemms(spec, autocast):
        torch.manual_seed(0)
        layer = FP4Linear(256, 256, bias=False, spec=spec, backend="fused", seed=5).to(device)
        gen = torch.Generator().manual_seed(1)
        x = (torch.randn(2, 128, 256, generator=gen) * torch.rand(2, 128, 1, generator=gen)).to(device)
        x.requires_grad_(True)
        dy = (torch.randn(2, 128, 256, generator=gen) * 1e-3).bfloat16().to(device)
        if autocast:
            with torch.autocast(device, dtype=torch.bfloat16):
                y = layer(x)
            y.backward(dy)
        else:
            y = layer(x)
            y.backward(dy.float())
        return y.detach(), x.grad, layer.weight.grad

    rows = []
    for name in ("fp4_naive", "mxfp4", "nvfp4"):
        spec = get_recipe(name).linear
        ref = three_gemms(spec, autocast=False)
        low = three_gemms(spec, autocast=True)
        for gemm, lo, hi in zip(("fprop", "dgrad", "wgrad"), low, ref):
            same = float((lo.float() == hi.bfloat16().float()).double().mean())
            rows.append((name, gemm, same))
    return rows


def time_recipe(recipe: str, steps: int) -> dict:
    from fp4lib.training.run import run_training

    warmup = warmup_steps(steps)
    result = run_training(recipe, "gpu", steps=steps, seed=0, backend="auto", progress=False,
                          eval_every=steps)
    timed = result.step_ms[warmup:]
    ms = statistics.median(timed)
    from fp4lib.training.run import PRESETS

    p = PRESETS["gpu"]
    tokens = p.train.batch_size * p.model.block_size
    return {"recipe": recipe, "ms": ms, "tokens_per_s": tokens / (ms / 1e3), "final_val_loss": result.final_val_loss,
            "precision": result.info.get("precision"), "steps": steps, "warmup": warmup}


def fp4_gemm_rows(device: str = "cuda") -> list:
    """``(scheme, m, n, k, max |gpu - emulation| / bound)`` for a few shapes; the bound is one
    float32 rounding per K block of the sum of |products|. Empty without an FP4 GEMM."""
    from fp4lib import quantize
    from fp4lib.engines.gemm import block_scaled_matmul, fp4_gemm, fp4_gemm_available

    if not fp4_gemm_available():
        return []
    rows = []
    g = torch.Generator().manual_seed(0)
    for scheme in ("mxfp4", "nvfp4"):
        for m, n, k in ((128, 128, 256), (512, 256, 1024), (1024, 1024, 4096)):
            x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
            x = x * torch.rand(m, k // 32, generator=g).mul(12).exp2().repeat_interleave(32, 1)
            a, b = quantize(x, scheme), quantize(w, scheme)
            y_ref = block_scaled_matmul(a, b)
            y = fp4_gemm(quantize(x.to(device), scheme), quantize(w.to(device), scheme)).cpu().float()
            # one float32 rounding per K block, plus the bf16 output's roundings (two for NVFP4: the
            # GEMM's and the one after its per-tensor scale), each at most 2^-8 of the result
            bound = ((k // a.block_size) * 2.0**-24 * (a.dequantize().abs() @ b.dequantize().abs().T)
                     + 2.0**-7 * y_ref.abs() + 1e-30)
            rows.append((scheme, m, n, k, float(((y - y_ref).abs() / bound).max())))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps timed per recipe (at least 2)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (warm-up, then timed steps)")
    if not torch.cuda.is_available():
        gpus = nvidia_smi_gpus()
        if gpus:
            print(f"make gpu-check: FAILED, nothing was checked: nvidia-smi lists {len(gpus)} GPU(s) ({gpus[0]}), "
                  f"but this torch ({torch.__version__}, CUDA {torch.version.cuda}) cannot use CUDA "
                  "(torch.cuda.is_available() is False). Install a CUDA build of torch, or run with a "
                  "Python whose torch sees the GPU.", file=sys.stderr)
            return 1
        print("make gpu-check: no CUDA GPU here (torch.cuda.is_available() is False, nvidia-smi lists none); "
              "nothing to check. Run it on a machine with an NVIDIA GPU.")
        return 0
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    ok = True
    lines = ["## GPU check (`make gpu-check`)", "", f"Machine: {machine()}.", ""]

    tests_ok = run_cuda_tests()
    ok &= tests_ok
    lines.append(f"CUDA-parametrized unit tests: {'passed' if tests_ok else 'FAILED'}.")
    lines.append("")

    print("2. bitsandbytes CUDA quantize/dequantize against fp4lib", flush=True)
    rows = [compare_bnb(qt, shape, dt) for qt in QUANT_TYPES for shape in SHAPES for dt in DTYPES]
    lines += ["bitsandbytes CUDA kernels against fp4lib (blocks of 64):", "",
              "| quant_type | shape | dtype | absmax identical | codes differing | of which: other code of 0 | "
              "ties | other | decode identical |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['quant_type']} | {r['shape']} | {r['dtype']} | {r['absmax_identical']} | "
                     f"{r['codes_differing']} of {r['n']} | {r['zero_codes']} | {r['ties']} | {r['other']} | "
                     f"{r['decode_identical']} |")
        ok &= r["absmax_identical"] and r["decode_identical"] and r["other"] == 0
    lines.append("")

    print("3. bf16 fidelity on CUDA", flush=True)
    if native_bf16():
        fidelity = bf16_fidelity()
        lines += ["bf16 autocast against the float32 path, share of outputs equal after rounding to bf16:", "",
                  "| recipe | GEMM | equal |", "|---|---|---|"]
        for name, gemm, same in fidelity:
            lines.append(f"| {name} | {gemm} | {100 * same:.2f}% |")
            ok &= same >= FIDELITY
    else:
        lines.append(f"bf16 fidelity: skipped, this GPU has compute capability "
                     f"{'.'.join(map(str, torch.cuda.get_device_capability()))} and no native bf16 (training "
                     "runs in float32 here).")
    lines.append("")

    print("4. block-scaled FP4 GEMM against its emulation", flush=True)
    gemm = fp4_gemm_rows()
    if not gemm:
        lines += [f"Block-scaled FP4 GEMM: skipped, this GPU has compute capability "
                  f"{'.'.join(map(str, torch.cuda.get_device_capability()))} (needs 10.x or 12.x).", ""]
    else:
        lines += ["Block-scaled FP4 GEMM (`torch._scaled_mm`, bf16 output) against `block_scaled_matmul` on "
                  "the CPU, largest difference in units of the bound (one float32 rounding per K block plus "
                  "the bf16 output's roundings):", "",
                  "| scheme | M x N x K | largest difference / bound |", "|---|---|---|"]
        for scheme, m, n, k, worst in gemm:
            lines.append(f"| {scheme} | {m} x {n} x {k} | {worst:.3f} |")
            ok &= worst <= 2.0
        lines.append("")

    print("5. gpu preset step times", flush=True)
    timings = [time_recipe(r, args.steps) for r in TIMED_RECIPES]
    base = timings[0]["ms"]
    lines += [f"`gpu` preset (10.8M parameters, 64 x 256 tokens per step), {args.steps} steps per recipe, "
              f"median after {timings[0]['warmup']} warm-up steps:", "",
              "| recipe | precision | ms/step | tokens/s | vs bf16 | final val_loss |", "|---|---|---|---|---|---|"]
    for t in timings:
        lines.append(f"| {t['recipe']} | {t['precision']} | {t['ms']:.1f} | {t['tokens_per_s']:,.0f} | "
                     f"{t['ms'] / base:.2f}x | {t['final_val_loss']:.4f} |")
    lines += ["", f"All checks {'passed' if ok else 'FAILED'}; {time.perf_counter() - t0:.0f} s in all."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
