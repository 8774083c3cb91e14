"""Verdicts of the stored study: its comparisons grouped into families, Holm-adjusted
within each family, the equivalence test behind "fp8 within 1% of bf16", the targets
the study set itself, and how a paper's number compares with an interval.

Families (:data:`FAMILIES`), one per question the study definition asks:

* ``main`` -- each main recipe against ``bf16``, each step of the ordering
  fp8 < nvfp4 < mxfp4 < fp4_naive, and the equivalence of fp8 and bf16 within 1%;
* ``all_fp4`` -- every block in FP4: each variant against ``bf16`` and against its own
  format (``nvfp4_all_fp4`` against ``nvfp4`` is in ``variants``);
* ``variants`` -- every nvfp4 variant of :data:`~fp4lib.study.stats.INGREDIENT_STUDIES`
  against ``nvfp4``, and the final stretch against its control;
* ``fwd_bwd`` -- forward-only and backward-only FP4 against ``bf16`` and each other;
* ``length`` -- the 1600-step runs: their gap before the switch and at the end, and
  how each differs from the 400-step runs.

A comparison is resolved when its Holm-adjusted p (:func:`~fp4lib.study.stats.holm`)
is below :data:`ALPHA`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .definition import MAIN_RECIPES, STUDIES
from .stats import (CONTROLS, INGREDIENT_STUDIES, Paired, Ratio, holm, paired_difference, paired_gap,
                    ratio_of_means, recipe_losses, tost, val_gap_curve)

__all__ = ["ALPHA", "FP8_MARGIN", "FAMILIES", "Comparison", "format_p", "study_comparisons", "gap_before_switch",
           "closed_share", "Target", "check_targets", "direction", "size_check"]

ALPHA = 0.05
"""Family-wise error rate of every family's verdicts."""
FP8_MARGIN = 1.0
"""The equivalence margin of the target "fp8 within 1% of bf16", in percent."""


def format_p(p: Optional[float]) -> str:
    """A p-value with two significant digits, ``<0.001`` below that, ``-`` for no test.

    >>> format_p(0.00218), format_p(0.0242), format_p(6e-05), format_p(None), format_p(1.0)
    ('0.0022', '0.024', '<0.001', '-', '1')
    """
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.2g}"


@dataclass
class Comparison:
    """One test of a family: a paired difference (percent) and its raw and Holm-adjusted p.
    With ``margin`` it is an equivalence test (TOST) within ``±margin``."""

    family: str
    name: str
    paired: Paired
    p: Optional[float]
    p_adj: Optional[float] = None
    margin: Optional[float] = None

    @property
    def resolved(self) -> bool:
        """True when the Holm-adjusted p is below :data:`ALPHA`.

        >>> Comparison("f", "a vs b", paired_difference([1.0, 1.1, 0.9]), 0.004, 0.012).resolved
        True
        """
        return self.p_adj is not None and self.p_adj < ALPHA

    def verdict(self, above: str = "above", below: str = "below") -> str:
        """The family-wise verdict: ``above``/``below`` (or equivalence) when resolved
        after Holm's adjustment, else why not.

        >>> c = Comparison("f", "a vs b", paired_difference([1.0, 1.1, 0.9]), 0.004, 0.09)
        >>> c.verdict()
        'not resolved after Holm adjustment'
        """
        if self.p is None:
            return self.paired.verdict(above, below)
        if self.margin is not None:
            state = "equivalent" if self.resolved else "equivalence not shown"
            return f"{state} within ±{self.margin:g}%"
        if self.resolved:
            return above if self.paired.mean > 0 else below
        return "not resolved after Holm adjustment" if self.p < ALPHA else "not resolved at this scale"

    def pvals(self) -> str:
        """``p 0.0022, Holm 0.024``.

        >>> Comparison("f", "x", paired_difference([1.0, 1.1]), 0.00218, 0.0240).pvals()
        'p 0.0022, Holm 0.024'
        """
        return f"p {format_p(self.p)}, Holm {format_p(self.p_adj)}"


def _diff(family: str, results: Dict[str, dict], recipe: str, reference: str,
          studies: Sequence[str] = ("main",)) -> Optional[Comparison]:
    p = paired_gap(results, recipe, reference, studies)
    return Comparison(family, f"{recipe} vs {reference}", p, p.p_value) if p else None


def _main(results: Dict[str, dict]) -> List[Optional[Comparison]]:
    chain = MAIN_RECIPES[1:]
    rows = [_diff("main", results, r, "bf16") for r in chain]
    rows += [_diff("main", results, hi, lo) for lo, hi in zip(chain, chain[1:])]
    fp8 = paired_gap(results, "fp8", "bf16")
    if fp8:
        rows.append(Comparison("main", f"fp8 within {FP8_MARGIN:g}% of bf16", fp8, tost(fp8, FP8_MARGIN),
                               margin=FP8_MARGIN))
    return rows


