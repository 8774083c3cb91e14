"""How far a quantized tensor is from the original: metrics and the four-panel figure.

Chapter 3 of the book introduces these functions; chapter 2 uses
:func:`error_metrics` for its format comparison. Computing metrics needs torch
only; :func:`four_panel_figure` imports matplotlib when it draws.

Definitions (``x`` the original, ``y`` the dequantized tensor, ``e = y - x``):

* absolute error ``|e_i|``; MAE its mean; RMSE ``sqrt(mean(e^2))``;
* relative MSE ``sum(e^2) / sum(x^2)`` and SQNR ``10 log10(sum(x^2) / sum(e^2))`` dB;
* **relative error** ``|e_i| / |x_i|``, defined only where ``x_i != 0``. Elements
  with ``x_i == 0`` are left out of the mean and maximum relative error and
  counted in ``n_zero``; with no nonzero element both are NaN. (Any finite number
  for ``0/0`` or ``c/0`` would be a convention hiding a division by zero.)
* standard deviations use Bessel's correction, as ``torch.std`` does.

All metrics are computed in float64 from the float32 (or float16/bfloat16) inputs.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .tensor import QuantizedTensor

__all__ = [
    "relative_error",
    "error_metrics",
    "weight_error_metrics",
    "quantized_nbytes",
    "four_panel_figure",
]



# ----------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------
def _check_pair(x_hp, x_dq) -> Tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("x_hp", x_hp), ("x_dq", x_dq)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if x_hp.shape != x_dq.shape:
        raise ValueError(f"x_hp and x_dq must have the same shape, got {tuple(x_hp.shape)} and {tuple(x_dq.shape)}")
    if x_hp.numel() == 0:
        raise ValueError("x_hp and x_dq are empty; there is nothing to compare")
    for name, t in (("x_hp", x_hp), ("x_dq", x_dq)):
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            raise ValueError(f"{name} contains {int(bad.sum())} NaN or infinite value(s); metrics need finite values")
    return x_hp.detach().cpu().double(), x_dq.detach().cpu().double()


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------
def relative_error(x_hp: torch.Tensor, x_dq: torch.Tensor) -> torch.Tensor:
    """Elementwise ``|x_dq - x_hp| / |x_hp|`` as float64, NaN where ``x_hp == 0``.

    Examples
    --------
    >>> import torch
    >>> relative_error(torch.tensor([2.0, -0.5, 0.0]), torch.tensor([1.5, -0.5, 0.25])).tolist()
    [0.25, 0.0, nan]
    """
    x, y = _check_pair(x_hp, x_dq)
    err = (y - x).abs()
    return torch.where(x != 0, err / x.abs(), torch.full_like(err, float("nan")))


def error_metrics(x_hp: torch.Tensor, x_dq: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Error metrics along the last axis, for a batch of tensors at once.

    Parameters
    ----------
    x_hp, x_dq:
        Floating tensors of the same shape ``(..., n)``: originals and their
        dequantized versions. Each slice along the last axis is one tensor.

    Returns
    -------
    dict of str to torch.Tensor
        float64 tensors of shape ``x_hp.shape[:-1]`` (0-d for 1-D input):
        ``min``, ``max``, ``mean``, ``std`` of ``x_hp``; ``dq_min``, ``dq_max``,
        ``dq_mean``, ``dq_std`` of ``x_dq``; ``mae``, ``max_abs_error``, ``rmse``,
        ``rel_mse``, ``sqnr_db``, ``mean_rel_error``, ``max_rel_error`` and
        ``n_zero`` (elements left out of the relative errors). See the module
        docstring for the definitions.

    Examples
    --------
    >>> import torch
    >>> m = error_metrics(torch.tensor([[1.0, -2.0], [4.0, 0.0]]), torch.tensor([[1.0, -1.0], [3.0, 0.5]]))
    >>> m["mae"].tolist(), m["max_rel_error"].tolist(), m["n_zero"].tolist()
    ([0.5, 0.75], [0.5, 0.25], [0.0, 1.0])
    """
    x, y = _check_pair(x_hp, x_dq)
    if x.dim() == 0:
        x, y = x.reshape(1), y.reshape(1)
    err = y - x
    abs_err = err.abs()
    nonzero = x != 0
    n_nonzero = nonzero.sum(-1)
    rel = torch.where(nonzero, abs_err / x.abs().clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(abs_err))
    nan = torch.full(n_nonzero.shape, float("nan"), dtype=torch.float64)
    mean_rel = torch.where(n_nonzero > 0, rel.sum(-1) / n_nonzero.clamp(min=1), nan)
    max_rel = torch.where(n_nonzero > 0, torch.where(nonzero, rel, torch.full_like(rel, -1.0)).amax(-1), nan)
    sq_err = (err**2).sum(-1)
    sq_sig = (x**2).sum(-1)
    with torch.no_grad():
        rel_mse = torch.where(sq_sig > 0, sq_err / sq_sig.clamp(min=1e-300), nan)
        sqnr = 10 * torch.log10(sq_sig / sq_err)  # inf when the error is 0
    return {
        "min": x.amin(-1),
        "max": x.amax(-1),
        "mean": x.mean(-1),
        "std": x.std(-1),
        "dq_min": y.amin(-1),
        "dq_max": y.amax(-1),
        "dq_mean": y.mean(-1),
        "dq_std": y.std(-1),
        "mae": abs_err.mean(-1),
        "max_abs_error": abs_err.amax(-1),
        "rmse": (err**2).mean(-1).sqrt(),
        "rel_mse": rel_mse,
        "sqnr_db": sqnr,
        "mean_rel_error": mean_rel,
        "max_rel_error": max_rel,
        "n_zero": (~nonzero).sum(-1).double(),
    }


