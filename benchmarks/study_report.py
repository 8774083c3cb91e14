"""Summarise the stored training study (experiments/results) into benchmarks/RESULTS.md.

    python benchmarks/study_report.py [--no-write]

Every number comes from the stored result files, each of which records the command,
seed, machine and code hash that produced it (``make test`` fails when one is stale, and
when the section in RESULTS.md is not what this script writes from them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402

from fp4lib.study import (INGREDIENT_STUDIES, STUDY, check_targets, load_results, paired_gap,  # noqa: E402
                          recipe_losses, seeds_needed, stale_results, study_comparisons)

RESULTS_DIR = Path(__file__).resolve().parents[1] / "experiments" / "results"
MAIN = ("bf16", "fp8", "nvfp4", "mxfp4", "fp4_naive")
TARGET_STATE = {True: "met", False: "NOT met", None: "runs missing"}


def interval(p) -> str:
    if p is None:
        return "-"
    seeds = ", ".join(f"{d:+.2f}" for d in p.diffs)
    return f"{p.interval()} ({seeds})"


EFFECTS = (0.5, 1.0)  # effects of interest (percent) for the power estimate


def verdict(c, above="above", below="below") -> str:
    """The family-wise verdict with raw and Holm-adjusted p, and where unresolved the seeds
    that would resolve an effect of each size in EFFECTS with 80% power (one test at 95%, before any adjustment)."""
    if c is None:
        return "not stored"
    text = f"{c.verdict(above, below)} ({c.pvals()})"
    if c.resolved or not c.paired.sd or c.margin is not None:
        return text
    need = ", ".join(f"{e:g}%: {seeds_needed(e, c.paired.sd)}" for e in EFFECTS)
    return f"{text}; seeds for 80% power at an effect of {need}"


def step_ms(results, recipe, studies) -> list:
    return [r["step_ms_median"] for r in results.values()
            if r["definition"]["recipe"] == recipe and r["definition"]["study"] in studies]


def report(results_dir: Path = RESULTS_DIR) -> str:
    """The section's text, from the stored results in ``results_dir``."""
    results = load_results(results_dir)
    fam = study_comparisons(results) if results else {}
    if not results:
        raise SystemExit("no stored results; run `make experiments` first")
    stale = stale_results(results_dir)
    any_rec = next(iter(results.values()))
    m = any_rec["machine"]
    lines = [
        "## Training study at the ci size (stored results)",
        "",
        "Written by `python benchmarks/study_report.py` from `experiments/results/*.json`"
        f" (code hash `{any_rec['code_hash'][:12]}`; {len(results)} of {len(STUDY)} runs; "
        f"{'all current' if not stale else 'missing or stale: ' + ', '.join(sorted(stale))}).",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {any_rec['torch']}, "
        f"{m.get('torch_threads', '?')} thread(s) per run, two runs side by side. Step times here are"
        " medians of the whole run under that shared load; `benchmarks/train_step.py` measures them alone.",
        "Every difference is paired by seed (percent of the reference's final validation loss), with its"
        " 95% t interval and the per-seed values, the raw two-sided p of the paired t test and the p adjusted by"
        " Holm's method within its family (main recipes; every block in FP4; nvfp4 variants with the final"
        " stretch's control; forward/backward; 1600 steps); a verdict only where the adjusted p is below 0.05."
        " \"Within 1%\" is an equivalence test (two one-sided t tests, TOST), in the main family. Power: seeds that"
        " would resolve an effect of 0.5% or 1% with 80% power, one test at 95%, from the measured spread.",
        "",
    ]
    base_ms = statistics.fmean(step_ms(results, "bf16", ("main",)))
    lines += ["### Recipes (every quantized recipe keeps the last block in high precision)", "",
              "| recipe | final val loss (per seed) | vs bf16 (%) | verdict (main family) | vs nvfp4 (%) | step time vs bf16 |",
              "|---|---|---|---|---|---|"]
    for name in MAIN:
        losses = recipe_losses(results, name)
        if not losses:
            continue
        g = paired_gap(results, name, "bf16") if name != "bf16" else None
        v = paired_gap(results, name, "nvfp4") if name != "nvfp4" else None
        lines.append(f"| {name} | {', '.join(f'{losses[s]:.4f}' for s in sorted(losses))} | {interval(g)} | "
                     f"{verdict(fam['main'].get(f'{name} vs bf16')) if g else '-'} | {interval(v)} | "
                     f"{statistics.fmean(step_ms(results, name, ('main',))) / base_ms:.2f}x |")
    chain = MAIN[1:]
    lines += ["", "Ordering steps and equivalence (main family): " + "; ".join(
        f"{c.name} {c.paired.interval()} %, {verdict(c)}" for c in fam["main"].values()
        if c.name in {f"{hi} vs {lo}" for lo, hi in zip(chain, chain[1:])} or c.margin is not None) + "."]
    lines += ["", "### Every block in FP4", "", "| recipe | vs bf16 (%) | vs the same format, last block in high "
              "precision (%) | verdict |", "|---|---|---|---|"]
    for variant, own in (("nvfp4_all_fp4", "nvfp4"), ("mxfp4_all_fp4", "mxfp4"), ("fp4_naive_all_fp4", "fp4_naive")):
        d = paired_gap(results, variant, own, ("all_fp4",))
        c = fam["all_fp4"].get(f"{variant} vs {own}") or fam["variants"].get(f"{variant} vs {own}")
        lines.append(f"| {variant} | {interval(paired_gap(results, variant, 'bf16', ('all_fp4',)))} | {interval(d)} | "
                     f"{verdict(c, 'worse', 'better')} |")
    lines += ["", "### nvfp4 variants against nvfp4 of the same seed", "",
              "| recipe | study | vs nvfp4 (%) | verdict (variants family) | step time vs bf16 |", "|---|---|---|---|---|"]
    for run in dict.fromkeys((r.recipe, r.study) for r in STUDY if r.study in INGREDIENT_STUDIES):
        recipe, study = run
        if not recipe.startswith("nvfp4"):
            continue
        p = paired_gap(results, recipe, "nvfp4", INGREDIENT_STUDIES)
        ms = step_ms(results, recipe, (study,))
        lines.append(f"| {recipe} | {study} | {interval(p)} | "
                     f"{verdict(fam['variants'].get(f'{recipe} vs nvfp4'), 'worse', 'better')} | "
                     f"{statistics.fmean(ms) / base_ms:.2f}x |" if ms else f"| {recipe} | {study} | - | not stored | - |")
    control = fam["variants"].get("nvfp4_hp_final vs nvfp4_hp_eval")
    lines += ["", f"Final stretch against its control (nvfp4_hp_final vs nvfp4_hp_eval, both evaluated in high "
              f"precision; variants family): {interval(control.paired if control else None)} %, "
              f"{verdict(control, 'worse', 'better')}.", ""]
    long_gap = paired_gap(results, "nvfp4_hp_final", "bf16", ("length",))
    if long_gap is not None:
        steps = next(r["definition"]["steps"] for r in results.values() if r["definition"]["study"] == "length")
        lines += [f"### {steps} steps (4x)", "",
                  f"nvfp4_hp_final vs bf16 at 400 steps (final_hp study): "
                  f"{interval(paired_gap(results, 'nvfp4_hp_final', 'bf16', ('final_hp',)))} %. "
                  f"The length family (no evaluation control at {steps} steps):", ""]
        lines += [f"- {c.name}: {interval(c.paired)} %, {verdict(c)}" for c in fam["length"].values()]
        lines += [""]
    lines += ["### Targets", ""]
    for t in check_targets(results):
        lines.append(f"- {t.name}: {TARGET_STATE[t.met]} "
                     f"({t.detail})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    body = report()
    print(body)
    if not args.no_write:
        write_section("study", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
