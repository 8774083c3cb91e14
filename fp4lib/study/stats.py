"""Statistics of the stored study: per-recipe summaries, paired differences with
t-distribution intervals, verdicts that need the interval to exclude zero, a power
estimate, and gap curves."""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["summary", "val_gap_curve", "check_targets", "Target", "INGREDIENT_STUDIES", "recipe_losses", "paired_gap",
           "t_quantile", "Paired", "paired_difference", "seeds_needed"]


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


def recipe_losses(results: Dict[str, dict], recipe: str, studies: Sequence[str] = ("main",),
                  steps: Optional[int] = None) -> Dict[int, float]:
    """Seed -> final validation loss of ``recipe``'s runs in the first of ``studies`` that has
    it (with ``steps`` steps, where given)."""
    for study in studies:
        losses = _by_recipe(results, study, steps).get(recipe)
        if losses:
            return losses
    return {}


def _steps_of(results: Dict[str, dict], recipe: str, studies: Sequence[str]) -> Optional[int]:
    for study in studies:
        steps = {r["definition"]["steps"] for r in results.values()
                 if r["definition"]["study"] == study and r["definition"]["recipe"] == recipe}
        if steps:
            return max(steps)
    return None


def paired_gap(results: Dict[str, dict], recipe: str, reference: str,
               studies: Sequence[str] = ("main",)) -> Optional["Paired"]:
    """The paired gap of ``recipe`` over ``reference`` in percent, one difference per
    seed both ran (``100 * (loss / reference loss - 1)``), with its 95% t interval;
    ``None`` without a common seed. Variants are looked up in any of ``studies``,
    the reference in ``main`` first, among runs of the same length."""
    steps = _steps_of(results, recipe, studies)
    a = recipe_losses(results, recipe, studies, steps)
    b = recipe_losses(results, reference, ("main",) + tuple(studies), steps)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return paired_difference([100.0 * (a[s] / b[s] - 1.0) for s in seeds])


@dataclass
class Target:
    """One of the study's targets: whether it is met (``None``: the runs are missing) and how far."""

    name: str
    met: Optional[bool]
    detail: str


INGREDIENT_STUDIES = ("all_fp4", "ablation", "fwd_bwd", "final_hp", "beyond")
CONTROLS = ("nvfp4_hp_eval",)  # changes how the loss is measured, not how the model trains


def check_targets(results: Dict[str, dict]) -> List[Target]:
    """The study's targets at the ci size, from the paired gaps (95% t intervals):

    * naive at least 20% above bf16;
    * nvfp4 closes at least 90% of naive's gap (means);
    * fp8 within 1% of bf16, and below nvfp4 (the interval of nvfp4 - fp8 above 0);
    * the ordering bf16 <= fp8 < nvfp4 < mxfp4 < naive, each strict step resolved;
    * at least one ingredient (an nvfp4 variant of :data:`INGREDIENT_STUDIES`
      against nvfp4, not the evaluation control of :data:`CONTROLS`) resolved.
    """
    gap = {r: paired_gap(results, r, "bf16") for r in ("fp8", "nvfp4", "mxfp4", "fp4_naive")}
    out = []

    def missing(*names):
        return any(gap.get(n) is None for n in names)

    if missing("fp4_naive"):
        out.append(Target("naive at least +20% over bf16", None, "no fp4_naive runs"))
    else:
        g = gap["fp4_naive"]
        out.append(Target("naive at least +20% over bf16", g.mean >= 20.0, f"{g.interval()}%"))
    if missing("fp4_naive", "nvfp4"):
        out.append(Target("nvfp4 closes at least 90% of naive's gap", None, "runs missing"))
    else:
        closed = 1.0 - gap["nvfp4"].mean / gap["fp4_naive"].mean
        out.append(Target("nvfp4 closes at least 90% of naive's gap", closed >= 0.9, f"{100 * closed:.1f}% closed"))
    if missing("fp8", "nvfp4"):
        out.append(Target("fp8 within 1% of bf16 and below nvfp4", None, "runs missing"))
    else:
        nv_fp8 = paired_gap(results, "nvfp4", "fp8")
        ok = gap["fp8"].mean <= 1.0 and nv_fp8 is not None and nv_fp8.resolved and nv_fp8.mean > 0
        out.append(Target("fp8 within 1% of bf16 and below nvfp4", ok,
                          f"fp8 vs bf16 {gap['fp8'].interval()}%; nvfp4 vs fp8 "
                          f"{nv_fp8.interval() if nv_fp8 else 'n/a'}%"))
    chain = ("fp8", "nvfp4", "mxfp4", "fp4_naive")
    steps = [("bf16", "fp8", False)] + [(a, b, True) for a, b in zip(chain, chain[1:])]
    parts, ok, known = [], True, True
    for lo, hi, strict in steps:
        p = paired_gap(results, hi, lo)
        if p is None:
            known = False
            parts.append(f"{hi} vs {lo}: missing")
            continue
        step_ok = (p.resolved and p.mean > 0) if strict else not (p.resolved and p.mean < 0)
        ok = ok and step_ok
        parts.append(f"{hi} vs {lo} {p.interval()}%{'' if step_ok else ' (not shown)'}")
    out.append(Target("ordering bf16 <= fp8 < nvfp4 < mxfp4 < naive", ok if known else None, "; ".join(parts)))
    resolved = []
    for rec in sorted({r["definition"]["recipe"] for r in results.values()
                       if r["definition"]["study"] in INGREDIENT_STUDIES
                       and r["definition"]["recipe"].startswith("nvfp4_") and r["definition"]["recipe"] not in CONTROLS}):
        p = paired_gap(results, rec, "nvfp4", INGREDIENT_STUDIES)
        if p is not None and p.resolved:
            resolved.append(f"{rec} {p.interval()}%")
    any_runs = any(r["definition"]["study"] in INGREDIENT_STUDIES for r in results.values())
    out.append(Target("at least one ingredient resolved against nvfp4", bool(resolved) if any_runs else None,
                      "; ".join(resolved) or "none resolved at this scale"))
    return out


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
