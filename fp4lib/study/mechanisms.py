"""The gradient-fidelity study's numbers as intervals and verdicts (chapter 5's mechanism section).

A **cell** is one training state and one held-out batch; its value of a quantity is
the mean over the draws of the random parts. The cells of one state share its
parameters, and every state sees the same held-out batches, so the cells are not
independent: the unit of the statistics is the **state** (:func:`unit_values`, the mean
over its batches). Intervals are t intervals over the states, and an ingredient's
effect is the paired difference, per state, between the recipe with the ingredient
and the one without it. They describe the states of the runs measured, not training
runs in general. Within a family (one quantity, every ingredient) the p-values are
Bonferroni-adjusted (times ``m``) and the intervals widened to ``1 - 0.05 / m``, so
that a verdict and its interval always agree: an interval that excludes zero is a
resolved effect at the family-wise 5% level.

Squared relative bias and spread are the quantities tested: the per-cell estimate
of the squared bias is unbiased (:class:`~fp4lib.study.gradients.Moments`), its
root is not. Tables show roots for reading.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from .stats import Paired, paired_difference, ratio_of_means, seeds_needed
from .verdicts import ALPHA, study_comparisons

__all__ = ["QUANTITIES", "STATE_QUANTITIES", "Ingredient", "INGREDIENTS", "FAMILIES", "cell_values", "unit_values", "state_values",
           "recipe_summary", "Effect", "ingredient_effects", "loss_link", "sr_crossover"]


QUANTITIES: Dict[str, Callable[[dict], float]] = {
    "cosine": lambda r: r["grad"]["model"]["cosine"],
    "grad_error": lambda r: r["grad"]["model"]["error"],
    "grad_bias2": lambda r: r["grad"]["model"]["bias2"],
    "grad_spread2": lambda r: r["grad"]["model"]["spread2"],
    "fprop_error": lambda r: statistics.fmean(r["gemm"]["fprop"]["error"]),
    "dgrad_error": lambda r: statistics.fmean(r["gemm"]["dgrad"]["error"]),
    "wgrad_error": lambda r: statistics.fmean(r["gemm"]["wgrad"]["error"]),
    "bwd_bias2": lambda r: statistics.fmean(r["gemm"]["dgrad"]["bias2"] + r["gemm"]["wgrad"]["bias2"]),
    "bwd_spread2": lambda r: statistics.fmean(r["gemm"]["dgrad"]["spread2"] + r["gemm"]["wgrad"]["spread2"]),
    "lookahead": lambda r: statistics.fmean(r["grad"]["lookahead"]),
}
"""Per-cell quantities of one recipe: the whole-model gradient's cosine similarity, mean
relative error, squared relative bias and spread; the quantized layers' mean relative
GEMM errors; the backward GEMMs' (dgrad and wgrad) squared relative bias and spread;
and the look-ahead loss difference (nats, recipe's step minus the exact step)."""

STATE_QUANTITIES: Dict[str, Callable[[dict], float]] = {
    "mismatch": lambda w: statistics.fmean(w["fwd_bwd_mismatch"]),
    "weight_error": lambda w: statistics.fmean(w["weight_error"]),
}
"""Per-state quantities of one recipe's weights: the relative distance between the forward
and the dgrad GEMM's weight, and the forward weight's relative error (layer means)."""


@dataclass(frozen=True)
class Ingredient:
    """An ingredient as a pair of recipes, and the quantity its mechanism acts on."""

    name: str
    on: str
    off: str
    mechanism: str
    claim: str


INGREDIENTS = (
    Ingredient("stochastic rounding", "nvfp4", "nvfp4_no_sr", "bwd_bias2",
               "makes the backward GEMMs unbiased, at the price of variance"),
    Ingredient("random Hadamard transform", "nvfp4", "nvfp4_no_rht", "wgrad_error",
               "shrinks the Wgrad GEMM's error on operands with outliers"),
    Ingredient("16x16 weight tiles", "nvfp4", "nvfp4_no_tiles", "mismatch",
               "makes the forward and backward weights the same tensor"),
    Ingredient("block scales rounded up (unbiased SR)", "nvfp4_unbiased_sr", "nvfp4", "bwd_bias2",
               "removes the bias that clipping at the block maximum leaves in stochastic rounding"),
    Ingredient("four-over-six", "nvfp4_4over6", "nvfp4", "fprop_error",
               "lowers the error of the quantized operands"),
)

FAMILIES = ("mechanism", "cosine", "grad_bias2", "grad_spread2", "lookahead")
"""Families of tests: each ingredient on its own mechanism's quantity, then every
ingredient on the gradient's cosine, squared bias and squared spread, and on the
look-ahead loss."""


def cell_values(record: dict, recipe: str, quantity: str) -> List[float]:
    """``quantity`` of ``recipe`` in every cell of a stored record, in cell order."""
    if quantity in STATE_QUANTITIES:
        return state_values(record, recipe, quantity)
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {sorted(QUANTITIES) + sorted(STATE_QUANTITIES)}, got {quantity!r}")
    cells = record["data"]["cells"]
    if recipe not in cells[0]["recipes"]:
        raise ValueError(f"the record measured {sorted(cells[0]['recipes'])}, not {recipe!r}")
    return [QUANTITIES[quantity](c["recipes"][recipe]) for c in cells]


def unit_values(record: dict, recipe: str, quantity: str) -> List[float]:
    """``quantity`` of ``recipe`` per state (the mean over the state's cells): the units of the statistics."""
    if quantity in STATE_QUANTITIES:
        return state_values(record, recipe, quantity)
    by_state: Dict[str, List[float]] = {}
    for c, v in zip(record["data"]["cells"], cell_values(record, recipe, quantity)):
        by_state.setdefault(c["state"], []).append(v)
    return [statistics.fmean(v) for v in by_state.values()]


def state_values(record: dict, recipe: str, quantity: str) -> List[float]:
    """A weight quantity of ``recipe`` in every state of a stored record."""
    return [STATE_QUANTITIES[quantity](s["weights"][recipe]) for s in record["data"]["states"]]


def recipe_summary(record: dict, quantities: Sequence[str] = ("cosine", "grad_error", "grad_bias2", "grad_spread2",
                                                                   "fprop_error", "dgrad_error", "wgrad_error",
                                                                   "lookahead")) -> List[dict]:
    """Per recipe: each quantity's mean over the states with its 95% t interval (a :class:`Paired`)."""
    recipes = list(record["data"]["cells"][0]["recipes"])
    return [{"recipe": r, **{q: paired_difference(unit_values(record, r, q)) for q in quantities}} for r in recipes]


@dataclass
class Effect:
    """An ingredient's effect on one quantity: with minus without, per state, in one family."""

    family: str
    ingredient: Ingredient
    quantity: str
    paired: Paired          # 95% interval
    corrected: Paired       # the family's interval, widened to 1 - 0.05 / m
    p: Optional[float]
    p_adj: Optional[float] = None  # Bonferroni: min(1, m p)
    baseline: float = 0.0   # mean of the recipe without the ingredient (for the cosine: 1 - that mean)
    states_needed: Optional[int] = None  # for an effect of 10% of ``baseline``, 80% power, at the family's level

    @property
    def resolved(self) -> bool:
        return self.p_adj is not None and self.p_adj < ALPHA

    def verdict(self) -> str:
        if self.p is None:
            return "no test (the per-cell differences do not vary)"
        if self.resolved:
            return "raises it" if self.paired.mean > 0 else "lowers it"
        return "not resolved"


def ingredient_effects(record: dict) -> Dict[str, List[Effect]]:
    """Family -> the effects of every ingredient (:data:`INGREDIENTS`), Bonferroni-adjusted within it."""
    out: Dict[str, List[Effect]] = {}
    m = len(INGREDIENTS)
    for family in FAMILIES:
        effects = []
        for ing in INGREDIENTS:
            q = ing.mechanism if family == "mechanism" else family
            on, off = unit_values(record, ing.on, q), unit_values(record, ing.off, q)
            diffs = [a - b for a, b in zip(on, off)]
            p = paired_difference(diffs)
            base = statistics.fmean(off)
            if q == "cosine":  # a tenth of the cosine itself would be no small effect: use the distance 1 - cos
                base = 1.0 - base
            effects.append(Effect(family, ing, q, p, paired_difference(diffs, 1 - ALPHA / m), p.p_value, baseline=base))
        for e in effects:
            if e.p is not None:
                e.p_adj = min(1.0, m * e.p)
            if not e.resolved and e.paired.sd and e.baseline:  # the power of the ones left open
                e.states_needed = seeds_needed(0.1 * e.baseline, e.paired.sd, level=1 - ALPHA / m)
        out[family] = effects
    return out


def loss_link(record: dict, results: Dict[str, dict]) -> List[dict]:
    """Per variant of nvfp4: the loss study's final-loss change over nvfp4 (percent,
    Holm-adjusted in its family) beside the look-ahead's change over nvfp4 (nats, mean and
    the look-ahead family's corrected interval), and whether their signs agree."""
    variants = study_comparisons(results).get("variants", {})
    effects = {e.ingredient.name: e for e in ingredient_effects(record)["lookahead"]}
    rows = []
    for ing in INGREDIENTS:
        variant = ing.off if ing.on == "nvfp4" else ing.on
        loss = variants.get(f"{variant} vs nvfp4")
        e = effects[ing.name]
        flip = -1.0 if ing.on == "nvfp4" else 1.0  # the effect is with minus without; here variant minus nvfp4
        low, high = sorted((flip * e.corrected.low, flip * e.corrected.high))
        ahead = flip * e.paired.mean
        rows.append({"variant": variant, "ingredient": ing.name, "loss": loss, "lookahead": ahead,
                     "lookahead_low": low, "lookahead_high": high, "effect": e,
                     "agree": None if loss is None else (loss.paired.mean > 0) == (ahead > 0)})
    return rows


def sr_crossover(record: dict, level: str = "bwd", on: str = "nvfp4", off: str = "nvfp4_no_sr") -> dict:
    """Estimated number of independent gradients that must be averaged (by the optimizer,
    over steps) before stochastic rounding's smaller bias outweighs its larger spread:
    ``n* = (s_on^2 - s_off^2) / (b_off^2 - b_on^2)``, from the squared relative spread
    ``s^2`` and bias ``b^2`` of the backward GEMMs (``level="bwd"``) or of the whole-model
    gradient (``"grad"``), as a ratio of means over the states with its 95% delta-method
    interval (:func:`~fp4lib.study.stats.ratio_of_means`).

    Returns ``{"ratio", "spread_gain", "bias_gain"}``: the ratio (``None`` when either
    mean difference is not positive: no crossover) and the two paired differences. The
    ratio's interval means something only where ``bias_gain``'s interval excludes zero.
    An estimate under a model in which averaging ``n`` gradients divides the spread by
    ``n`` and leaves the bias.
    """
    if level not in ("bwd", "grad"):
        raise ValueError(f"level must be 'bwd' or 'grad', got {level!r}")
    b = {r: unit_values(record, r, f"{level}_bias2") for r in (on, off)}
    s = {r: unit_values(record, r, f"{level}_spread2") for r in (on, off)}
    spread_gain = [a - c for a, c in zip(s[on], s[off])]
    bias_gain = [c - a for a, c in zip(b[on], b[off])]
    ps, pb = paired_difference(spread_gain), paired_difference(bias_gain)
    ratio = ratio_of_means(spread_gain, bias_gain) if ps.mean > 0 and pb.mean > 0 else None
    return {"ratio": ratio, "spread_gain": ps, "bias_gain": pb}


def root(x: float) -> float:
    """The root of a squared relative quantity, with an estimate below zero read as zero."""
    return math.sqrt(max(x, 0.0))
