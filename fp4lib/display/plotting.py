"""One figure style for the whole book, and a small table type for notebook output.

Every chapter calls :func:`use_book_style` once and then draws with plain
matplotlib; formats always get the same colour (:data:`FORMAT_COLORS`), so a
reader can follow NVFP4 from chapter to chapter by colour alone. Training
recipes get one style each (:data:`RECIPE_STYLES`: colour, line style and
marker), the same in every figure; the high-precision baseline ``bf16`` is drawn
black, thicker and on top of the others (:func:`recipe_style`). Chapter 0
introduces the style.

:class:`Table` shows rows of numbers as an HTML table in the rendered book and in
Colab, and as aligned plain text everywhere else (which is what the notebook
tests compare).
"""

from __future__ import annotations

import html
import numbers
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence

import matplotlib as mpl
from cycler import cycler

__all__ = [
    "BOOK_COLORS",
    "FORMAT_COLORS",
    "FORMAT_LABELS",
    "BOOK_RC",
    "BASELINE_RECIPE",
    "RecipeStyle",
    "RECIPE_STYLES",
    "use_book_style",
    "format_color",
    "recipe_color",
    "recipe_style",
    "recipe_zorder",
    "Table",
]

# Okabe-Ito colours: distinguishable with the common forms of colour blindness.
BOOK_COLORS: Dict[str, str] = {
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "green": "#009E73",
    "purple": "#CC79A7",
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "yellow": "#F0E442",
    "black": "#000000",
    "grey": "#7F7F7F",
}

#: The colour of each number format, used in every figure of the book.
FORMAT_COLORS: Dict[str, str] = {
    "fp32": "#3A3A3A",
    "bf16": BOOK_COLORS["grey"],
    "e2m1": BOOK_COLORS["blue"],
    "bnb_fp4": BOOK_COLORS["vermillion"],
    "nf4": BOOK_COLORS["green"],
    "mxfp4": BOOK_COLORS["purple"],
    "nvfp4": BOOK_COLORS["orange"],
}

#: Full names for legends and tables: bitsandbytes' table is never plain "FP4".
FORMAT_LABELS: Dict[str, str] = {
    "fp32": "FP32",
    "bf16": "BF16",
    "e2m1": "E2M1 (OCP FP4)",
    "bnb_fp4": "bitsandbytes fp4 (not E2M1)",
    "nf4": "NF4",
    "mxfp4": "MXFP4 (E2M1 + E8M0 / 32)",
    "nvfp4": "NVFP4 (E2M1 + E4M3 / 16 + FP32)",
}


class RecipeStyle(NamedTuple):
    """How one training recipe is drawn: an Okabe-Ito colour, a line style and a marker."""

    color: str
    linestyle: str
    marker: str


#: The recipe every other one is compared with: drawn black, thicker and on top.
BASELINE_RECIPE = "bf16"

#: The style of every recipe in :data:`fp4lib.training.recipes.RECIPES`, used in every
#: figure of the book. The main recipes take their format's colour with solid lines,
#: their ``*_all_fp4`` variants the same colour dashed; the nine ``nvfp4`` ablations
#: share three colours that no main recipe uses, told apart by line style. No two
#: recipes share a colour and a line style, and every recipe has its own marker, so
#: that the figures stay readable in grey and with the common forms of colour blindness.
RECIPE_STYLES: Dict[str, RecipeStyle] = {
    "bf16": RecipeStyle(BOOK_COLORS["black"], "-", "o"),
    "fp8": RecipeStyle(BOOK_COLORS["green"], "-", "D"),
    "nvfp4": RecipeStyle(FORMAT_COLORS["nvfp4"], "-", "s"),
    "mxfp4": RecipeStyle(FORMAT_COLORS["mxfp4"], "-", "^"),
    "fp4_naive": RecipeStyle(FORMAT_COLORS["e2m1"], "-", "v"),
    "nvfp4_all_fp4": RecipeStyle(FORMAT_COLORS["nvfp4"], "--", "P"),
    "mxfp4_all_fp4": RecipeStyle(FORMAT_COLORS["mxfp4"], "--", "X"),
    "fp4_naive_all_fp4": RecipeStyle(FORMAT_COLORS["e2m1"], "--", "d"),
    "nvfp4_no_sr": RecipeStyle(BOOK_COLORS["sky"], "-", "<"),
    "nvfp4_no_rht": RecipeStyle(BOOK_COLORS["grey"], "-", ">"),
    "nvfp4_no_tiles": RecipeStyle(BOOK_COLORS["vermillion"], "-", "p"),
    "nvfp4_fwd_only": RecipeStyle(BOOK_COLORS["sky"], "--", "h"),
    "nvfp4_bwd_only": RecipeStyle(BOOK_COLORS["grey"], "--", "H"),
    "nvfp4_unbiased_sr": RecipeStyle(BOOK_COLORS["vermillion"], "--", "*"),
    "nvfp4_hp_final": RecipeStyle(BOOK_COLORS["sky"], ":", "8"),
    "nvfp4_hp_eval": RecipeStyle(BOOK_COLORS["vermillion"], ":", "x"),
    "nvfp4_4over6": RecipeStyle(BOOK_COLORS["grey"], ":", "+"),
}

_BASELINE_LINEWIDTH = 2.4
_BASELINE_ZORDER = 3  # above matplotlib's default of 2 for lines, patches and collections

#: The rcParams :func:`use_book_style` applies.
BOOK_RC: Dict[str, object] = {
    "figure.figsize": (7.0, 4.0),
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "figure.constrained_layout.use": True,
    "figure.titlesize": 13,
    "figure.titleweight": "bold",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.prop_cycle": cycler(
        color=[BOOK_COLORS[c] for c in ("blue", "vermillion", "green", "purple", "orange", "sky", "black")]
    ),
    "axes.grid": True,
    "axes.axisbelow": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "grid.color": "#B0B0B0",
    "grid.alpha": 0.35,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
    "legend.frameon": False,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "image.cmap": "viridis",
    "hist.bins": 40,
}


