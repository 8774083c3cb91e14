"""The study's statistics (fp4lib.study.stats, fp4lib.study.verdicts) against known values.

scipy is not a dependency: the t-distribution checks use published table values and
values constructed from fp4lib's own t quantiles, which the table tests pin down.
"""

import math
from pathlib import Path

import pytest

import fp4lib
from fp4lib import study as ex
from fp4lib.study import stats, verdicts

RESULTS = Path(fp4lib.__file__).resolve().parents[1] / "experiments" / "results"


@pytest.mark.parametrize("t,df,expected", [(2.776445, 4, 0.975), (1.475884, 5, 0.9), (0.0, 7, 0.5),
                                           (-1.812461, 10, 0.05), (63.65674, 1, 0.995)])
def test_t_cdf_matches_the_tables(t, df, expected):
    assert stats.t_cdf(t, df) == pytest.approx(expected, abs=2e-6)
    assert stats.t_cdf(math.inf, df) == 1.0 and stats.t_cdf(-math.inf, df) == 0.0


def test_t_quantile_is_symmetric_and_accepts_the_median():
    assert stats.t_quantile(0.5, 3) == 0.0
    assert stats.t_quantile(0.1, 6) == pytest.approx(-stats.t_quantile(0.9, 6))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            stats.t_quantile(bad, 3)


def test_paired_p_value_is_the_two_sided_t_test():
    # mean 1 and se = 1 / t_{0.975, 3}: the t statistic is that quantile, so p is exactly 0.05
    q = stats.t_quantile(0.975, 3)
    c = math.sqrt(3) / q  # diffs 1 -+ c: sd = 2c / sqrt(3), se = c / sqrt(3)
    p = stats.paired_difference([1 - c, 1 - c, 1 + c, 1 + c])
    assert p.mean / p.se == pytest.approx(q)
    assert p.p_value == pytest.approx(0.05, abs=1e-6)
    assert p.low == pytest.approx(0.0, abs=1e-9)  # the 95% interval just touches zero
    assert stats.paired_difference([-x for x in p.diffs]).p_value == pytest.approx(p.p_value)


def test_zero_variance_and_one_seed_give_no_verdict():
    flat = stats.paired_difference([0.4, 0.4, 0.4])
    assert flat.p_value is None and not flat.resolved and flat.verdict().startswith("no verdict")
    assert stats.tost(flat, 1.0) is None
    assert stats.paired_difference([0.4]).p_value is None


def test_holm_on_a_textbook_example():
    # p = 0.01, 0.04, 0.03, 0.005: sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1 -> 0.02, 0.03, 0.06, 0.06 (monotone)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5]) == [0.5] and stats.holm([0.6, 0.7]) == [1.0, 1.0]
    # ties keep their order's maximum; never above 1
    assert stats.holm([0.02, 0.02, 0.9]) == pytest.approx([0.06, 0.06, 0.9])


def test_tost_against_a_hand_computation():
    # mean 0.2, sd 0.5, n 4: se 0.25, df 3; margin 1: t_low = 4.8, t_high = -3.2
    diffs = [0.2 + 0.5 * x for x in (-1.0, 1.0, -1.0, 1.0)]
    diffs = [0.2 + (d - 0.2) * math.sqrt(3) / 2 for d in diffs]  # sample sd exactly 0.5
    p = stats.paired_difference(diffs)
    assert p.sd == pytest.approx(0.5) and p.se == pytest.approx(0.25)
    expected = max(1 - stats.t_cdf(4.8, 3), stats.t_cdf(-3.2, 3))
    assert stats.tost(p, 1.0) == pytest.approx(expected)
    # equivalence at alpha exactly when the (1 - 2 alpha) interval lies inside the margins
    margin = 0.2 + stats.t_quantile(0.95, 3) * 0.25  # the 90% interval's upper end
    assert stats.tost(p, margin) == pytest.approx(0.05, abs=1e-6)
    with pytest.raises(ValueError):
        stats.tost(p, 0.0)


def test_ratio_of_means_delta_method():
    a, b = [1.0, 1.2, 0.8], [2.0, 2.0, 2.0]
    r = stats.ratio_of_means(a, b)
    half = stats.t_quantile(0.975, 2) * 0.1 / math.sqrt(3)  # residual sd 0.2 / |mean b| 2
    assert r.estimate == pytest.approx(0.5) and r.high - r.estimate == pytest.approx(half)
    assert stats.ratio_of_means([1.0, 2.0], [2.0, 4.0]).low is None  # no spread around the ratio
    with pytest.raises(ValueError):
        stats.ratio_of_means([1.0], [0.0])


def test_seeds_needed_for_an_effect_of_interest_and_its_edge_cases():
    assert stats.seeds_needed(1.0, 1.0) == 10 and stats.seeds_needed(-1.0, 1.0) == 10
    n = stats.seeds_needed(0.5, 1.0)
    tq = stats.t_quantile
    assert (tq(0.975, n - 1) + tq(0.8, n - 1)) / math.sqrt(n) <= 0.5 < (tq(0.975, n - 2) + tq(0.8, n - 2)) / math.sqrt(n - 1)
    assert stats.seeds_needed(1.0, 1.0, power=0.5) < stats.seeds_needed(1.0, 1.0)
    assert stats.seeds_needed(0.01, 10.0, max_seeds=50) == 50
    for args in ((0, 0), (0.0, 1.0), (1.0, 0.0), (1.0, -1.0)):
        with pytest.raises(ValueError):
            stats.seeds_needed(*args)
    with pytest.raises(ValueError):
        stats.seeds_needed(1.0, 1.0, power=1.0)


def test_verdicts_follow_the_adjusted_p():
    c = verdicts.Comparison("f", "a vs b", stats.paired_difference([1.0, 1.1, 0.9]), 0.01, 0.06)
    assert not c.resolved and c.verdict() == "not resolved after Holm adjustment"
    c.p_adj = 0.03
    assert c.resolved and c.verdict("worse", "better") == "worse"
    eq = verdicts.Comparison("f", "eq", stats.paired_difference([0.1, -0.1, 0.0]), 0.01, 0.2, margin=1.0)
    assert eq.verdict() == "equivalence not shown within ±1%"
    assert verdicts.size_check(1.17, 3.37, -math.inf, 1.0, "x").startswith("size differs")


@pytest.mark.skipif(not RESULTS.is_dir(), reason="no stored study")
def test_the_stored_study_adjusted_within_its_families():
    fam = ex.study_comparisons(ex.load_results(RESULTS))
    v = fam["variants"]
    assert len(v) == 11
    assert v["nvfp4_hp_final vs nvfp4"].p == pytest.approx(0.0022, abs=5e-5)
    assert v["nvfp4_hp_final vs nvfp4"].p_adj == pytest.approx(0.024, abs=5e-4) and v["nvfp4_hp_final vs nvfp4"].resolved
    assert v["nvfp4_hp_eval vs nvfp4"].p_adj == pytest.approx(0.093, abs=5e-4) and not v["nvfp4_hp_eval vs nvfp4"].resolved
    assert v["nvfp4_hp_final vs nvfp4_hp_eval"].p_adj == pytest.approx(0.26, abs=5e-3)
    eq = fam["main"]["fp8 within 1% of bf16"]
    assert eq.margin == 1.0 and not eq.resolved  # its 95% interval runs past +1%
    for family in fam.values():
        for c in family.values():
            assert c.p is None or c.p_adj >= c.p
