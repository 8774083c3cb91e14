"""FP4 training recipes: which GEMM operands are quantized how, and which layers are not.

A :class:`Recipe` is a :class:`~fp4lib.training.specs.LinearSpec` (the six operand specs of
every quantized linear) plus the exclusions: layers kept in high precision by
name, the first and last transformer blocks kept in high precision, and an
optional switch of every layer to high precision for the final stretch of
training. Recipes are values built from arguments, in the manner of Transformer
Engine's ``NVFP4BlockScaling(disable_rht=..., disable_stochastic_rounding=...)``:
an ingredient is one keyword of :func:`nvfp4_recipe`, :func:`mxfp4_recipe` or
:func:`naive_recipe`, and every named preset in :data:`RECIPES` is a call of one
of them. :func:`fp4lib.training.apply.apply_recipe` swaps a model's ``nn.Linear`` layers for
:class:`~fp4lib.training.layers.FP4Linear` in one call.

In every recipe the embeddings, the output head, the norms and the attention
softmax and batched matmuls stay in high precision: only ``nn.Linear`` layers are
ever swapped, and the head (``lm_head``) is excluded by name.

The presets (chapters 4 and 5 of the book):

Every quantized preset keeps the same layers in high precision, the last
transformer block (NVIDIA kept the last 8 of 62 blocks, plus the first 2, in BF16:
about one block at our depth of 4-6), so that the recipes differ only in how they
quantize; the ``*_all_fp4`` presets quantize every block.

* ``bf16`` -- the baseline: nothing quantized (FP32 on a CPU, BF16 autocast on a GPU).
* ``fp8`` -- the 8-bit reference, like Transformer Engine's ``Float8CurrentScaling``:
  E4M3 forward operands and weights, E5M2 gradients (dY), one FP32 scale per tensor
  from its current amax, round-to-nearest.
* ``nvfp4`` -- NVIDIA's recipe (arXiv 2509.25149): NVFP4 on all three GEMMs;
  16x16 weight scales; stochastic rounding on gradients (dY) only; random Hadamard
  of size 16 on the Wgrad inputs only.
* ``mxfp4`` -- MXFP4 (E2M1 + E8M0 scale per 32) on all three GEMMs; forward
  round-to-nearest (OCP scale rule); backward (Dgrad and Wgrad) stochastic
  rounding, a random Hadamard transform of size 32 along the reduction axis, and
  the non-clipping ``ceil`` scale rule: fp4lib's power-of-two way of never clipping,
  which the papers do otherwise (Tseng et al. 2025 scale by 3/4 before stochastic
  rounding; Quartet, Castro et al. 2025, puts a 4/3 factor, not an E8M0 value, in its scale).
* ``fp4_naive`` -- E2M1 with one absmax scale per tensor, round-to-nearest, on all
  three GEMMs.
* ``nvfp4_all_fp4``, ``mxfp4_all_fp4``, ``fp4_naive_all_fp4`` -- the same with every
  block quantized (``hp_last_blocks=0``).

Ablations of ``nvfp4``, one argument each: ``nvfp4_no_sr`` (``sr=False``),
``nvfp4_no_rht`` (``rht=0``), ``nvfp4_no_tiles`` (``tiles=False``),
``nvfp4_fwd_only`` / ``nvfp4_bwd_only`` (``backward=False`` / ``forward=False``),
``nvfp4_hp_final`` (``hp_final_fraction=0.1``) and its control ``nvfp4_hp_eval``
(``hp_eval=True``: trained in FP4 throughout, evaluated in high precision). Two
ingredients from after NVIDIA's recipe: ``nvfp4_unbiased_sr`` (``unbiased_sr=True``:
the E4M3 block scales of stochastically rounded operands rounded up, so that no
block maximum is clamped) and ``nvfp4_4over6`` (``scale_rule="4over6"``: Cook et al.
2025, arXiv 2512.02010).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .specs import OFF, LinearSpec, QuantSpec

__all__ = [
    "Recipe",
    "RECIPES",
    "nvfp4_recipe",
    "mxfp4_recipe",
    "naive_recipe",
    "fp8_recipe",
    "get_recipe",
    "hp_switch_step",
]

DEFAULT_EXCLUDE = ("lm_head",)
DEFAULT_BLOCK_PREFIX = "transformer.h"
NVIDIA_HP_LAST_BLOCKS = 1  # NVIDIA: last 8 of 62 blocks (13%) plus the first 2; one block at depth 4-6
HP_FINAL_FRACTION = 0.1  # our "final stretch" in high precision: the last 10% of steps
MX_BACKWARD_HADAMARD = 32  # the MX block size (Quartet); Tseng et al. used 64
NV_WGRAD_HADAMARD = 16


@dataclass(frozen=True)
class Recipe:
    """A named FP4 training recipe.

    Attributes
    ----------
    name, description:
        For tables, plots and the CLI.
    linear:
        The :class:`~fp4lib.training.layers.LinearSpec` of every quantized linear; ``None`` (or
        all off) for the high-precision baseline.
    hp_first_blocks, hp_last_blocks:
        Number of transformer blocks at the start / end whose linears stay in
        high precision.
    exclude:
        ``fnmatch`` patterns of module names never quantized (the output head).
    hp_final_fraction:
        Fraction of the training steps at the end run in high precision (0: none).
    hp_eval:
        Evaluate with every layer in high precision (the training steps stay as
        the recipe says): the control that separates a high-precision final
        stretch of training from a high-precision evaluation pass.

    Examples
    --------
    >>> r = get_recipe("nvfp4")
    >>> r.hp_last_blocks, r.linear.wgrad_x.hadamard, r.linear.dgrad_dy.rounding
    (1, 16, 'stochastic')
    """

    name: str
    description: str
    linear: Optional[LinearSpec] = None
    hp_first_blocks: int = 0
    hp_last_blocks: int = 0
    exclude: Tuple[str, ...] = DEFAULT_EXCLUDE
    hp_final_fraction: float = 0.0
    hp_eval: bool = False

    def __post_init__(self):
        if self.linear is not None and not isinstance(self.linear, LinearSpec):
            raise TypeError(f"linear must be a LinearSpec or None, got {type(self.linear).__name__}")
        for name in ("hp_first_blocks", "hp_last_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if not 0.0 <= self.hp_final_fraction < 1.0:
            raise ValueError(f"hp_final_fraction must lie in [0, 1), got {self.hp_final_fraction!r}")

    @property
    def quantized(self) -> bool:
        """False for the high-precision baseline."""
        return self.linear is not None and self.linear.enabled

    def replace(self, **changes) -> "Recipe":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------
# Recipes from arguments
# ----------------------------------------------------------------------------
_FORWARD_ROLES = ("fprop_x", "fprop_w")
_BACKWARD_ROLES = ("dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x")


def _where(linear: LinearSpec, forward: bool, backward: bool) -> LinearSpec:
    """``linear`` with the forward (Fprop) or backward (Dgrad, Wgrad) operands switched off."""
    if not (forward or backward):
        raise ValueError("forward and backward are both False: the recipe would quantize nothing")
    off = (() if forward else _FORWARD_ROLES) + (() if backward else _BACKWARD_ROLES)
    return linear.replace(**{r: OFF for r in off})


def _excluded_blocks(hp_first_blocks: int, hp_last_blocks: int) -> str:
    parts = []
    if hp_first_blocks:
        parts.append(f"first {hp_first_blocks}")
    if hp_last_blocks:
        parts.append(f"last {hp_last_blocks}")
    return f"; {' and '.join(parts)} block(s) in high precision" if parts else ""


def _gemms(forward: bool, backward: bool) -> str:
    return "all GEMMs" if forward and backward else ("Fprop only" if forward else "Dgrad and Wgrad only")


def nvfp4_recipe(*, sr: bool = True, rht: int = NV_WGRAD_HADAMARD, tiles: bool = True, hp_first_blocks: int = 0,
                 hp_last_blocks: int = NVIDIA_HP_LAST_BLOCKS, forward: bool = True, backward: bool = True,
                 hp_final_fraction: float = 0.0, hp_eval: bool = False, scale_rule: str = "nearest",
                 unbiased_sr: bool = False, name: str = "nvfp4") -> Recipe:
    """NVIDIA's NVFP4 recipe, each ingredient an argument.

    ``sr``: stochastic rounding of the gradient dY (Dgrad and Wgrad); ``rht``:
    random Hadamard size on the Wgrad inputs (0: off); ``tiles``: one scale per
    16x16 weight tile (else 1x16 blocks along each GEMM's reduction axis);
    ``hp_first_blocks`` / ``hp_last_blocks``: transformer blocks kept in high
    precision; ``forward`` / ``backward``: quantize Fprop / Dgrad and Wgrad;
    ``hp_final_fraction``: the last fraction of the steps in high precision;
    ``hp_eval``: evaluate in high precision. Beyond NVIDIA's recipe:
    ``scale_rule``: the block-scale rule of every operand (``"nearest"``, or
    ``"4over6"``: Cook et al. 2025); ``unbiased_sr``: round the E4M3 block scale
    of the stochastically rounded operands up (``scale_rule="up"``), so that no
    block maximum exceeds 6 and is clamped, and their rounding is unbiased.

    Examples
    --------
    >>> r = nvfp4_recipe(sr=False, name="nvfp4_no_sr")
    >>> r.linear.dgrad_dy.rounding, r.hp_last_blocks
    ('nearest', 1)
    """
    if unbiased_sr and not sr:
        raise ValueError("unbiased_sr rounds the block scales of stochastically rounded operands up; it needs sr=True")
    act = QuantSpec("nvfp4", scale_rule=scale_rule)
    weight = QuantSpec("nvfp4", tile=tiles, scale_rule=scale_rule)
    grad = QuantSpec("nvfp4", rounding="stochastic" if sr else "nearest", scale_rule="up" if unbiased_sr else scale_rule)
    linear = LinearSpec(
        fprop_x=act, fprop_w=weight, dgrad_dy=grad, dgrad_w=weight,
        wgrad_dy=dataclasses.replace(grad, hadamard=rht), wgrad_x=dataclasses.replace(act, hadamard=rht),
    )
    desc = ("NVFP4 (E4M3 scale per 16 + FP32 per tensor) on " + _gemms(forward, backward)
            + ("; 16x16 weight tiles" if tiles else "; 1x16 weight blocks")
            + ("; SR on gradients" if sr else "; round-to-nearest everywhere")
            + ("; block scales of SR operands rounded up (unbiased SR)" if unbiased_sr else "")
            + ("; four-over-six block scales" if scale_rule == "4over6" else "")
            + (f"; random Hadamard {rht} on Wgrad inputs" if rht else "")
            + _excluded_blocks(hp_first_blocks, hp_last_blocks)
            + (f"; the last {hp_final_fraction:.0%} of steps in high precision" if hp_final_fraction else "")
            + ("; evaluated in high precision" if hp_eval else ""))
    return Recipe(name, desc, _where(linear, forward, backward), hp_first_blocks=hp_first_blocks,
                  hp_last_blocks=hp_last_blocks, hp_final_fraction=hp_final_fraction, hp_eval=hp_eval)


def mxfp4_recipe(*, sr: bool = True, rht: int = MX_BACKWARD_HADAMARD, backward_scale_rule: str = "ceil",
                 hp_first_blocks: int = 0, hp_last_blocks: int = NVIDIA_HP_LAST_BLOCKS, forward: bool = True,
                 backward: bool = True,
                 hp_final_fraction: float = 0.0, name: str = "mxfp4") -> Recipe:
    """MXFP4 training after Tseng et al. and Quartet: RTN forward (OCP scale rule);
    backward with stochastic rounding (``sr``), a random Hadamard of size ``rht`` along
    each backward GEMM's reduction axis, and ``backward_scale_rule`` (``"ceil"``: no clipping).

    Examples
    --------
    >>> mxfp4_recipe().linear.wgrad_x.short()
    'mxfp4/sr/rht32/ceil'
    """
    fwd = QuantSpec("mxfp4")
    bwd = QuantSpec("mxfp4", rounding="stochastic" if sr else "nearest", hadamard=rht, scale_rule=backward_scale_rule)
    linear = LinearSpec(fprop_x=fwd, fprop_w=fwd, dgrad_dy=bwd, dgrad_w=bwd, wgrad_dy=bwd, wgrad_x=bwd)
    desc = ("MXFP4 (E8M0 scale per 32) on " + _gemms(forward, backward) + "; RTN forward"
            + ("; SR" if sr else "; RTN") + (f" + random Hadamard {rht}" if rht else "") + " backward"
            + _excluded_blocks(hp_first_blocks, hp_last_blocks)
            + (f"; the last {hp_final_fraction:.0%} of steps in high precision" if hp_final_fraction else ""))
    return Recipe(name, desc, _where(linear, forward, backward), hp_first_blocks=hp_first_blocks,
                  hp_last_blocks=hp_last_blocks, hp_final_fraction=hp_final_fraction)


def naive_recipe(*, hp_first_blocks: int = 0, hp_last_blocks: int = NVIDIA_HP_LAST_BLOCKS,
                 name: str = "fp4_naive") -> Recipe:
    """E2M1 with one absmax scale per tensor, round-to-nearest, on every GEMM operand.

    Examples
    --------
    >>> naive_recipe().linear.wgrad_dy.short()
    'e2m1_per_tensor/rtn'
    """
    desc = "E2M1, one absmax scale per tensor, round-to-nearest, all GEMMs" + (
        _excluded_blocks(hp_first_blocks, hp_last_blocks) or ", every block")
    return Recipe(name, desc, LinearSpec.uniform(QuantSpec("e2m1_per_tensor")), hp_first_blocks=hp_first_blocks,
                  hp_last_blocks=hp_last_blocks)


def fp8_recipe(*, hp_first_blocks: int = 0, hp_last_blocks: int = NVIDIA_HP_LAST_BLOCKS, name: str = "fp8") -> Recipe:
    """FP8 training with per-tensor current scaling, like Transformer Engine's
    ``Float8CurrentScaling``: E4M3 for activations and weights, E5M2 for the
    gradient dY, one FP32 scale per tensor from its amax, round-to-nearest.

    Examples
    --------
    >>> fp8_recipe().linear.describe().splitlines()[1]
    'dgrad: dy fp8_e5m2/rtn, w fp8_e4m3/rtn'
    """
    fwd, grad = QuantSpec("fp8_e4m3"), QuantSpec("fp8_e5m2")
    linear = LinearSpec(fprop_x=fwd, fprop_w=fwd, dgrad_dy=grad, dgrad_w=fwd, wgrad_dy=grad, wgrad_x=fwd)
    desc = ("FP8 with per-tensor current scaling: E4M3 activations and weights, E5M2 gradients, all GEMMs"
            + _excluded_blocks(hp_first_blocks, hp_last_blocks))
    return Recipe(name, desc, linear, hp_first_blocks=hp_first_blocks, hp_last_blocks=hp_last_blocks)


BF16 = Recipe("bf16", "baseline: no quantization (FP32 on CPU, BF16 autocast on GPU)")

RECIPES: Dict[str, Recipe] = {r.name: r for r in (
    BF16,
    fp8_recipe(),
    nvfp4_recipe(),
    mxfp4_recipe(),
    naive_recipe(),
    nvfp4_recipe(hp_last_blocks=0, name="nvfp4_all_fp4"),
    mxfp4_recipe(hp_last_blocks=0, name="mxfp4_all_fp4"),
    naive_recipe(hp_last_blocks=0, name="fp4_naive_all_fp4"),
    nvfp4_recipe(sr=False, name="nvfp4_no_sr"),
    nvfp4_recipe(rht=0, name="nvfp4_no_rht"),
    nvfp4_recipe(tiles=False, name="nvfp4_no_tiles"),
    nvfp4_recipe(backward=False, name="nvfp4_fwd_only"),
    nvfp4_recipe(forward=False, name="nvfp4_bwd_only"),
    nvfp4_recipe(hp_final_fraction=HP_FINAL_FRACTION, name="nvfp4_hp_final"),
    nvfp4_recipe(hp_eval=True, name="nvfp4_hp_eval"),
    nvfp4_recipe(unbiased_sr=True, name="nvfp4_unbiased_sr"),
    nvfp4_recipe(scale_rule="4over6", name="nvfp4_4over6"),
)}
"""Named recipes, each a call of a builder above (see the module docs): ``bf16``,
``fp8``, ``nvfp4``, ``mxfp4``, ``fp4_naive``, their ``*_all_fp4`` variants, and the
nvfp4 ablations ``nvfp4_no_sr``, ``nvfp4_no_rht``, ``nvfp4_no_tiles``,
``nvfp4_fwd_only``, ``nvfp4_bwd_only``, ``nvfp4_hp_final``, ``nvfp4_hp_eval``,
``nvfp4_unbiased_sr``, ``nvfp4_4over6``."""


def get_recipe(name: str) -> Recipe:
    """The preset called ``name`` (``ValueError`` listing the presets otherwise)."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name]


def hp_switch_step(recipe: Recipe, steps: int) -> Optional[int]:
    """The first step (1-based) run in high precision under ``recipe.hp_final_fraction``, or ``None``.

    Examples
    --------
    >>> hp_switch_step(get_recipe("nvfp4_hp_final"), 400)
    361
    """
    if recipe.hp_final_fraction <= 0:
        return None
    return steps - int(round(steps * recipe.hp_final_fraction)) + 1
