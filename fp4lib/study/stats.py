"""Statistics of the stored study: per-recipe summaries, paired differences with
t-distribution intervals, verdicts that need the interval to exclude zero, a power
estimate, and gap curves."""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["summary", "val_gap_curve", "check_targets", "t_quantile", "Paired", "paired_difference",
           "seeds_needed"]


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


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (Simpson's rule on the density)."""
    if t < 0:
        return 1.0 - _t_cdf(-t, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    # integrate the density from 0 to t over u = atan(x / sqrt(df)), where it is smooth and bounded
    hi = math.atan(t / math.sqrt(df))
    n = 2000
    h = hi / n
    total = 0.0
    for i in range(n + 1):
        u = i * h
        # x = sqrt(df) tan u; dx = sqrt(df) / cos^2 u du; density = c (1 + x^2/df)^(-(df+1)/2) = c cos^(df+1) u
        f = math.exp(log_c) * math.sqrt(df) * math.cos(u) ** (df - 1)
        total += f * (1 if i in (0, n) else (4 if i % 2 else 2))
    return 0.5 + total * h / 3


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``p`` in (0.5, 1)).

    Examples
    --------
    >>> round(t_quantile(0.975, 1), 3), round(t_quantile(0.975, 3), 3), round(t_quantile(0.975, 30), 3)
    (12.706, 3.182, 2.042)
    """
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p!r}, df={df!r}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(45):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Paired:
    """A paired difference over seeds: ``diffs`` (one per seed), their mean, sample sd,
    the 95% t interval of the mean (``None`` with fewer than two seeds) and the verdict."""

    diffs: List[float]
    mean: float
    sd: Optional[float]
    low: Optional[float]
    high: Optional[float]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def resolved(self) -> bool:
        """True when the 95% interval excludes zero."""
        return self.low is not None and (self.low > 0 or self.high < 0)

    def verdict(self, above: str = "above", below: str = "below") -> str:
        """``above``/``below`` when the interval lies wholly on one side of zero, else
        "not resolved at this scale" (with the reason for one seed)."""
        if self.low is None:
            return "not resolved at this scale (one seed: no interval)"
        if not self.resolved:
            return "not resolved at this scale"
        return above if self.low > 0 else below

    def interval(self, fmt: str = "{:+.2f}") -> str:
        """``mean [low, high]``, or the mean alone for one seed."""
        if self.low is None:
            return f"{fmt.format(self.mean)} (1 seed)"
        return f"{fmt.format(self.mean)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def paired_difference(diffs: Sequence[float], level: float = 0.95) -> Paired:
    """Mean, sample sd and ``level`` t interval of per-seed paired differences.

    Examples
    --------
    >>> p = paired_difference([1.0, 1.2, 0.8, 1.0])
    >>> round(p.low, 3), round(p.high, 3), p.verdict()
    (0.74, 1.26, 'above')
    >>> paired_difference([0.55, 1.33]).verdict()  # two seeds, t with 1 degree of freedom
    'not resolved at this scale'
    """
    diffs = [float(d) for d in diffs]
    if not diffs:
        raise ValueError("diffs is empty: no seed to compare")
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Paired(diffs, mean, None, None, None)
    sd = statistics.stdev(diffs)
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Paired(diffs, mean, sd, mean - half, mean + half)


def seeds_needed(effect: float, sd: float, level: float = 0.95, power: float = 0.8, max_seeds: int = 10_000) -> int:
    """Seeds for a paired comparison to resolve ``effect`` (two-sided ``level``) with ``power``,
    given the sd of the per-seed differences: the smallest n with
    ``(t(level, n-1) + t(power, n-1)) * sd / sqrt(n) <= |effect|``.

    Examples
    --------
    >>> seeds_needed(1.0, 1.0)
    10
    """
    if sd <= 0:
        return 2
    if effect == 0:
        return max_seeds

    def resolves(n: int) -> bool:
        return (t_quantile(0.5 + level / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n) <= abs(effect)

    # The left side shrinks as n grows: double until it resolves, then bisect.
    lo, hi = 1, 2
    while not resolves(hi):
        if hi >= max_seeds:
            return max_seeds
        lo, hi = hi, min(2 * hi, max_seeds)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if resolves(mid) else (mid, hi)
    return hi