def weight_error_metrics(x_hp: torch.Tensor, x_dq: torch.Tensor, *, lp_bytes: Optional[int] = None) -> Dict[str, float]:
    """Every metric of the four-panel analysis for one tensor, as plain numbers.

    Parameters
    ----------
    x_hp:
        The original tensor (any shape; float32, float16 or bfloat16).
    x_dq:
        Its dequantized version, same shape.
    lp_bytes:
        Bytes the quantized form takes (see :func:`quantized_nbytes`), or ``None``.

    Returns
    -------
    dict of str to float
        The keys of :func:`error_metrics` over the flattened tensor, plus ``n``
        (elements), ``hp_bytes`` (``numel * element_size`` of ``x_hp``: 200 for 50
        float32 values), ``lp_bytes`` and ``compression`` (``hp_bytes / lp_bytes``;
        both ``None`` without ``lp_bytes``).

    Examples
    --------
    >>> import torch
    >>> m = weight_error_metrics(torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([0.5, -0.5, 0.0, 2.0]), lp_bytes=6)
    >>> m["mae"], m["max_rel_error"], m["n_zero"], m["hp_bytes"], round(m["compression"], 3)
    (0.125, 0.5, 1, 16, 2.667)
    """
    m = error_metrics(x_hp.reshape(-1) if torch.is_tensor(x_hp) else x_hp,
                      x_dq.reshape(-1) if torch.is_tensor(x_dq) else x_dq)
    out: Dict[str, float] = {"n": int(x_hp.numel())}
    for k, v in m.items():
        out[k] = float(v)
    out["n_zero"] = int(out["n_zero"])
    out["hp_bytes"] = int(x_hp.numel() * x_hp.element_size())
    if lp_bytes is not None:
        if not isinstance(lp_bytes, int) or isinstance(lp_bytes, bool) or lp_bytes <= 0:
            raise ValueError(f"lp_bytes must be a positive int, got {lp_bytes!r}")
        out["lp_bytes"] = lp_bytes
        out["compression"] = out["hp_bytes"] / lp_bytes
    else:
        out["lp_bytes"] = None
        out["compression"] = None
    return out


def quantized_nbytes(q, state=None) -> int:
    """Bytes stored for a quantized tensor: packed codes plus its scale state.

    ``q`` is a :class:`~fp4lib.QuantizedTensor` (its ``nbytes``), or bitsandbytes'
    packed uint8 tensor with its ``QuantState`` as ``state``. For bitsandbytes this
    counts the packed bytes and the per-block absmax (FP32, or uint8 plus the
    second-level FP32 absmax and the FP32 offset when the state is nested). The
    16-entry code table, shape, dtype and block size are per-format metadata,
    shared by every tensor, and are not counted.

    Examples
    --------
    >>> import torch
    >>> from fp4lib import quantize
    >>> quantized_nbytes(quantize(torch.randn(50), "bnb_fp4"))  # 25 packed bytes + one FP32 absmax
    29
    """
    if isinstance(q, QuantizedTensor):
        if state is not None:
            raise ValueError("state is only for bitsandbytes' (packed, QuantState); a QuantizedTensor carries its own")
        return int(q.nbytes)
    if not torch.is_tensor(q):
        raise TypeError(f"q must be a QuantizedTensor or a packed torch.Tensor, got {type(q).__name__}")
    if state is None or not hasattr(state, "absmax"):
        raise TypeError("with a packed tensor, state must be bitsandbytes' QuantState")
    n = q.numel() * q.element_size() + state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "nested", False):
        n += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # absmax2 + FP32 offset
    return int(n)