def _all_fp4(results: Dict[str, dict]) -> List[Optional[Comparison]]:
    rows = [_diff("all_fp4", results, v, "bf16", ("all_fp4",)) for v in STUDIES["all_fp4"]]
    own = [(v, v[: -len("_all_fp4")]) for v in STUDIES["all_fp4"]]
    return rows + [_diff("all_fp4", results, v, o, ("all_fp4",)) for v, o in own if o != "nvfp4"]


def _variants(results: Dict[str, dict]) -> List[Optional[Comparison]]:
    recipes = [r for s in INGREDIENT_STUDIES for r in STUDIES[s] if r.startswith("nvfp4_")]
    rows = [_diff("variants", results, r, "nvfp4", INGREDIENT_STUDIES) for r in recipes]
    return rows + [_diff("variants", results, "nvfp4_hp_final", "nvfp4_hp_eval", ("final_hp",))]


def _fwd_bwd(results: Dict[str, dict]) -> List[Optional[Comparison]]:
    fwd, bwd = STUDIES["fwd_bwd"]
    return [_diff("fwd_bwd", results, fwd, "bf16", ("fwd_bwd",)), _diff("fwd_bwd", results, bwd, "bf16", ("fwd_bwd",)),
            _diff("fwd_bwd", results, fwd, bwd, ("fwd_bwd",))]


def _record(results: Dict[str, dict], recipe: str, seed: int, steps: int, studies: Sequence[str]) -> Optional[dict]:
    for rec in results.values():
        d = rec["definition"]
        if (d["recipe"], d["seed"], d["steps"]) == (recipe, seed, steps) and d["study"] in studies:
            return rec
    return None


def gap_before_switch(results: Dict[str, dict], record: dict) -> Tuple[int, float]:
    """``(step, gap %)`` of an end-phase run over ``bf16`` (same seed and steps) at the last
    evaluation before its switch to high precision: plain FP4 training up to there."""
    from ..training.recipes import get_recipe, hp_switch_step  # torch only where needed

    d = record["definition"]
    base = _record(results, "bf16", d["seed"], d["steps"], ("main", d["study"]))
    switch = hp_switch_step(get_recipe(d["recipe"]), d["steps"])
    return [(s, g) for s, g in val_gap_curve(record, base) if s < switch][-1]


def _length(results: Dict[str, dict]) -> List[Optional[Comparison]]:
    recipe = STUDIES["length"][1]
    runs = {k: {r["definition"]["seed"]: r for r in results.values()
                if r["definition"]["recipe"] == recipe and r["definition"]["study"] == k} for k in ("final_hp", "length")}
    if not runs["length"]:
        return []
    steps = next(iter(runs["length"].values()))["definition"]["steps"]
    before = {k: {s: gap_before_switch(results, r)[1] for s, r in v.items()} for k, v in runs.items()}
    end = {k: {s: 100 * (r["final_val_loss"] / _record(results, "bf16", s, r["definition"]["steps"],
                                                       ("main", k))["final_val_loss"] - 1) for s, r in v.items()}
           for k, v in runs.items()}
    common = sorted(set(runs["length"]) & set(runs["final_hp"]))
    series = {f"FP4 gap before the switch, {steps} steps": [before["length"][s] for s in sorted(runs["length"])],
              f"gap at the end, {steps} steps": [end["length"][s] for s in sorted(runs["length"])],
              "gap before the switch, long minus short": [before["length"][s] - before["final_hp"][s] for s in common],
              "gap at the end, long minus short": [end["length"][s] - end["final_hp"][s] for s in common]}
    out = []
    for name, diffs in series.items():
        if diffs:
            p = paired_difference(diffs)
            out.append(Comparison("length", name, p, p.p_value))
    return out


FAMILIES: Dict[str, Callable[[Dict[str, dict]], List[Optional[Comparison]]]] = {
    "main": _main, "all_fp4": _all_fp4, "variants": _variants, "fwd_bwd": _fwd_bwd, "length": _length}
"""Family -> the function that builds its comparisons from the stored results."""


def study_comparisons(results: Dict[str, dict]) -> Dict[str, Dict[str, Comparison]]:
    """Family -> comparison name -> :class:`Comparison`, Holm-adjusted within each family
    (over the comparisons that have a test: at least two seeds with some spread)."""
    out = {}
    for family, build in FAMILIES.items():
        rows = [c for c in build(results) if c is not None]
        tested = [c for c in rows if c.p is not None]
        for c, adj in zip(tested, holm([c.p for c in tested])):
            c.p_adj = adj
        out[family] = {c.name: c for c in rows}
    return out


def closed_share(results: Dict[str, dict]) -> Optional[Ratio]:
    """The share of naive FP4's gap to bf16 that nvfp4 closes, ``1 - gap(nvfp4) / gap(naive)``
    over the seeds all three ran, with its 95% delta-method interval."""
    nv, naive, base = (recipe_losses(results, r) for r in ("nvfp4", "fp4_naive", "bf16"))
    seeds = sorted(set(nv) & set(naive) & set(base))
    if not seeds:
        return None
    r = ratio_of_means([100 * (nv[s] / base[s] - 1) for s in seeds], [100 * (naive[s] / base[s] - 1) for s in seeds])
    return Ratio(1 - r.estimate, None if r.high is None else 1 - r.high, None if r.low is None else 1 - r.low, r.n)


