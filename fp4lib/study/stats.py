"""Statistics of the stored study: per-recipe summaries and gap curves."""

from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Tuple

__all__ = ["summary", "val_gap_curve", "check_targets"]


def _by_recipe(results: Dict[str, dict], study: str, steps: Optional[int] = None) -> Dict[str, Dict[int, float]]:
    table: Dict[str, Dict[int, float]] = {}
    for rec in results.values():
        d = rec["definition"]
        if d["study"] != study or (steps is not None and d["steps"] != steps):
            continue
        table.setdefault(d["recipe"], {})[d["seed"]] = rec["final_val_loss"]
    return table


def summary(results: Dict[str, dict], study: str = "main", baseline: str = "bf16") -> List[dict]:
    """Per recipe: seeds, final validation losses, mean, spread (sample sd) and the
    paired gap to ``baseline`` in percent (each seed against the baseline's same seed)."""
    table = _by_recipe(results, study)
    base = table.get(baseline) or _by_recipe(results, "main").get(baseline, {})  # ablations: the main baseline
    rows = []
    for recipe, losses in table.items():
        seeds = sorted(losses)
        vals = [losses[s] for s in seeds]
        gaps = [100.0 * (losses[s] / base[s] - 1.0) for s in seeds if s in base]
        rows.append({
            "recipe": recipe,
            "seeds": seeds,
            "losses": vals,
            "mean": statistics.fmean(vals),
            "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "gap_pct": gaps,
            "gap_mean_pct": statistics.fmean(gaps) if gaps else None,
            "gap_sd_pct": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
        })
    return sorted(rows, key=lambda r: r["mean"])


def val_gap_curve(record: dict, baseline: dict) -> List[Tuple[int, float]]:
    """``(step, gap in percent)`` of ``record``'s validation loss over ``baseline``'s at
    the steps both evaluated: how the gap evolves during training."""
    base = {int(s): v for s, v in baseline["val_losses"]}
    return [(int(s), 100.0 * (v / base[int(s)] - 1.0)) for s, v in record["val_losses"] if int(s) in base]


def check_targets(results: Dict[str, dict]) -> Dict[str, bool]:
    """The book's targets for the study at the ci size, from the ``main`` study's mean
    losses: naive >= 20% worse than bf16; nvfp4 closes >= 90% of naive's gap; nvfp4
    within 4% of bf16 (mean over >= 2 seeds); ordering bf16 < nvfp4 < mxfp4 < naive."""
    rows = {r["recipe"]: r for r in summary(results)}
    need = ("bf16", "fp4_naive", "mxfp4", "nvfp4")
    if any(k not in rows for k in need):
        return {}
    b, n, m, v = (rows[k]["mean"] for k in need)
    return {
        "naive_at_least_20pct_worse": n >= 1.2 * b,
        "nvfp4_closes_90pct_of_naive_gap": (n - v) >= 0.9 * (n - b),
        "nvfp4_within_4pct": v <= 1.04 * b and len(rows["nvfp4"]["seeds"]) >= 2,
        "ordering_bf16_nvfp4_mxfp4_naive": b < v < m < n,
    }
