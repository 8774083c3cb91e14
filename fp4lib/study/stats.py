"""Statistics of the stored study: per-recipe summaries, paired differences with
t-distribution intervals and p-values, Holm's step-down adjustment, equivalence tests
(two one-sided tests), intervals of ratios of paired means (delta method), a power
estimate for a given effect, and gap curves. Pure Python; the verdicts built from
these live in :mod:`fp4lib.study.verdicts`."""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["summary", "val_gap_curve", "INGREDIENT_STUDIES", "CONTROLS", "recipe_losses", "paired_gap", "t_cdf",
           "t_quantile", "Paired", "paired_difference", "seeds_needed", "holm", "tost", "Ratio", "ratio_of_means"]


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


INGREDIENT_STUDIES = ("all_fp4", "ablation", "fwd_bwd", "final_hp", "beyond")
CONTROLS = ("nvfp4_hp_eval",)  # changes how the loss is measured, not how the model trains


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (Simpson's rule on the density).

    Examples
    --------
    >>> round(t_cdf(0.0, 3), 6), round(t_cdf(3.182446, 3), 4), round(t_cdf(-2.228139, 10), 4)
    (0.5, 0.975, 0.025)
    """
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if t < 0:
        return 1.0 - t_cdf(-t, df)
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


_t_cdf = t_cdf  # the former private name


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``p`` in (0, 1)).

    Examples
    --------
    >>> round(t_quantile(0.975, 1), 3), round(t_quantile(0.975, 3), 3), round(t_quantile(0.975, 30), 3)
    (12.706, 3.182, 2.042)
    >>> t_quantile(0.5, 4), round(t_quantile(0.025, 3), 3)
    (0.0, -3.182)
    """
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"need 0 < p < 1 and df >= 1, got p={p!r}, df={df!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(45):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Paired:
    """A paired difference over seeds: ``diffs`` (one per seed), their mean, sample sd,
    the t interval of the mean at ``level`` (``None`` with fewer than two seeds), the
    two-sided p-value of "the mean difference is zero" and the verdict."""

    diffs: List[float]
    mean: float
    sd: Optional[float]
    low: Optional[float]
    high: Optional[float]
    level: float = 0.95

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def se(self) -> Optional[float]:
        """Standard error of the mean; ``None`` without spread (one seed, or identical differences)."""
        return self.sd / math.sqrt(self.n) if self.sd else None

    @property
    def p_value(self) -> Optional[float]:
        """Two-sided p of the paired t test against zero; ``None`` without spread (no test)."""
        if self.se is None:
            return None
        return min(1.0, 2.0 * (1.0 - t_cdf(abs(self.mean) / self.se, self.n - 1)))

    @property
    def resolved(self) -> bool:
        """True when the interval excludes zero (never without spread: no test)."""
        return self.se is not None and (self.low > 0 or self.high < 0)

    def verdict(self, above: str = "above", below: str = "below") -> str:
        """``above``/``below`` when the interval lies wholly on one side of zero, else
        "not resolved at this scale" (with the reason for one seed, or no verdict
        when the per-seed differences do not vary)."""
        if self.low is None:
            return "not resolved at this scale (one seed: no interval)"
        if self.se is None:
            return "no verdict (the per-seed differences do not vary)"
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
    >>> round(p.low, 3), round(p.high, 3), p.verdict(), round(p.p_value, 5)
    (0.74, 1.26, 'above', 0.00117)
    >>> paired_difference([0.55, 1.33]).verdict()  # two seeds, t with 1 degree of freedom
    'not resolved at this scale'
    >>> paired_difference([0.3, 0.3, 0.3]).verdict(), paired_difference([0.3, 0.3]).p_value
    ('no verdict (the per-seed differences do not vary)', None)
    """
    diffs = [float(d) for d in diffs]
    if not diffs:
        raise ValueError("diffs is empty: no seed to compare")
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Paired(diffs, mean, None, None, None, level)
    sd = statistics.stdev(diffs)
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Paired(diffs, mean, sd, mean - half, mean + half, level)


def holm(p_values: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest p is
    multiplied by (m - i), running maxima keep the order, and nothing exceeds 1. A
    hypothesis is rejected at family-wise level alpha when its adjusted p is below alpha.

    Examples
    --------
    >>> [round(p, 4) for p in holm([0.01, 0.04, 0.03, 0.005])]  # Holm (1979)-style textbook case
    [0.03, 0.06, 0.06, 0.02]
    >>> holm([])
    []
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def tost(p: Paired, margin: float) -> Optional[float]:
    """p-value of the two one-sided t tests (TOST) of equivalence within ``±margin``:
    the larger of the p of "mean <= -margin" and of "mean >= +margin". Equivalence is
    shown at level alpha when it is below alpha, that is when the (1 - 2 alpha) t
    interval lies inside the margins. ``None`` without spread (no test).

    Examples
    --------
    >>> round(tost(paired_difference([0.1, -0.2, 0.0, 0.1]), 1.0), 5)
    0.00038
    >>> tost(paired_difference([0.1, 0.1]), 1.0) is None
    True
    """
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin!r}")
    if p.se is None:
        return None
    below = 1.0 - t_cdf((p.mean + margin) / p.se, p.n - 1)  # H0: mean <= -margin
    above = t_cdf((p.mean - margin) / p.se, p.n - 1)  # H0: mean >= +margin
    return max(below, above)


@dataclass
class Ratio:
    """A ratio of two paired means with its t interval (delta method); ``None`` bounds
    when it has no interval (fewer than two seeds, or no spread)."""

    estimate: float
    low: Optional[float]
    high: Optional[float]
    n: int

    def interval(self, fmt: str = "{:.0%}") -> str:
        """``estimate [low, high]``, or the estimate alone without an interval."""
        if self.low is None:
            return f"{fmt.format(self.estimate)} (no interval)"
        return f"{fmt.format(self.estimate)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def ratio_of_means(numerator: Sequence[float], denominator: Sequence[float], level: float = 0.95) -> Ratio:
    """``mean(numerator) / mean(denominator)`` over paired seeds, with the delta-method
    ``level`` interval: the standard error is that of the mean of the residuals
    ``a_i - R b_i`` divided by ``|mean(b)|``, with a t quantile of ``n - 1`` degrees
    of freedom. Deterministic; with few seeds it is rough, as the t interval is.

    Examples
    --------
    >>> r = ratio_of_means([1.0, 1.2, 0.8], [2.0, 2.0, 2.0])
    >>> round(r.estimate, 3), round(r.low, 3), round(r.high, 3)
    (0.5, 0.252, 0.748)
    """
    a, b = [float(x) for x in numerator], [float(x) for x in denominator]
    if len(a) != len(b) or not a:
        raise ValueError("numerator and denominator need the same, nonzero number of seeds")
    mb = statistics.fmean(b)
    if mb == 0:
        raise ValueError("the denominator's mean is zero: no ratio")
    r = statistics.fmean(a) / mb
    if len(a) < 2:
        return Ratio(r, None, None, len(a))
    sd = statistics.stdev([x - r * y for x, y in zip(a, b)])
    if sd == 0:
        return Ratio(r, None, None, len(a))
    half = t_quantile(0.5 + level / 2, len(a) - 1) * sd / math.sqrt(len(a)) / abs(mb)
    return Ratio(r, r - half, r + half, len(a))


def seeds_needed(effect: float, sd: float, level: float = 0.95, power: float = 0.8, max_seeds: int = 10_000) -> int:
    """Seeds for a paired comparison to resolve a true effect of size ``effect`` (two-sided
    ``level``) with probability ``power``, given the sd of the per-seed differences: the
    smallest n >= 2 with ``(t(level, n-1) + t(power, n-1)) * sd / sqrt(n) <= |effect|``,
    capped at ``max_seeds``. ``effect`` is an effect of interest chosen beforehand (say
    0.5% or 1%), not the measured mean.

    Examples
    --------
    >>> seeds_needed(1.0, 1.0), seeds_needed(0.5, 1.0), seeds_needed(1.0, 1.0, power=0.5)
    (10, 34, 7)
    """
    if effect == 0:
        raise ValueError("effect must be nonzero: no number of seeds resolves a zero effect")
    if not sd > 0:
        raise ValueError(f"sd must be positive (no spread: the t test is undefined), got {sd!r}")
    if not 0.0 < power < 1.0 or not 0.0 < level < 1.0:
        raise ValueError(f"need 0 < level, power < 1, got level={level!r}, power={power!r}")

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