# ----------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------
def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def four_panel_figure(
    x_hp: torch.Tensor,
    x_dq: torch.Tensor,
    *,
    title: Optional[str] = None,
    labels: Tuple[str, str] = ("original", "dequantized"),
    max_points: int = 400,
    scatter_points: int = 4000,
    seed: int = 0,
):
    """The four-panel view of a quantized tensor (chapter 3).

    Panels, left to right and top to bottom: (1) original and dequantized value
    of each weight by index, joined by a line that is the error; (2) the absolute
    error of each weight, with the MAE; (3) the histograms of both value sets on
    common bins; (4) dequantized against original value, whose staircase shows
    the code levels, with the line ``y = x``. Panel titles state what each
    panel shows for this data.

    Parameters
    ----------
    x_hp, x_dq:
        Original and dequantized tensor, same shape (flattened row-major).
    title:
        Figure title; say the finding.
    labels:
        Legend names of the two value sets.
    max_points:
        Panels 1 and 2 show the first ``max_points`` weights of a larger tensor.
    scatter_points:
        Panel 4 shows a random sample (seeded by ``seed``) of this many weights of
        a larger tensor. Panel 3 bins every weight; above 1,000 weights its axis
        shows the central 99.8% of the originals, so that a few outliers do not
        squeeze the histograms into one bin.

    Returns
    -------
    matplotlib.figure.Figure
        A 2x2 figure; ``fig.axes`` lists the panels in the order above.

    Examples
    --------
    >>> import torch
    >>> from fp4lib import fake_quantize
    >>> x = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 0.5
    >>> fig = four_panel_figure(x, fake_quantize(x, "bnb_fp4"), title="bitsandbytes fp4, blocksize 64")
    >>> len(fig.axes)
    4
    """
    x, y = _check_pair(x_hp, x_dq)
    if not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"max_points must be a positive int, got {max_points!r}")
    if not isinstance(scatter_points, int) or scatter_points < 1:
        raise ValueError(f"scatter_points must be a positive int, got {scatter_points!r}")
    if len(labels) != 2:
        raise ValueError(f"labels must name the two value sets, got {labels!r}")
    from ..display.plotting import BOOK_COLORS

    plt = _pyplot()
    x = x.reshape(-1)
    y = y.reshape(-1)
    err = (y - x).abs()
    levels = torch.unique(y).numel()
    fig, axes = plt.subplots(2, 2, figsize=(10.5, 7.6))
    ax1, ax2, ax3, ax4 = axes.reshape(-1)
    _index_panels(ax1, ax2, x, y, err, levels, labels, max_points, BOOK_COLORS)
    _histogram_panel(ax3, x, y, levels, labels, BOOK_COLORS)
    _staircase_panel(ax4, x, y, levels, labels, scatter_points, seed, BOOK_COLORS)
    if title:
        fig.suptitle(title)
    return fig