@dataclass
class Target:
    """One of the study's targets: whether it is met (``None``: the runs are missing) and how far."""

    name: str
    met: Optional[bool]
    detail: str


def _chain_target(main: Dict[str, Comparison]) -> Target:
    name = "ordering bf16 <= fp8 < nvfp4 < mxfp4 < naive"
    chain = MAIN_RECIPES
    parts, ok, known = [], True, True
    for lo, hi in zip(chain, chain[1:]):
        c = main.get(f"{hi} vs {lo}")
        if c is None:
            known = False
            parts.append(f"{hi} vs {lo}: missing")
            continue
        step_ok = (c.resolved and c.paired.mean > 0) if lo != "bf16" else not (c.resolved and c.paired.mean < 0)
        ok = ok and step_ok
        parts.append(f"{hi} vs {lo} {c.paired.interval()}% ({c.pvals()}){'' if step_ok else ' (not shown)'}")
    return Target(name, ok if known else None, "; ".join(parts))


def check_targets(results: Dict[str, dict]) -> List[Target]:
    """The study's targets at the ci size, from the Holm-adjusted comparisons:

    * naive at least 20% above bf16 (the 95% interval above +20%);
    * nvfp4 closes at least 90% of naive's gap (the 95% interval of :func:`closed_share` above 90%);
    * fp8 equivalent to bf16 within 1% (TOST) and below nvfp4 (nvfp4 - fp8 resolved above 0);
    * the ordering bf16 <= fp8 < nvfp4 < mxfp4 < naive, each strict step resolved;
    * at least one ingredient (an nvfp4 variant against nvfp4, not the evaluation
      control of :data:`~fp4lib.study.stats.CONTROLS`) resolved.
    """
    fam = study_comparisons(results)
    main, out = fam["main"], []
    naive = main.get("fp4_naive vs bf16")
    out.append(Target("naive at least +20% over bf16", None if naive is None else bool(naive.paired.low and naive.paired.low >= 20),
                      f"{naive.paired.interval()}%" if naive else "no fp4_naive runs"))
    share = closed_share(results)
    out.append(Target("nvfp4 closes at least 90% of naive's gap",
                      None if share is None else share.low is not None and share.low >= 0.9,
                      f"{share.interval('{:.1%}')} closed" if share else "runs missing"))
    eq, nv = main.get(f"fp8 within {FP8_MARGIN:g}% of bf16"), main.get("nvfp4 vs fp8")
    name = f"fp8 within {FP8_MARGIN:g}% of bf16 and below nvfp4"
    if eq is None or nv is None:
        out.append(Target(name, None, "runs missing"))
    else:
        out.append(Target(name, eq.resolved and nv.resolved and nv.paired.mean > 0,
                          f"fp8 vs bf16 {eq.paired.interval()}%, {eq.verdict()} (TOST {eq.pvals()}); "
                          f"nvfp4 vs fp8 {nv.paired.interval()}% ({nv.pvals()})"))
    out.append(_chain_target(main))
    ingredients = [c for c in fam["variants"].values()
                   if c.name.endswith(" vs nvfp4") and c.name.split(" ")[0] not in CONTROLS]
    resolved = [f"{c.name.split(' ')[0]} {c.paired.interval()}% ({c.pvals()})" for c in ingredients if c.resolved]
    any_runs = any(r["definition"]["study"] in INGREDIENT_STUDIES for r in results.values())
    out.append(Target("at least one ingredient resolved against nvfp4", bool(resolved) if any_runs else None,
                      "; ".join(resolved) or "none resolved at this scale"))
    return out


def direction(c: Optional[Comparison], sign: int) -> str:
    """The papers' direction (``sign`` +1 or -1 of variant minus reference) against a
    comparison's family-wise verdict.

    >>> c = Comparison("f", "x", paired_difference([1.0, 1.1, 0.9]), 0.004, 0.012)
    >>> direction(c, +1), direction(c, -1)
    ('direction agrees', 'opposite direction')
    """
    if c is None:
        return "not measured"
    if not c.resolved:
        return c.verdict()
    return "direction agrees" if (c.paired.mean > 0) == (sign > 0) else "opposite direction"


def size_check(low: float, high: float, paper_low: float, paper_high: float, paper: str,
               fmt: str = "{:+.2f}") -> str:
    """Whether a paper's size (the range ``[paper_low, paper_high]``, equal ends for a point)
    meets our interval ``[low, high]``.

    >>> size_check(1.17, 3.37, float("-inf"), 1.0, "under +1%")
    'size differs: paper under +1% outside our interval [+1.17, +3.37]'
    >>> size_check(0.31, 4.25, 1.5, 1.5, "+1.5%")
    'size agrees: paper +1.5% inside our interval [+0.31, +4.25]'
    """
    inside = paper_low <= high and paper_high >= low
    return (f"size {'agrees' if inside else 'differs'}: paper {paper} {'inside' if inside else 'outside'} "
            f"our interval [{fmt.format(low)}, {fmt.format(high)}]")
