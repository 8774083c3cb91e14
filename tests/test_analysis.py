"""Tests for fp4lib.numerics.analysis (metrics, four-panel figure) and fp4lib.display.plotting."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection, PathCollection  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from fp4lib import fake_quantize, quantize  # noqa: E402
from fp4lib.numerics.analysis import (  # noqa: E402
    error_metrics,
    four_panel_figure,
    quantized_nbytes,
    relative_error,
    weight_error_metrics,
)
from fp4lib.display.plotting import BOOK_RC, FORMAT_COLORS, Table, format_color, use_book_style  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _seeded(n, seed=0, std=0.5):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * std


# ----------------------------------------------------------------------------
# Metrics against hand computation
# ----------------------------------------------------------------------------
def test_weight_error_metrics_by_hand():
    x = torch.tensor([1.0, -2.0, 0.5, 4.0])
    y = torch.tensor([1.0, -1.5, 0.5, 3.0])
    m = weight_error_metrics(x, y, lp_bytes=4)
    # errors: 0, 0.5, 0, -1 ; relative: 0, 0.25, 0, 0.25
    assert m["n"] == 4 and m["n_zero"] == 0
    assert m["min"] == -2.0 and m["max"] == 4.0
    assert m["mean"] == pytest.approx(0.875, abs=0, rel=1e-15)
    mean = 0.875
    std = math.sqrt(sum((v - mean) ** 2 for v in (1.0, -2.0, 0.5, 4.0)) / 3)  # Bessel's correction
    assert m["std"] == pytest.approx(std, rel=1e-15)
    assert m["dq_min"] == -1.5 and m["dq_max"] == 3.0
    assert m["mae"] == pytest.approx(0.375, rel=1e-15)
    assert m["max_abs_error"] == 1.0
    assert m["rmse"] == pytest.approx(math.sqrt((0.25 + 1.0) / 4), rel=1e-15)
    assert m["mean_rel_error"] == pytest.approx(0.125, rel=1e-15)
    assert m["max_rel_error"] == pytest.approx(0.25, rel=1e-15)
    assert m["rel_mse"] == pytest.approx(1.25 / (1 + 4 + 0.25 + 16), rel=1e-15)
    assert m["sqnr_db"] == pytest.approx(10 * math.log10((1 + 4 + 0.25 + 16) / 1.25), rel=1e-13)
    assert m["hp_bytes"] == 16 and m["lp_bytes"] == 4 and m["compression"] == 4.0


def test_relative_error_excludes_zeros_explicitly():
    x = torch.tensor([0.0, 2.0, -0.0, -4.0])
    y = torch.tensor([0.5, 1.0, 0.0, -4.0])
    rel = relative_error(x, y)
    assert math.isnan(rel[0]) and math.isnan(rel[2])
    assert rel[1] == 0.5 and rel[3] == 0.0
    m = weight_error_metrics(x, y)
    assert m["n_zero"] == 2
    assert m["mean_rel_error"] == pytest.approx(0.25)
    assert m["max_rel_error"] == 0.5
    # the zero's absolute error still counts in the absolute metrics
    assert m["max_abs_error"] == 1.0 and m["mae"] == pytest.approx(1.5 / 4)


def test_all_zero_tensor_has_undefined_relative_error():
    m = weight_error_metrics(torch.zeros(5), torch.zeros(5))
    assert m["n_zero"] == 5
    assert math.isnan(m["mean_rel_error"]) and math.isnan(m["max_rel_error"]) and math.isnan(m["rel_mse"])
    assert m["mae"] == 0.0 and m["lp_bytes"] is None and m["compression"] is None


def test_exact_reconstruction_has_infinite_sqnr():
    x = torch.tensor([1.0, -0.5, 2.0])
    m = weight_error_metrics(x, x.clone())
    assert m["sqnr_db"] == math.inf and m["rel_mse"] == 0.0 and m["max_rel_error"] == 0.0


def test_error_metrics_is_batched_over_the_last_axis():
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    y = fake_quantize(x.reshape(-1), "bnb_fp4", block_size=32).reshape(6, 40)
    batched = error_metrics(x, y)
    for i in range(6):
        single = weight_error_metrics(x[i], y[i])
        for key, values in batched.items():
            assert float(values[i]) == pytest.approx(single[key], rel=1e-12, abs=0), key
    assert batched["mae"].dtype == torch.float64 and batched["mae"].shape == (6,)


def test_weight_error_metrics_accepts_half_precision_and_shapes():
    x = _seeded(64).reshape(8, 8).bfloat16()
    m = weight_error_metrics(x, fake_quantize(x, "nf4"))
    assert m["n"] == 64 and m["hp_bytes"] == 128


@pytest.mark.parametrize(
    "x, y, exc",
    [
        ([1.0, 2.0], torch.tensor([1.0, 2.0]), TypeError),
        (torch.tensor([1, 2]), torch.tensor([1, 2]), TypeError),
        (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]), ValueError),
        (torch.tensor([]), torch.tensor([]), ValueError),
        (torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 1.0]), ValueError),
        (torch.tensor([1.0, 1.0]), torch.tensor([1.0, float("inf")]), ValueError),
    ],
)
def test_metrics_reject_bad_input(x, y, exc):
    with pytest.raises(exc):
        weight_error_metrics(x, y)
    with pytest.raises(exc):
        four_panel_figure(x, y)


def test_lp_bytes_must_be_positive_int():
    x = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="lp_bytes"):
        weight_error_metrics(x, x, lp_bytes=0)
    with pytest.raises(ValueError, match="lp_bytes"):
        weight_error_metrics(x, x, lp_bytes=2.5)


# ----------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------
def test_quantized_nbytes_for_the_seed_experiment():
    from fp4lib.engines.bnb import import_bitsandbytes

    F = import_bitsandbytes()
    x = _seeded(50)
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="fp4")
    assert quantized_nbytes(packed, state) == 25 + 4
    assert quantized_nbytes(quantize(x, "bnb_fp4")) == 29
    assert weight_error_metrics(x, fake_quantize(x, "bnb_fp4"), lp_bytes=29)["hp_bytes"] == 200


def test_quantized_nbytes_nested_state_matches_fp4lib_convention():
    from fp4lib.engines.bnb import import_bitsandbytes

    F = import_bitsandbytes()
    x = torch.randn(300 * 64, generator=torch.Generator().manual_seed(3))
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    expected = x.numel() // 2 + 300 + 2 * 4 + 4  # codes, uint8 absmax, two FP32 absmax2, FP32 offset
    assert quantized_nbytes(packed, state) == expected
    assert quantized_nbytes(quantize(x, "nf4", double_quant=True)) == expected


def test_quantized_nbytes_rejects_bad_input():
    with pytest.raises(TypeError):
        quantized_nbytes([1, 2, 3])
    with pytest.raises(TypeError):
        quantized_nbytes(torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError):
        quantized_nbytes(quantize(torch.randn(64), "bnb_fp4"), state=object())


# ----------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------
def test_four_panel_figure_structure_small():
    x = _seeded(50)
    y = fake_quantize(x, "bnb_fp4")
    fig = four_panel_figure(x, y, title="a finding")
    assert fig._suptitle is not None and fig._suptitle.get_text() == "a finding"
    ax1, ax2, ax3, ax4 = fig.axes
    assert len(fig.axes) == 4
    for ax in fig.axes:
        assert ax.get_title(), "every panel states its finding"
        assert ax.get_xlabel() and ax.get_ylabel()
    # (1) originals and dequantized values by index, with the error segments
    markers = [ln for ln in ax1.get_lines() if len(ln.get_xdata()) == 50]
    assert len(markers) == 2
    assert sorted(ln.get_ydata().tolist() == x.tolist() for ln in markers) == [False, True]
    assert any(isinstance(c, LineCollection) for c in ax1.collections)
    # (2) one bar per weight, heights = absolute errors, and the MAE line
    bars = [p for p in ax2.patches if isinstance(p, Rectangle)]
    assert len(bars) == 50
    heights = torch.tensor([b.get_height() for b in bars], dtype=torch.float64)
    assert torch.allclose(heights, (y - x).abs().double(), rtol=0, atol=1e-7)
    mae = float((y - x).abs().double().mean())
    assert any(ln.get_ydata()[0] == pytest.approx(mae) for ln in ax2.get_lines())
    # (3) two histograms over the same bins, each counting all 50 weights
    assert len(ax3.patches) >= 2
    filled = [p for p in ax3.patches if isinstance(p, Rectangle)]
    assert sum(p.get_height() for p in filled) == 50
    # (4) scatter of all weights, the y = x line, and the staircase
    scatter = [c for c in ax4.collections if isinstance(c, PathCollection)]
    assert len(scatter) == 1 and len(scatter[0].get_offsets()) == 50
    diagonal = [ln for ln in ax4.get_lines() if ln.get_label() == "y = x"]
    assert len(diagonal) == 1
    levels = torch.unique(y).numel()
    assert f"{levels} steps" in ax4.get_title()


def test_four_panel_figure_subsamples_large_tensors():
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    y = fake_quantize(x, "nvfp4")
    fig = four_panel_figure(x, y, max_points=300, scatter_points=1000)
    ax1, ax2, ax3, ax4 = fig.axes
    assert all(len(ln.get_xdata()) == 300 for ln in ax1.get_lines())
    assert "first 300 of 32,768" in ax1.get_xlabel()
    scatter = [c for c in ax4.collections if isinstance(c, PathCollection)]
    assert len(scatter[0].get_offsets()) == 1000
    # the histograms bin the central 99.8% of the weights
    filled = [p for p in ax3.patches if isinstance(p, Rectangle)]
    assert 0.99 * x.numel() <= sum(p.get_height() for p in filled) <= x.numel()
    assert "central 99.8%" in ax3.get_xlabel()


def test_four_panel_figure_rejects_bad_options():
    x = _seeded(10)
    with pytest.raises(ValueError):
        four_panel_figure(x, x, max_points=0)
    with pytest.raises(ValueError):
        four_panel_figure(x, x, scatter_points=0)
    with pytest.raises(ValueError):
        four_panel_figure(x, x, labels=("only one",))


# ----------------------------------------------------------------------------
# Style and tables
# ----------------------------------------------------------------------------
def test_use_book_style_sets_rcparams():
    matplotlib.rcdefaults()
    use_book_style()
    for key, value in BOOK_RC.items():
        if key == "axes.prop_cycle":
            continue
        got = matplotlib.rcParams[key]
        assert (list(got) == list(value)) if isinstance(value, tuple) else got == value, key
    colors = [d["color"] for d in matplotlib.rcParams["axes.prop_cycle"]]
    assert colors[0] == "#0072B2"
    matplotlib.rcdefaults()


def test_format_color():
    assert format_color("nvfp4") == FORMAT_COLORS["nvfp4"]
    with pytest.raises(ValueError, match="name must be one of"):
        format_color("fp4")


def test_table_text_and_html():
    t = Table(["name", "value"], [["a<b", 0.123456], {"name": "c", "value": 2}], formats={"value": "{:.2f}"},
              caption="cap")
    text = str(t)
    assert text.splitlines()[0] == "cap"
    assert "a<b   0.12" in text and "c     2.00" in text
    html = t._repr_html_()
    assert "<caption>cap</caption>" in html and "a&lt;b" in html and "<td>0.12</td>" in html
    assert repr(t) == text


def test_table_default_float_format():
    assert "0.1235" in str(Table(["x"], [[0.123456]]))
    assert "7" in str(Table(["x"], [[7]]))
    assert "0.12 " in str(Table(["x", "y"], [[0.123456, 1.0]], float_format="{:.2f}")) + " "
    assert str(Table(["x", "y"], [[0.5, 7]], float_format="{:.3f}")).splitlines()[-1] == "0.500  7"


def test_table_rejects_bad_rows():
    with pytest.raises(ValueError):
        Table(["a", "b"], [[1]])
    with pytest.raises(ValueError):
        Table(["a", "b"], [{"a": 1}])
    with pytest.raises(ValueError):
        Table(["a"], [[1]], formats={"b": "{}"})
    with pytest.raises(ValueError):
        Table([], [])


def test_metrics_need_no_matplotlib():
    # computing metrics imports nothing of matplotlib; only the figure does
    import subprocess
    import sys

    code = ("import sys, torch; from fp4lib.numerics.analysis import error_metrics; "
            "error_metrics(torch.ones(3), torch.ones(3)); print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
