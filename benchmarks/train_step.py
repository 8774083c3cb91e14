"""Training step time per recipe and fake-quant backend, at the book's CPU ("ci") size.

    python benchmarks/train_step.py                    # writes the "Training step time" section
    python benchmarks/train_step.py --steps 5 --no-write

For each recipe and backend: build the ci model (GPT d=128, 4 layers, context 128,
batch 32), run ``--warmup`` steps (compiling, for the compiled backend), then time
``--steps`` full training steps (forward, backward, clipping, AdamW) and report the
median. The compiled and fused backends must give the same losses as the
reference, bit for bit: the script checks it on the timed steps and says so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_md import machine, write_section  # noqa: E402

from fp4lib.training.run import PRESETS, build_run  # noqa: E402
from fp4lib.training.config import TrainConfig  # noqa: E402
from fp4lib.training.loop import Trainer  # noqa: E402

SECTION = "train_step"
TARGET = 1.5  # FP4-simulated step within 1.5x of the baseline on the CPU


def time_steps(recipe: str, backend: str, warmup: int, steps: int, preset: str = "ci"):
    """Median step time (ms) and the losses of the timed steps."""
    model, rec, train, val, info = build_run(recipe, preset, seed=0, backend=backend)
    cfg = PRESETS[preset].train_config(steps=warmup + steps, eval_every=0, ckpt_every=0, progress=False)
    cfg = TrainConfig(**{**cfg.__dict__, "eval_batches": 1})
    t0 = time.perf_counter()
    result = Trainer(model, train, val, cfg).train()
    wall = time.perf_counter() - t0
    times = result.step_ms[warmup:]
    return statistics.median(times), result.train_losses[warmup:], result.step_ms[:warmup], wall


def _cpuinfo() -> dict:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _cpu_model() -> str:
    """The CPU's family, model and stepping numbers: a virtual machine's model name
    ("AMD EPYC") does not tell one generation from the next."""
    fields = _cpuinfo()
    found = [f"{label} {fields[name]}" for name, label in (("cpu family", "family"), ("model", "model"),
                                                           ("stepping", "stepping")) if fields.get(name)]
    return ", ".join(found) or "unknown"


def _isa_flags() -> str:
    """The CPU's AVX-512 and AMX flags (from /proc/cpuinfo), or "none"."""
    flags = _cpuinfo().get("flags")
    if flags is None:
        return "unknown"
    wanted = sorted({f for f in flags.split() if f.startswith(("avx512", "amx"))})
    return " ".join(wanted) or "none"


def measure(args):
    """Rows ``(threads, recipe, backend, median ms, median ratio to bf16)``, the recipes
    interleaved: every round times each recipe once, and a ratio is taken against the
    bf16 step of its own round, so that a change of load between rounds cancels."""
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        times, ratios = {}, {}
        for r in range(args.rounds):
            base_ms = None
            for recipe in args.recipes:
                backends = ["fused"] if recipe == "bf16" else args.backends
                losses = {}
                for backend in backends:
                    ms, loss, warm, wall = time_steps(recipe, backend, args.warmup, args.steps, args.preset)
                    losses[backend] = loss
                    base_ms = ms if recipe == "bf16" else base_ms
                    key = (recipe, "-" if recipe == "bf16" else backend)
                    times.setdefault(key, []).append(ms)
                    ratios.setdefault(key, []).append(ms / base_ms if base_ms else None)
                    print(f"round {r + 1}, {threads} thread(s) {recipe:13s} {key[1]:10s} {ms:8.1f} ms/step  (first "
                          f"warm-up step {warm[0]:.0f} ms, total {wall:.0f} s, load {os.getloadavg()[0]:.2f})",
                          flush=True)
                ref = losses.get("reference")
                if any(ref is not None and b != "reference" and loss != ref for b, loss in losses.items()):
                    raise SystemExit(f"MISMATCH: {recipe} losses differ from the reference")
        for key, ms in times.items():
            ratio = ratios[key]
            rows.append((threads, *key, statistics.median(ms), statistics.median(ratio) if None not in ratio else None))
    return rows


