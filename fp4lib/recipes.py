"""FP4 training recipes: which GEMM operands are quantized how, and which layers are not.

A :class:`Recipe` is a :class:`~fp4lib.nn.LinearSpec` (the six operand specs of
every quantized linear) plus the exclusions: layers kept in high precision by
name, the first and last transformer blocks kept in high precision, and an
optional switch of every layer to high precision for the final stretch of
training. :func:`apply_recipe` swaps a model's ``nn.Linear`` layers for
:class:`~fp4lib.nn.FP4Linear` in one call.

In every recipe the embeddings, the output head, the norms and the attention
softmax and batched matmuls stay in high precision: only ``nn.Linear`` layers are
ever swapped, and the head (``lm_head``) is excluded by name.

The presets (chapter 4 of the book; ``RECIPES``):

* ``bf16`` -- the baseline: nothing quantized (FP32 on a CPU, BF16 autocast on a GPU).
* ``fp4_naive`` -- E2M1 with one absmax scale per tensor, round-to-nearest, on all
  three GEMMs of every block.
* ``mxfp4`` -- MXFP4 (E2M1 + E8M0 scale per 32) on all three GEMMs of every block;
  forward round-to-nearest (OCP scale rule); backward (Dgrad and Wgrad) stochastic
  rounding, a random Hadamard transform of size 32 along the reduction axis, and
  the non-clipping scale rule (Tseng et al. 2025; Castro et al., Quartet, 2025).
* ``nvfp4`` -- NVIDIA's recipe (arXiv 2509.25149): NVFP4 on all three GEMMs;
  16x16 weight scales; stochastic rounding on gradients (dY) only; random Hadamard
  of size 16 on the Wgrad inputs only; the last transformer block in high
  precision (NVIDIA kept the last 8 of 62 blocks, plus the first 2, in BF16: about
  one block at our depth of 4-6).

Ablations switch one ingredient off at a time (:func:`ablate`): ``nvfp4_all_fp4``
(no high-precision block), ``nvfp4_no_sr``, ``nvfp4_no_rht``, ``nvfp4_no_tiles``;
``nvfp4_fwd_only`` / ``nvfp4_bwd_only`` quantize only the forward (Fprop) or only
the backward (Dgrad, Wgrad) GEMMs; ``nvfp4_hp_final`` switches to high precision
for the last 10% of the steps.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from .nn import OFF, FP4Linear, LinearSpec, QuantSpec, mix_seed

__all__ = [
    "Recipe",
    "RECIPES",
    "ABLATIONS",
    "get_recipe",
    "ablate",
    "apply_recipe",
    "set_quantization",
    "quantized_layers",
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
        The :class:`~fp4lib.nn.LinearSpec` of every quantized linear; ``None`` (or
        all off) for the high-precision baseline.
    hp_first_blocks, hp_last_blocks:
        Number of transformer blocks at the start / end whose linears stay in
        high precision.
    exclude:
        ``fnmatch`` patterns of module names never quantized (the output head).
    hp_final_fraction:
        Fraction of the training steps at the end run in high precision (0: none).

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
# Presets
# ----------------------------------------------------------------------------
def _naive() -> LinearSpec:
    return LinearSpec.uniform(QuantSpec("e2m1_per_tensor"))


def _mxfp4() -> LinearSpec:
    fwd = QuantSpec("mxfp4")
    bwd = QuantSpec("mxfp4", rounding="stochastic", hadamard=MX_BACKWARD_HADAMARD, scale_rule="ceil")
    return LinearSpec(fprop_x=fwd, fprop_w=fwd, dgrad_dy=bwd, dgrad_w=bwd, wgrad_dy=bwd, wgrad_x=bwd)


def _nvfp4() -> LinearSpec:
    act = QuantSpec("nvfp4")
    weight = QuantSpec("nvfp4", tile=True)
    grad = QuantSpec("nvfp4", rounding="stochastic")
    return LinearSpec(
        fprop_x=act,
        fprop_w=weight,
        dgrad_dy=grad,
        dgrad_w=weight,
        wgrad_dy=dataclasses.replace(grad, hadamard=NV_WGRAD_HADAMARD),
        wgrad_x=dataclasses.replace(act, hadamard=NV_WGRAD_HADAMARD),
    )


BF16 = Recipe("bf16", "baseline: no quantization (FP32 on CPU, BF16 autocast on GPU)")
FP4_NAIVE = Recipe("fp4_naive", "E2M1, one absmax scale per tensor, round-to-nearest, all GEMMs, every block", _naive())
MXFP4 = Recipe(
    "mxfp4",
    "MXFP4 (E8M0 scale per 32) on all GEMMs; RTN forward; SR + random Hadamard 32 backward",
    _mxfp4(),
)
NVFP4 = Recipe(
    "nvfp4",
    "NVFP4 (E4M3 scale per 16 + FP32 per tensor) on all GEMMs; 16x16 weight tiles; SR on gradients; "
    "random Hadamard 16 on Wgrad inputs; last block in high precision",
    _nvfp4(),
    hp_last_blocks=NVIDIA_HP_LAST_BLOCKS,
)

ABLATIONS = ("hp_blocks", "sr", "rht", "tiles", "backward", "forward")
"""Ingredients :func:`ablate` can switch off."""


def ablate(recipe: Recipe, ingredient: str) -> Recipe:
    """The recipe with one ingredient switched off.

    ``ingredient``: ``"hp_blocks"`` (quantize every block), ``"sr"`` (round to
    nearest everywhere), ``"rht"`` (no random Hadamard), ``"tiles"`` (1x16 weight
    blocks along each GEMM's reduction axis instead of 16x16 tiles),
    ``"backward"`` (Dgrad and Wgrad in high precision: forward-only FP4) or
    ``"forward"`` (Fprop in high precision: backward-only FP4).

    Examples
    --------
    >>> ablate(get_recipe("nvfp4"), "sr").linear.dgrad_dy.rounding
    'nearest'
    """
    if ingredient not in ABLATIONS:
        raise ValueError(f"ingredient must be one of {ABLATIONS}, got {ingredient!r}")
    if recipe.linear is None:
        raise ValueError(f"recipe {recipe.name!r} quantizes nothing; there is nothing to ablate")
    lin = recipe.linear
    if ingredient == "hp_blocks":
        return recipe.replace(name=f"{recipe.name}_all_fp4", hp_first_blocks=0, hp_last_blocks=0,
                              description=recipe.description + "; ablation: every block in FP4")
    if ingredient in ("backward", "forward"):
        off = ("dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x") if ingredient == "backward" else ("fprop_x", "fprop_w")
        suffix = "fwd_only" if ingredient == "backward" else "bwd_only"
        return recipe.replace(name=f"{recipe.name}_{suffix}", linear=lin.replace(**{r: OFF for r in off}),
                              description=recipe.description + f"; ablation: {'forward' if ingredient == 'backward' else 'backward'} GEMMs only")
    changes = {}
    for role in ("fprop_x", "fprop_w", "dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x"):
        s = getattr(lin, role)
        if ingredient == "sr" and s.rounding == "stochastic":
            changes[role] = dataclasses.replace(s, rounding="nearest")
        elif ingredient == "rht" and s.hadamard:
            changes[role] = dataclasses.replace(s, hadamard=0)
        elif ingredient == "tiles" and s.tile:
            changes[role] = dataclasses.replace(s, tile=False)
    return recipe.replace(name=f"{recipe.name}_no_{ingredient}", linear=lin.replace(**changes),
                          description=recipe.description + f"; ablation: no {ingredient}")


def _presets() -> Dict[str, Recipe]:
    out = {r.name: r for r in (BF16, FP4_NAIVE, MXFP4, NVFP4)}
    for ing in ABLATIONS:
        r = ablate(NVFP4, ing)
        out[r.name] = r
    final = NVFP4.replace(name="nvfp4_hp_final", hp_final_fraction=HP_FINAL_FRACTION,
                          description=NVFP4.description + f"; the last {HP_FINAL_FRACTION:.0%} of steps in high precision")
    out[final.name] = final
    return out


RECIPES: Dict[str, Recipe] = _presets()
"""Named recipes: ``bf16``, ``fp4_naive``, ``mxfp4``, ``nvfp4`` and the nvfp4
ablations ``nvfp4_all_fp4``, ``nvfp4_no_sr``, ``nvfp4_no_rht``, ``nvfp4_no_tiles``,
``nvfp4_fwd_only``, ``nvfp4_bwd_only``, ``nvfp4_hp_final``."""


def get_recipe(name: str) -> Recipe:
    """The preset called ``name`` (``ValueError`` listing the presets otherwise)."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name]


# ----------------------------------------------------------------------------
# Applying a recipe
# ----------------------------------------------------------------------------
def _block_index(name: str, block_prefix: str) -> Optional[int]:
    m = re.match(rf"^{re.escape(block_prefix)}\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def apply_recipe(model: nn.Module, recipe: Recipe, *, seed: int = 0, backend: str = "auto",
                 block_prefix: str = DEFAULT_BLOCK_PREFIX) -> List[str]:
    """Swap ``model``'s ``nn.Linear`` layers for :class:`~fp4lib.nn.FP4Linear`, in place.

    Parameters
    ----------
    model:
        Any module; its blocks are the children of ``block_prefix`` numbered 0..L-1
        (``transformer.h.<i>`` in nanoGPT-style models).
    recipe:
        A :class:`Recipe` (or a preset name).
    seed:
        Base seed of the stochastic rounding and Hadamard signs (each layer gets
        its own, derived from this and its position).
    backend:
        Fake-quant backend of the layers (see :class:`~fp4lib.nn.FP4Linear`).

    Returns
    -------
    list of str
        The names of the swapped (quantized) linears, in module order. Linears
        matching ``recipe.exclude``, outside the numbered blocks, or in the
        high-precision first/last blocks stay plain ``nn.Linear``; the weights are
        shared, not copied.

    Examples
    --------
    >>> from fp4lib.model import GPT, GPTConfig
    >>> model = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=32))
    >>> apply_recipe(model, "nvfp4", backend="fused")
    ['transformer.h.0.attn.c_attn', 'transformer.h.0.attn.c_proj', 'transformer.h.0.mlp.c_fc', 'transformer.h.0.mlp.c_proj']
    """
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe or a preset name, got {type(recipe).__name__}")
    if any(isinstance(m, FP4Linear) for m in model.modules()):
        raise ValueError("model already has FP4Linear layers; apply a recipe to a fresh model")
    if not recipe.quantized:
        return []
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    blocks = sorted({b for n, _ in linears if (b := _block_index(n, block_prefix)) is not None})
    n_blocks = max(blocks) + 1 if blocks else 0
    if (recipe.hp_first_blocks or recipe.hp_last_blocks) and n_blocks == 0:
        raise ValueError(f"recipe {recipe.name!r} keeps blocks in high precision, but model has no "
                         f"linears under block_prefix {block_prefix!r}")
    if recipe.hp_first_blocks + recipe.hp_last_blocks > n_blocks:
        raise ValueError(f"recipe {recipe.name!r} keeps {recipe.hp_first_blocks} first + {recipe.hp_last_blocks} "
                         f"last blocks in high precision, but the model has only {n_blocks}")
    swapped = []
    for i, (name, lin) in enumerate(linears):
        if any(fnmatch.fnmatchcase(name, pat) for pat in recipe.exclude):
            continue
        b = _block_index(name, block_prefix)
        if b is None or b < recipe.hp_first_blocks or b >= n_blocks - recipe.hp_last_blocks:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, FP4Linear.from_linear(lin, recipe.linear, backend=backend, seed=mix_seed(seed, i)))
        swapped.append(name)
    return swapped


def quantized_layers(model: nn.Module) -> List[str]:
    """Names of the model's :class:`~fp4lib.nn.FP4Linear` layers."""
    return [n for n, m in model.named_modules() if isinstance(m, FP4Linear)]


def set_quantization(model: nn.Module, enabled: bool) -> int:
    """Turn every FP4Linear's quantization on or off; returns how many layers changed."""
    changed = 0
    for m in model.modules():
        if isinstance(m, FP4Linear) and m.quantize != enabled:
            m.quantize = enabled
            changed += 1
    return changed


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
