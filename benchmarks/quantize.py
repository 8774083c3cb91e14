"""Time 4096x4096 float32 -> packed 4-bit through the public API, for every scheme.

    python benchmarks/quantize.py [--reps 7] [--no-write]

For each scheme it times ``fp4lib.quantize(x, scheme)`` (the public call, which
runs the compiled fast path for a tensor this large) and
``fp4lib.quantize(x, scheme, backend="reference")`` on the same input in the same
run, and checks that both give identical packed bytes and scales. It also times
the reference of fp4lib 0.1.0 (the package as of commit ``a8bf1c4``, taken from this
repository's history with ``git archive`` and run in a subprocess on the same
input), the baseline the speed targets were set against. For ``bnb_fp4``
and ``nf4`` it also times bitsandbytes' own CPU ``quantize_4bit`` and checks its
bytes and absmax against fp4lib's. Targets: the public call at least 5x
bitsandbytes' CPU quantize (bnb_fp4, nf4) and at least 10x the reference (MXFP4,
NVFP4, against 0.1.0's reference; the current reference is reported beside it).
Results go to ``benchmarks/RESULTS.md`` (section "quantize").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import machine, write_section  # noqa: E402

from fp4lib import quantize  # noqa: E402
from fp4lib.engines.bnb import bnb_quantize  # noqa: E402


def median_time(fn, reps: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


BASELINE_REV = "a8bf1c4"  # fp4lib 0.1.0
ROOT = Path(__file__).resolve().parents[1]

_TIME_OLD = """
import statistics, sys, time, torch
from fp4lib import quantize
torch.manual_seed(0)
x = torch.randn({size}, {size})
for scheme in ("bnb_fp4", "nf4", "mxfp4", "nvfp4"):
    quantize(x, scheme)
    times = []
    for _ in range({reps}):
        t0 = time.perf_counter(); quantize(x, scheme); times.append(time.perf_counter() - t0)
    print(scheme, statistics.median(times))
"""


def baseline_times(size: int, reps: int) -> dict:
    """Median quantize times of fp4lib 0.1.0's reference, by scheme ({} without the git history)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE_REV, "fp4lib"], capture_output=True)
        if archive.returncode:
            return {}
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        out = subprocess.run([sys.executable, "-c", _TIME_OLD.format(size=size, reps=reps)], cwd=tmp,
                             env=dict(os.environ, PYTHONPATH=tmp), capture_output=True, text=True, check=True)
    return {line.split()[0]: float(line.split()[1]) for line in out.stdout.splitlines()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    gb = x.numel() * 4 / 1e9
    rows = []
    failures = []
    def same_bits(a, b):
        def bits(t):
            return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)
        return (torch.equal(a.packed, b.packed) and torch.equal(bits(a.scale), bits(b.scale))
                and (a.global_scale is None or torch.equal(a.global_scale, b.global_scale)))

    old = baseline_times(args.size, args.reps)
    for scheme in ("bnb_fp4", "nf4", "mxfp4", "nvfp4"):
        ref_t = median_time(lambda: quantize(x, scheme, backend="reference"), args.reps)
        fast_t = median_time(lambda: quantize(x, scheme), args.reps)
        ref, fast = quantize(x, scheme, backend="reference"), quantize(x, scheme)
        same = same_bits(ref, fast)
        row = {"scheme": scheme, "reference": ref_t, "fast": fast_t, "vs_ref": ref_t / fast_t, "old": old.get(scheme)}
        if scheme in ("bnb_fp4", "nf4"):
            quant_type = "fp4" if scheme == "bnb_fp4" else "nf4"
            bnb_t = median_time(lambda: bnb_quantize(x, quant_type, 64), args.reps)
            packed, state = bnb_quantize(x, quant_type, 64)
            same = same and torch.equal(fast.packed, packed) and torch.equal(fast.scale, state.absmax)
            row.update(bnb=bnb_t, vs_bnb=bnb_t / fast_t)
            if bnb_t / fast_t < 5.0:
                failures.append(f"{scheme}: the public call is only {bnb_t / fast_t:.2f}x bitsandbytes (target 5x)")
        elif scheme not in old:
            failures.append(f"{scheme}: no fp4lib 0.1.0 reference to compare with (git history missing)")
        elif old[scheme] / fast_t < 10.0:
            failures.append(f"{scheme}: the public call is only {old[scheme] / fast_t:.2f}x fp4lib 0.1.0's reference "
                            "(target 10x)")
        if not same:
            failures.append(f"{scheme}: the bytes differ")
        row["same"] = same
        rows.append(row)

    def cell(t):
        return f"{t * 1e3:.0f} ms ({gb / t:.2f} GB/s)"

    lines = [
        "## Quantize speed: 4096x4096 float32 -> packed 4-bit",
        "",
        f"Written by `python benchmarks/quantize.py` (median of {args.reps} after one warm-up).",
        f"Machine: {machine()}.",
        "",
        "| scheme | `quantize(x, scheme)` | `backend=\"reference\"` | 0.1.0's reference | bitsandbytes CPU | "
        "vs reference | vs 0.1.0's reference | vs bitsandbytes | identical bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bnb = cell(r["bnb"]) if "bnb" in r else "-"
        vs_bnb = f"{r['vs_bnb']:.1f}x" if "vs_bnb" in r else "-"
        old_cell = cell(r["old"]) if r["old"] else "-"
        vs_old = f"{r['old'] / r['fast']:.1f}x" if r["old"] else "-"
        lines.append(f"| {r['scheme']} | {cell(r['fast'])} | {cell(r['reference'])} | {old_cell} | {bnb} | "
                     f"{r['vs_ref']:.1f}x | {vs_old} | {vs_bnb} | {'yes' if r['same'] else 'NO'} |")
    lines += ["", "Targets, through the public API: bnb_fp4 and nf4 at least 5x bitsandbytes' CPU `quantize_4bit`, "
              "MXFP4 and NVFP4 at least 10x the reference of fp4lib 0.1.0, every scheme with identical bytes "
              f"({'all met' if not failures else 'NOT all met: ' + '; '.join(failures)})."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("quantize", body)
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