class _QuantClock:
    """Wall time spent in the layers' operand quantization (the Hadamard transform included):
    wraps the two functions through which every FP4Linear GEMM operand is quantized."""

    def __init__(self):
        import fp4lib.training.layers as layers

        self.layers, self.seconds, self.on = layers, 0.0, False
        self.originals = {n: getattr(layers, n) for n in ("fake_quantize_gemm_pair", "operand_factored")}
        for name, fn in self.originals.items():
            setattr(layers, name, self._timed(fn))

    def _timed(self, fn):
        def wrapper(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
        return wrapper

    def restore(self):
        for name, fn in self.originals.items():
            setattr(self.layers, name, fn)


def step_by_step(recipes, rounds: int, warmup: int, preset: str = "ci"):
    """Every recipe's trainer built and warmed up in one process, then one step of each in
    turn for ``rounds`` rounds: ``{recipe: (median ms, median ratio to bf16's step of the
    same round, median ms in quantization)}``. A change of load between rounds hits every
    recipe alike."""
    clock = _QuantClock()
    try:
        trainers = {}
        for recipe in recipes:
            model, rec, train, val, info = build_run(recipe, preset, seed=0, backend="auto")
            cfg = PRESETS[preset].train_config(steps=warmup + rounds, eval_every=0, ckpt_every=0, progress=False)
            trainers[recipe] = Trainer(model, train, val, cfg)
            for step in range(1, warmup + 1):
                trainers[recipe]._train_step(step)
        ms = {r: [] for r in recipes}
        quant = {r: [] for r in recipes}
        for i in range(rounds):
            for recipe, trainer in trainers.items():
                clock.seconds, clock.on = 0.0, True
                ms[recipe].append(trainer._train_step(warmup + 1 + i)[3])
                clock.on = False
                quant[recipe].append(clock.seconds * 1e3)
        base = ms[recipes[0]]
        return {r: (statistics.median(ms[r]), statistics.median(a / b for a, b in zip(ms[r], base)),
                    statistics.median(quant[r])) for r in recipes}
    finally:
        clock.restore()


def step_by_step_lines(recipes, rounds: int, warmup: int, threads: int, preset: str = "ci") -> list:
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    res = step_by_step(recipes, rounds, warmup, preset)
    lines = [
        "",
        f"Step by step: the recipes' trainers built and warmed up ({warmup} steps) in one process, then one step of "
        f"each in turn, {rounds} rounds, {threads} thread(s), the compiled backend (auto); medians. The share in "
        f"quantization is the wall time inside the layers' operand quantization (Hadamard transform included), "
        f"timed around each call. Load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after.",
        "",
        "| recipe | ms/step | vs bf16 | in quantization (ms) | share of the step | within 1.5x |",
        "|---|---|---|---|---|---|",
    ]
    for r, (ms, ratio, q) in res.items():
        lines.append(f"| {r} | {ms:.0f} | {ratio:.2f}x | {q:.0f} | {q / ms:.0%} | "
                     f"{'-' if r == recipes[0] else ('yes' if ratio <= TARGET else 'no')} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=["bf16", "fp8", "fp4_naive", "mxfp4", "nvfp4", "nvfp4_4over6"])
    p.add_argument("--backends", nargs="+", default=["reference", "fused", "compiled"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds over the recipes (medians reported)")
    p.add_argument("--preset", default="ci")
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                   help="torch thread counts to measure (default: torch's choice)")
    p.add_argument("--step-rounds", type=int, default=8,
                   help="rounds of the step-by-step comparison at 1 thread (0: skip it)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.recipes[0] != "bf16":
        p.error("the first recipe must be bf16, the baseline of the ratios")

    machine_line, load_before = machine(), os.getloadavg()
    rows = measure(args)
    load = f"load average (1, 5, 15 min) {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} before, " + \
        "{:.2f}/{:.2f}/{:.2f} after".format(*os.getloadavg())
    same = "reference" in args.backends and len(args.backends) > 1
    m, bs = PRESETS[args.preset].model, PRESETS[args.preset].train.batch_size
    lines = [
        f"## Training step time: tiny GPT, {args.preset} preset",
        "",
        f"Written by `python benchmarks/train_step.py` on {datetime.date.today().isoformat()} (median of {args.steps} "
        f"steps after {args.warmup} warm-up steps, {args.rounds} interleaved round(s); one step = forward, backward, "
        f"clipping, AdamW; batch {bs} x {m.block_size} tokens, GPT d={m.n_embd}, {m.n_layer} layers). "
        f"'vs bf16' is the median over rounds of the ratio to the bf16 step of the same round.",
        f"Machine: {machine_line}; CPU {_cpu_model()}; ISA flags: {_isa_flags()}; {load}.",
        "",
        "| torch threads | recipe | fake-quant backend | ms/step | vs bf16 |",
        "|---|---|---|---|---|",
    ]
    for threads, recipe, backend, ms, ratio in rows:
        lines.append(f"| {threads} | {recipe} | {backend} | {ms:.0f} | {f'{ratio:.2f}x' if ratio else '-'} |")
    lines += [
        "",
        f"Target: the compiled FP4-simulated step within {TARGET:.1f}x of bf16 (FP32 on this CPU). "
        + ("The fused and compiled backends gave the reference's losses bit for bit on every timed step."
           if same else ""),
        "The compiled backend's first steps include compiling (seconds per operand shape; cached on disk after).",
        "The machine's cores may be shared with other work: with 2 threads any other busy process slows every",
        "step (OpenMP threads wait for each other), so the 1-thread rows are the steadier comparison.",
    ]
    if args.step_rounds:
        lines += step_by_step_lines(args.recipes, args.step_rounds, args.warmup, 1, args.preset)
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