def use_book_style() -> None:
    """Apply the book's matplotlib style (:data:`BOOK_RC`) to all later figures.

    Examples
    --------
    >>> import matplotlib as mpl
    >>> use_book_style()
    >>> mpl.rcParams["axes.spines.top"]
    False
    """
    mpl.rcParams.update(BOOK_RC)


def format_color(name: str) -> str:
    """The book's colour for a format name such as ``"nvfp4"`` (hex string).

    Examples
    --------
    >>> format_color("nvfp4")
    '#E69F00'
    """
    try:
        return FORMAT_COLORS[name]
    except KeyError:
        raise ValueError(f"name must be one of {tuple(FORMAT_COLORS)}, got {name!r}") from None


def _recipe(name: str) -> RecipeStyle:
    try:
        return RECIPE_STYLES[name]
    except KeyError:
        raise ValueError(f"name must be one of {tuple(RECIPE_STYLES)}, got {name!r}") from None


def recipe_color(name: str) -> str:
    """The book's colour for a recipe such as ``"nvfp4_no_sr"`` (hex string).

    Examples
    --------
    >>> recipe_color("nvfp4") == format_color("nvfp4")
    True
    >>> recipe_color("bf16")
    '#000000'
    """
    return _recipe(name).color


def recipe_zorder(name: str) -> float:
    """The drawing order of a recipe's artists: the baseline above every other recipe.

    Examples
    --------
    >>> recipe_zorder("bf16") > recipe_zorder("fp8")
    True
    """
    _recipe(name)
    return _BASELINE_ZORDER if name == BASELINE_RECIPE else 2


def recipe_style(name: str, marker: bool = True) -> Dict[str, object]:
    """Keyword arguments for ``Axes.plot`` that draw recipe ``name`` in the book's style.

    Colour, line style, marker (``marker=False`` leaves it out) and z-order; the
    baseline (:data:`BASELINE_RECIPE`) also gets a thicker line.

    Examples
    --------
    >>> recipe_style("bf16")["zorder"], recipe_style("bf16")["linewidth"]
    (3, 2.4)
    >>> sorted(recipe_style("nvfp4_no_sr", marker=False))
    ['color', 'linestyle', 'zorder']
    """
    style = _recipe(name)
    kwargs: Dict[str, object] = {"color": style.color, "linestyle": style.linestyle, "zorder": recipe_zorder(name)}
    if marker:
        kwargs["marker"] = style.marker
    if name == BASELINE_RECIPE:
        kwargs["linewidth"] = _BASELINE_LINEWIDTH
    return kwargs


class Table:
    """Rows of values shown as an HTML table in notebooks and as aligned text elsewhere.

    Parameters
    ----------
    columns:
        Column headers, in order.
    rows:
        Each row a sequence of values (same length as ``columns``) or a mapping
        from column header to value.
    formats:
        Optional format string per column, e.g. ``{"rel. MSE": "{:.4f}"}``.
    float_format:
        Format of floats in columns without an entry in ``formats`` (default
        ``"{:.4g}"``); other values use ``str``.
    caption:
        Optional caption shown above the table.

    Examples
    --------
    >>> t = Table(["format", "bits"], [["MXFP4", 4.25], ["NVFP4", 4.5]], formats={"bits": "{:.2f}"})
    >>> print(t)
    format  bits
    ------  ----
    MXFP4   4.25
    NVFP4   4.50
    """

    def __init__(
        self,
        columns: Sequence[str],
        rows: Iterable[object],
        formats: Optional[Mapping[str, str]] = None,
        caption: Optional[str] = None,
        float_format: str = "{:.4g}",
    ):
        self.columns: List[str] = [str(c) for c in columns]
        if not self.columns:
            raise ValueError("columns must name at least one column")
        self.formats = dict(formats or {})
        unknown = set(self.formats) - set(self.columns)
        if unknown:
            raise ValueError(f"formats names unknown column(s) {sorted(unknown)}; columns are {self.columns}")
        self.caption = caption
        self.float_format = float_format
        self.rows: List[List[object]] = []
        for i, row in enumerate(rows):
            if isinstance(row, Mapping):
                missing = [c for c in self.columns if c not in row]
                if missing:
                    raise ValueError(f"row {i} lacks column(s) {missing}")
                values = [row[c] for c in self.columns]
            else:
                values = list(row)
                if len(values) != len(self.columns):
                    raise ValueError(f"row {i} has {len(values)} values; there are {len(self.columns)} columns")
            self.rows.append(values)

    def _cell(self, column: str, value: object) -> str:
        fmt = self.formats.get(column)
        if fmt is not None:
            return fmt.format(value)
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
            return self.float_format.format(value)
        return str(value)

    def cells(self) -> List[List[str]]:
        """The formatted cell strings, row by row."""
        return [[self._cell(c, v) for c, v in zip(self.columns, row)] for row in self.rows]

    def __str__(self) -> str:
        cells = self.cells()
        widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(self.columns)]
        lines = []
        if self.caption:
            lines.append(self.caption)
        lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths)).rstrip())
        lines.append("  ".join("-" * w for w in widths))
        for r in cells:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        out = ['<table class="table fp4-table">']
        if self.caption:
            out.append(f"<caption>{html.escape(self.caption)}</caption>")
        out.append("<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in self.columns) + "</tr></thead>")
        out.append("<tbody>")
        for r in self.cells():
            out.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>")
        out.append("</tbody></table>")
        return "\n".join(out)
