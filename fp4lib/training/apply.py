"""Applying a recipe to a model: its ``nn.Linear`` layers swapped for
:class:`~fp4lib.training.layers.FP4Linear` as the recipe says, and the switches that
turn their quantization off and on (the final stretch in high precision).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from typing import Iterator, List, Optional

import torch.nn as nn

from .layers import FP4Linear
from .operands import mix_seed
from .recipes import DEFAULT_BLOCK_PREFIX, Recipe, get_recipe

__all__ = ["apply_recipe", "quantized_layers", "set_quantization", "quantization_disabled"]


def _block_index(name: str, block_prefix: str) -> Optional[int]:
    m = re.match(rf"^{re.escape(block_prefix)}\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def apply_recipe(model: nn.Module, recipe: Recipe, *, seed: int = 0, backend: str = "auto",
                 block_prefix: str = DEFAULT_BLOCK_PREFIX) -> List[str]:
    """Swap ``model``'s ``nn.Linear`` layers for :class:`~fp4lib.training.layers.FP4Linear`, in place.

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
        Fake-quant backend of the layers (see :class:`~fp4lib.training.layers.FP4Linear`).

    Returns
    -------
    list of str
        The names of the swapped (quantized) linears, in module order. Linears
        matching ``recipe.exclude``, outside the numbered blocks, or in the
        high-precision first/last blocks stay plain ``nn.Linear``; the weights are
        shared, not copied.

    Examples
    --------
    >>> from fp4lib.training.model import GPT, GPTConfig
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
    """Names of the model's :class:`~fp4lib.training.layers.FP4Linear` layers."""
    return [n for n, m in model.named_modules() if isinstance(m, FP4Linear)]


def set_quantization(model: nn.Module, enabled: bool) -> int:
    """Turn every FP4Linear's quantization on or off; returns how many layers changed."""
    changed = 0
    for m in model.modules():
        if isinstance(m, FP4Linear) and m.quantize != enabled:
            m.quantize = enabled
            changed += 1
    return changed


@contextlib.contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[None]:
    """Run the block with every FP4Linear in high precision, then restore each layer's state."""
    layers = [m for m in model.modules() if isinstance(m, FP4Linear)]
    states = [m.quantize for m in layers]
    for m in layers:
        m.quantize = False
    try:
        yield
    finally:
        for m, state in zip(layers, states):
            m.quantize = state
