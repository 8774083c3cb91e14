"""The book's figure style: one distinct style per recipe, the baseline drawn on top."""

import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from fp4lib.display.plotting import (  # noqa: E402
    BASELINE_RECIPE,
    BOOK_COLORS,
    RECIPE_STYLES,
    recipe_color,
    recipe_style,
    recipe_zorder,
)
from fp4lib.training.recipes import RECIPES  # noqa: E402


def test_every_recipe_has_a_style_and_no_other_name_does():
    assert set(RECIPE_STYLES) == set(RECIPES)


def test_recipe_colours_are_okabe_ito():
    palette = set(BOOK_COLORS.values())
    for name, style in RECIPE_STYLES.items():
        assert style.color in palette, name
        assert mcolors.is_color_like(style.color), name


@pytest.mark.parametrize("a, b", list(itertools.combinations(sorted(RECIPES), 2)))
def test_each_recipe_is_told_apart_from_every_other(a, b):
    sa, sb = RECIPE_STYLES[a], RECIPE_STYLES[b]
    # A line plot tells them apart by colour or line style, a marker plot by marker.
    assert (sa.color, sa.linestyle) != (sb.color, sb.linestyle), (a, b)
    assert sa.marker != sb.marker, (a, b)


def test_no_recipe_shares_the_baselines_colour():
    base = recipe_color(BASELINE_RECIPE)
    assert [n for n in RECIPES if n != BASELINE_RECIPE and recipe_color(n) == base] == []


def test_the_baseline_is_drawn_on_top_and_thicker():
    others = [n for n in RECIPES if n != BASELINE_RECIPE]
    assert all(recipe_zorder(BASELINE_RECIPE) > recipe_zorder(n) for n in others)
    widths = {recipe_style(n).get("linewidth", matplotlib.rcParams["lines.linewidth"]) for n in others}
    assert recipe_style(BASELINE_RECIPE)["linewidth"] > max(widths)


def test_the_baseline_line_lies_above_the_others_when_drawn_first():
    fig, ax = plt.subplots()
    try:
        lines = {n: ax.plot([0, 1], [0, 1], **recipe_style(n))[0] for n in [BASELINE_RECIPE, "fp8", "nvfp4"]}
        on_top = max(ax.get_children(), key=lambda artist: artist.get_zorder())
        assert on_top is lines[BASELINE_RECIPE]
    finally:
        plt.close(fig)


def test_style_lookup_rejects_unknown_names():
    with pytest.raises(ValueError, match="nvfp5"):
        recipe_style("nvfp5")
    with pytest.raises(ValueError):
        recipe_color("nvfp5")
    with pytest.raises(ValueError):
        recipe_zorder("nvfp5")
