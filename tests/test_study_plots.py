"""Tests of fp4lib.study_plots: the curve helpers chapter 5 plots the stored study with."""

import pytest

from fp4lib.recipes import RECIPES
from fp4lib.study_plots import (RECIPE_COLORS, moving_average, recipe_color, runs_of, train_curve_stats,
                                val_curve_stats)


def _record(recipe, seed, study="main", steps=4, train=None, val=None):
    return {
        "definition": {"name": f"{recipe}_s{seed}", "recipe": recipe, "seed": seed, "steps": steps, "study": study},
        "train_losses": train if train is not None else [float(steps - i) for i in range(steps)],
        "val_losses": val if val is not None else [[steps, 1.0 + seed]],
    }


def test_every_preset_recipe_has_a_colour():
    for name in RECIPES:
        assert recipe_color(name).startswith("#")


def test_main_recipes_have_distinct_colours():
    main = [RECIPE_COLORS[r] for r in ("bf16", "fp4_naive", "mxfp4", "nvfp4")]
    assert len(set(main)) == 4


def test_unknown_recipe_colour_names_the_argument():
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipe_color("fp3")


def test_moving_average_is_a_trailing_mean():
    values = [4.0, 2.0, 6.0, 0.0, 8.0]
    got = moving_average(values, 3)
    want = [4.0, 3.0, 4.0, 8 / 3, 14 / 3]
    assert got == pytest.approx(want, abs=0, rel=1e-12)
    assert moving_average(values, 1) == values
    assert moving_average(values, 100) == pytest.approx([sum(values[:i + 1]) / (i + 1) for i in range(5)])
    assert moving_average([], 3) == []


@pytest.mark.parametrize("window", [0, -1, 2.5])
def test_moving_average_rejects_bad_windows(window):
    with pytest.raises(ValueError, match="window must be a positive int"):
        moving_average([1.0], window)


def test_runs_of_filters_by_recipe_study_and_steps_and_sorts_by_seed():
    results = {
        "b2": _record("bf16", 2), "b0": _record("bf16", 0), "n0": _record("nvfp4", 0),
        "a0": _record("bf16", 0, study="length", steps=8),
    }
    assert [r["definition"]["seed"] for r in runs_of(results, "bf16")] == [0, 2]
    assert runs_of(results, "bf16", study="length", steps=8) == [results["a0"]]
    assert runs_of(results, "bf16", study="length", steps=4) == []
    assert runs_of(results, "mxfp4") == []


def test_train_curve_stats_mean_min_max_over_seeds():
    recs = [_record("bf16", 0, train=[4.0, 2.0, 2.0]), _record("bf16", 1, train=[6.0, 6.0, 0.0])]
    steps, mean, lo, hi = train_curve_stats(recs)
    assert steps == [1, 2, 3]
    assert mean == [5.0, 4.0, 1.0]
    assert lo == [4.0, 2.0, 0.0] and hi == [6.0, 6.0, 2.0]
    _, smoothed, _, _ = train_curve_stats(recs, window=2)
    assert smoothed == [5.0, 4.5, 2.5]


def test_val_curve_stats_and_mismatched_records():
    recs = [_record("bf16", 0, val=[[2, 3.0], [4, 2.0]]), _record("bf16", 1, val=[[2, 5.0], [4, 1.0]])]
    assert val_curve_stats(recs) == ([2, 4], [4.0, 1.5], [3.0, 1.0], [5.0, 2.0])
    with pytest.raises(ValueError, match="different steps"):
        val_curve_stats([recs[0], _record("bf16", 2, val=[[3, 1.0], [4, 1.0]])])
    with pytest.raises(ValueError, match="different numbers of steps"):
        train_curve_stats([_record("bf16", 0, steps=4), _record("bf16", 1, steps=5)])
    with pytest.raises(ValueError, match="empty"):
        val_curve_stats([])
