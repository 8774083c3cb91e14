"""Summarise the stored training study (experiments/results) into benchmarks/RESULTS.md.

    python benchmarks/study_report.py [--no-write]

Every number comes from the stored result files, each of which records the command,
seed, machine and code hash that produced it (``make test`` fails when one is stale).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402

from fp4lib.study import (check_targets, load_results, paired_difference, stale_results, summary,  # noqa: E402
                          val_gap_curve)

RESULTS_DIR = Path(__file__).resolve().parents[1] / "experiments" / "results"


def fmt_gap(row) -> str:
    if row["gap_mean_pct"] is None:
        return "-"
    gaps = ", ".join(f"{g:+.2f}" for g in row["gap_pct"])
    return f"{paired_difference(row['gap_pct']).interval()}% ({gaps})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    results = load_results(RESULTS_DIR)
    if not results:
        print("no stored results; run `make experiments` first", file=sys.stderr)
        return 1
    stale = stale_results(RESULTS_DIR)
    any_rec = next(iter(results.values()))
    m = any_rec["machine"]
    lines = [
        "## Training study at the ci size (stored results)",
        "",
        "Written by `python benchmarks/study_report.py` from `experiments/results/*.json`"
        f" (code hash `{any_rec['code_hash'][:12]}`; {len(results)} runs; "
        f"{'all current' if not stale else 'missing or stale: ' + ', '.join(sorted(stale))}).",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {any_rec['torch']}, "
        f"{m.get('torch_threads', '?')} thread(s) per run, two runs side by side. Step times here are"
        " medians of the whole run under that shared load; `benchmarks/train_step.py` measures them alone.",
        "",
    ]
    base_ms = statistics.fmean(r["step_ms_median"] for n, r in results.items() if r["definition"]["recipe"] == "bf16"
                               and r["definition"]["study"] == "main")
    for study, title in (("main", "Recipes"), ("ablation", "nvfp4 ablations (seed 0)"),
                         ("fwd_bwd", "Where the gap comes from (seed 0)"), ("length", "High precision for the last 10% of steps (seed 0)")):
        rows = summary(results, study)
        if not rows:
            continue
        lines += [f"### {title}", "", "| recipe | final val loss (per seed) | mean ± sd | gap vs bf16, paired: mean [95% interval] (per seed) | step time vs bf16 |",
                  "|---|---|---|---|---|"]
        for r in rows:
            ms = [results[n]["step_ms_median"] for n in results if results[n]["definition"]["recipe"] == r["recipe"]
                  and results[n]["definition"]["study"] == study]
            lines.append(
                f"| {r['recipe']} | {', '.join(f'{v:.4f}' for v in r['losses'])} | {r['mean']:.4f} ± {r['sd']:.4f} | "
                f"{fmt_gap(r)} | {statistics.fmean(ms) / base_ms:.2f}x |"
            )
        lines.append("")
    if "nvfp4_s0" in results and "bf16_s0" in results:
        curve = val_gap_curve(results["nvfp4_s0"], results["bf16_s0"])
        lines += ["### nvfp4 gap over training (seed 0)", "",
                  "| step | " + " | ".join(str(s) for s, _ in curve) + " |",
                  "|---|" + "---|" * len(curve),
                  "| gap | " + " | ".join(f"{g:+.2f}%" for _, g in curve) + " |", ""]
    targets = check_targets(results)
    if targets:
        lines += ["### Targets", ""] + [f"- {k}: {'met' if v else 'NOT met'}" for k, v in targets.items()]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("study", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