def _index_panels(ax1, ax2, x, y, err, levels: int, labels, max_points: int, colors) -> None:
    """Panels 1 and 2 of :func:`four_panel_figure`: the values, and their absolute errors, by weight index."""
    n = x.numel()
    mae = float(err.mean())
    i_max = int(err.argmax())
    xn, yn, en = x.numpy(), y.numpy(), err.numpy()
    c_hp, c_dq, c_err = colors["blue"], colors["vermillion"], colors["grey"]
    k = min(n, max_points)
    idx = np.arange(k)
    where = f" (first {k:,} of {n:,})" if k < n else ""
    ms = 5 if k <= 100 else 2.5

    # (1) original and dequantized by index
    ax1.vlines(idx, xn[:k], yn[:k], color=c_err, linewidth=0.8, alpha=0.7)
    ax1.plot(idx, xn[:k], "o", color=c_hp, markersize=ms, label=labels[0])
    ax1.plot(idx, yn[:k], "s", color=c_dq, markersize=ms * 0.8, markerfacecolor="none", label=labels[1])
    ax1.set_xlabel(f"weight index{where}")
    ax1.set_ylabel("value (weight units)")
    if levels <= 32:
        ax1.set_title(f"{n:,} weights land on {levels} levels")
    else:
        ax1.set_title(f"Dequantized weights stay within {float(err.max()):.3g} of the originals")
    ax1.legend(loc="best")

    # (2) absolute error per weight
    if k <= 100:
        ax2.bar(idx, en[:k], width=0.8, color=c_dq, alpha=0.8, label="|error|")
    else:
        ax2.vlines(idx, 0, en[:k], color=c_dq, linewidth=0.8, alpha=0.8, label="|error|")
    ax2.axhline(mae, color=colors["black"], linestyle="--", linewidth=1.2, label=f"MAE {mae:.3g}")
    ax2.set_xlabel(f"weight index{where}")
    ax2.set_ylabel("absolute error (weight units)")
    ax2.set_title(f"Mean error {mae:.3g}; the largest, {float(err[i_max]):.3g}, at weight {i_max:,}")
    ax2.legend(loc="upper right")


def _histogram_panel(ax3, x, y, levels: int, labels, colors) -> None:
    """Panel 3 of :func:`four_panel_figure`: histograms on common bins; a large tensor shows its central 99.8%."""
    n = x.numel()
    if n <= 1000:
        lo = float(torch.minimum(x.min(), y.min()))
        hi = float(torch.maximum(x.max(), y.max()))
        hist_note = ""
    else:
        q = torch.quantile(x[:: max(1, n // 1_000_000)], torch.tensor([0.001, 0.999], dtype=torch.float64))
        pad = 0.05 * float(q[1] - q[0])
        lo, hi = float(q[0]) - pad, float(q[1]) + pad
        hist_note = "; central 99.8% shown"
    if hi <= lo:
        hi = lo + 1.0
    bins = np.linspace(lo, hi, 41 if n <= 1000 else 81)
    ax3.hist(x.numpy(), bins=bins, color=colors["blue"], alpha=0.45, label=f"{labels[0]} (std {float(x.std()):.3g})")
    ax3.hist(y.numpy(), bins=bins, histtype="step", color=colors["vermillion"], linewidth=1.6,
             label=f"{labels[1]} (std {float(y.std()):.3g})")
    ax3.set_xlabel(f"value (weight units{hist_note})")
    ax3.set_ylabel("number of weights")
    if levels <= 32:
        ax3.set_title(f"The dequantized values pile up on {levels} levels")
    else:
        ax3.set_title("The dequantized histogram keeps the shape, with gaps")
    ax3.legend(loc="upper left")


def _staircase_panel(ax4, x, y, levels: int, labels, scatter_points: int, seed: int, colors) -> None:
    """Panel 4 of :func:`four_panel_figure`: dequantized against original value (the staircase) and ``y = x``."""
    n = x.numel()
    xn, yn = x.numpy(), y.numpy()
    c_dq = colors["vermillion"]
    if n > scatter_points:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(n, generator=g)[:scatter_points].numpy()
    else:
        pick = np.arange(n)
    r = float(torch.corrcoef(torch.stack([x, y]))[0, 1]) if n > 1 else float("nan")
    lo4 = float(min(xn[pick].min(), yn[pick].min()))
    hi4 = float(max(xn[pick].max(), yn[pick].max()))
    ax4.plot([lo4, hi4], [lo4, hi4], linestyle="--", color=colors["grey"], linewidth=1.0, label="y = x")
    order = np.argsort(xn[pick], kind="stable")
    ax4.step(xn[pick][order], yn[pick][order], where="mid", color=c_dq, linewidth=0.8, alpha=0.5)
    few_points = len(pick) <= 100
    ax4.scatter(xn[pick], yn[pick], s=14 if few_points else 4, color=c_dq, alpha=0.9 if few_points else 0.35,
                label=labels[1] + (f" ({len(pick):,} sampled)" if len(pick) < n else ""), zorder=3)
    ax4.set_xlabel(f"{labels[0]} value (weight units)")
    ax4.set_ylabel(f"{labels[1]} value (weight units)")
    if levels <= 32:
        ax4.set_title(f"Correlation {r:.4f}: a staircase of {levels} steps")
    else:
        ax4.set_title(f"Correlation {r:.4f}: per-block scales blur the steps")
    ax4.legend(loc="upper left")
