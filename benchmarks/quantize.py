"""Time 4096x4096 float32 -> packed 4-bit for every scheme, against bitsandbytes.

    python benchmarks/quantize.py [--reps 7] [--no-write]

For ``bnb_fp4`` and ``nf4`` it times fp4lib's reference (:func:`fp4lib.quantize`),
fp4lib's compiled fast path (:func:`fp4lib.kernels.quantize_fast`) and
bitsandbytes' own CPU ``quantize_4bit`` on the same input in the same run, and
checks that all three produce identical packed bytes and absmax. Target: the fast
path at least 2x bitsandbytes' CPU quantize. Results go to
``benchmarks/RESULTS.md`` (section "quantize").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import machine, write_section  # noqa: E402

from fp4lib import quantize  # noqa: E402
from fp4lib.bnb_bridge import bnb_quantize  # noqa: E402
from fp4lib.kernels import quantize_fast  # noqa: E402


def median_time(fn, reps: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    for scheme in ("bnb_fp4", "nf4", "mxfp4", "nvfp4"):
        ref_t = median_time(lambda: quantize(x, scheme), args.reps)
        row = {"scheme": scheme, "reference": ref_t}
        if scheme in ("bnb_fp4", "nf4"):
            quant_type = "fp4" if scheme == "bnb_fp4" else "nf4"
            fast_t = median_time(lambda: quantize_fast(x, scheme), args.reps)
            bnb_t = median_time(lambda: bnb_quantize(x, quant_type, 64), args.reps)
            ref, fast = quantize(x, scheme), quantize_fast(x, scheme)
            packed, state = bnb_quantize(x, quant_type, 64)
            same = all(
                [
                    torch.equal(ref.packed, packed),
                    torch.equal(fast.packed, packed),
                    torch.equal(ref.scale, state.absmax),
                    torch.equal(fast.scale, state.absmax),
                ]
            )
            if not same:
                failures.append(f"{scheme}: bytes differ from bitsandbytes")
            row.update(fast=fast_t, bnb=bnb_t, same=same, speedup=bnb_t / fast_t)
            if bnb_t / fast_t < 2.0:
                failures.append(f"{scheme}: fast path only {bnb_t / fast_t:.2f}x bitsandbytes (target 2x)")
        rows.append(row)

    def cell(t):
        return f"{t * 1e3:.0f} ms ({gb / t:.2f} GB/s)"

    lines = [
        "## Quantize speed: 4096x4096 float32 -> packed 4-bit",
        "",
        f"Written by `python benchmarks/quantize.py` (median of {args.reps} after one warm-up).",
        f"Machine: {machine()}.",
        "",
        "| scheme | fp4lib reference | fp4lib compiled | bitsandbytes CPU | compiled vs bnb | identical bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "fast" in r:
            lines.append(
                f"| {r['scheme']} | {cell(r['reference'])} | {cell(r['fast'])} | {cell(r['bnb'])} | "
                f"{r['speedup']:.1f}x | {'yes' if r['same'] else 'NO'} |"
            )
        else:
            lines.append(f"| {r['scheme']} | {cell(r['reference'])} | - | - | - | - |")
    lines += ["", "Target: fp4lib's compiled path at least 2x bitsandbytes' CPU quantize, with identical bytes."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("quantize", body)
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
