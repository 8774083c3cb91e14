"""Recipes: presets, ablations, and which layers apply_recipe swaps (fp4lib.training.recipes)."""

import dataclasses
import pytest
import torch
import torch.nn as nn

from fp4lib.training.model import GPT, GPTConfig
from fp4lib.training.apply import apply_recipe, quantized_layers, set_quantization
from fp4lib.training.layers import FP4Linear
from fp4lib.training.recipes import Recipe, get_recipe, hp_switch_step, nvfp4_recipe
from fp4lib.training.specs import QuantSpec


pytestmark = pytest.mark.usefixtures("one_thread")


CFG = GPTConfig(block_size=32, n_layer=4, n_head=2, n_embd=32)
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def block_linears(blocks):
    return [f"transformer.h.{b}.{name}" for b in blocks for name in LINEARS]


def fresh():
    torch.manual_seed(0)
    return GPT(CFG)


@pytest.mark.parametrize(
    "recipe, blocks",
    [("bf16", []), ("fp8", [0, 1, 2]), ("fp4_naive", [0, 1, 2]), ("mxfp4", [0, 1, 2]), ("nvfp4", [0, 1, 2]),
     ("nvfp4_all_fp4", [0, 1, 2, 3]), ("mxfp4_all_fp4", [0, 1, 2, 3]), ("fp4_naive_all_fp4", [0, 1, 2, 3]),
     ("nvfp4_hp_final", [0, 1, 2]), ("nvfp4_4over6", [0, 1, 2])],
)
def test_recipes_swap_exactly_the_intended_linears(recipe, blocks):
    model = fresh()
    swapped = apply_recipe(model, recipe, backend="fused")
    assert swapped == block_linears(blocks)
    assert quantized_layers(model) == swapped
    # Embeddings, head, norms are untouched, in every recipe.
    assert type(model.lm_head) is nn.Linear
    assert type(model.transformer.wte) is nn.Embedding and type(model.transformer.wpe) is nn.Embedding
    assert all(type(m) is nn.LayerNorm for n, m in model.named_modules() if "ln" in n.split(".")[-1])
    assert model.transformer.wte.weight is model.lm_head.weight  # tying survives


def test_hp_first_blocks_and_exclude_patterns():
    model = fresh()
    r = get_recipe("nvfp4").replace(hp_first_blocks=1, exclude=("lm_head", "*.mlp.c_proj"))
    swapped = apply_recipe(model, r, backend="fused")
    assert swapped == [n for n in block_linears([1, 2]) if not n.endswith("mlp.c_proj")]


def test_apply_shares_parameters_and_keeps_outputs_close():
    model = fresh()
    x = torch.randint(0, 256, (2, 32))
    params_before = {n: p for n, p in model.named_parameters()}
    logits_hp, _ = model(x)
    apply_recipe(model, "nvfp4", backend="fused")
    assert {n: p for n, p in model.named_parameters()} == params_before
    logits_fp4, _ = model(x)
    assert not torch.equal(logits_hp, logits_fp4)
    assert torch.allclose(logits_hp, logits_fp4, atol=0.05)


def test_nvfp4_preset_matches_the_nvidia_recipe():
    lin = get_recipe("nvfp4").linear
    assert all(getattr(lin, r).scheme == "nvfp4" for r in ("fprop_x", "fprop_w", "dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x"))
    assert lin.fprop_w.tile and lin.dgrad_w.tile and not lin.fprop_x.tile
    assert [lin.dgrad_dy.rounding, lin.wgrad_dy.rounding] == ["stochastic"] * 2
    assert {lin.fprop_x.rounding, lin.fprop_w.rounding, lin.dgrad_w.rounding, lin.wgrad_x.rounding} == {"nearest"}
    assert (lin.wgrad_dy.hadamard, lin.wgrad_x.hadamard) == (16, 16)
    assert lin.fprop_x.hadamard == lin.dgrad_dy.hadamard == 0
    assert get_recipe("nvfp4").hp_last_blocks == 1


def test_mxfp4_and_naive_presets():
    mx = get_recipe("mxfp4").linear
    assert mx.fprop_x == mx.fprop_w == QuantSpec("mxfp4")
    for r in ("dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x"):
        assert getattr(mx, r) == QuantSpec("mxfp4", rounding="stochastic", hadamard=32, scale_rule="ceil")
    naive = get_recipe("fp4_naive")
    assert naive.linear.gemms_enabled() == ("fprop", "dgrad", "wgrad")
    assert get_recipe("bf16").linear is None and not get_recipe("bf16").quantized


def test_every_quantized_main_recipe_keeps_the_same_layers_in_high_precision():
    main = [get_recipe(n) for n in ("fp8", "nvfp4", "mxfp4", "fp4_naive")]
    assert {(r.hp_first_blocks, r.hp_last_blocks, r.exclude) for r in main} == {(0, 1, ("lm_head",))}
    for name in ("nvfp4", "mxfp4", "fp4_naive"):
        all_fp4 = get_recipe(f"{name}_all_fp4")
        assert all_fp4.hp_last_blocks == 0 and all_fp4.linear == get_recipe(name).linear


def test_fp8_recipe_is_e4m3_forward_and_e5m2_gradients_with_current_scaling():
    fp8 = get_recipe("fp8").linear
    assert fp8.fprop_x == fp8.fprop_w == fp8.dgrad_w == fp8.wgrad_x == QuantSpec("fp8_e4m3")
    assert fp8.dgrad_dy == fp8.wgrad_dy == QuantSpec("fp8_e5m2")
    with pytest.raises(ValueError, match="round-to-nearest only"):
        QuantSpec("fp8_e5m2", rounding="stochastic")


def test_post_nvidia_ingredients_change_only_the_block_scale_rule():
    base = get_recipe("nvfp4").linear
    unbiased = get_recipe("nvfp4_unbiased_sr").linear
    four_six = get_recipe("nvfp4_4over6").linear
    roles = ("fprop_x", "fprop_w", "dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x")
    for role in roles:
        b = getattr(base, role)
        u = getattr(unbiased, role)
        assert u == (dataclasses.replace(b, scale_rule="up") if b.rounding == "stochastic" else b), role
        assert getattr(four_six, role) == dataclasses.replace(b, scale_rule="4over6"), role
    with pytest.raises(ValueError, match="needs sr=True"):
        nvfp4_recipe(sr=False, unbiased_sr=True)


def test_hp_eval_evaluates_in_high_precision_and_trains_in_fp4():
    from fp4lib.training.run import _hp_eval_loss

    assert get_recipe("nvfp4_hp_eval").hp_eval and get_recipe("nvfp4_hp_eval").linear == get_recipe("nvfp4").linear
    model = fresh()
    apply_recipe(model, "nvfp4", backend="fused")
    hp = fresh()
    batch = (torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))
    with torch.no_grad():
        model.eval()
        hp.eval()
        assert torch.equal(_hp_eval_loss(model, batch), _hp_eval_loss(hp, batch))  # eval: quantization off
        model.train()
        assert not torch.equal(_hp_eval_loss(model, batch), _hp_eval_loss(hp, batch))  # training: FP4
    assert all(m.quantize for m in model.modules() if hasattr(m, "quantize"))


ABLATIONS = {  # preset name -> the one argument of nvfp4_recipe it changes
    "nvfp4_no_sr": ("sr", dict(sr=False)),
    "nvfp4_no_rht": ("rht", dict(rht=0)),
    "nvfp4_no_tiles": ("tiles", dict(tiles=False)),
    "nvfp4_all_fp4": ("hp_blocks", dict(hp_last_blocks=0)),
    "nvfp4_fwd_only": ("backward", dict(backward=False)),
    "nvfp4_bwd_only": ("forward", dict(forward=False)),
    "nvfp4_unbiased_sr": ("unbiased_sr", dict(unbiased_sr=True)),
    "nvfp4_4over6": ("scale_rule", dict(scale_rule="4over6")),
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_is_one_argument_of_the_recipe_builder(name):
    ingredient, kwargs = ABLATIONS[name]
    base, ab = get_recipe("nvfp4"), get_recipe(name)
    assert nvfp4_recipe(name=name, **kwargs) == ab and nvfp4_recipe() == base
    roles = ("fprop_x", "fprop_w", "dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x")
    changed = [r for r in roles if getattr(base.linear, r) != getattr(ab.linear, r)]
    expected = {
        "sr": ["dgrad_dy", "wgrad_dy"],
        "rht": ["wgrad_dy", "wgrad_x"],
        "tiles": ["fprop_w", "dgrad_w"],
        "hp_blocks": [],
        "backward": ["dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x"],
        "forward": ["fprop_x", "fprop_w"],
        "unbiased_sr": ["dgrad_dy", "wgrad_dy"],
        "scale_rule": list(roles),
    }[ingredient]
    assert changed == expected
    assert (ab.hp_last_blocks == 0) == (ingredient == "hp_blocks")
    if ingredient in ("backward", "forward"):
        assert all(not getattr(ab.linear, r).enabled for r in changed)
    assert ab.linear.describe().count("\n") == 2


def test_ablated_weights_without_tiles_block_along_each_gemms_reduction_axis():
    model = fresh()
    apply_recipe(model, "nvfp4_no_tiles", backend="fused")
    layer = model.transformer.h[0].attn.c_proj
    x = torch.randn(64, 32)
    layer(x).sum().backward()  # runs: the weight blocks along in (Fprop) and out (Dgrad) features
    assert layer.weight.grad is not None


def test_hp_final_switch():
    assert hp_switch_step(get_recipe("nvfp4"), 400) is None
    assert hp_switch_step(get_recipe("nvfp4_hp_final"), 800) == 721
    model = fresh()
    apply_recipe(model, "nvfp4", backend="fused")
    assert set_quantization(model, False) == 12
    assert not any(m.quantize for m in model.modules() if isinstance(m, FP4Linear))
    assert set_quantization(model, False) == 0 and set_quantization(model, True) == 12


def test_bad_recipe_arguments():
    with pytest.raises(ValueError, match="recipe must be one of .*'nvfp4'.* got 'fp3'"):
        get_recipe("fp3")
    with pytest.raises(ValueError, match="hp_last_blocks"):
        Recipe("x", "x", get_recipe("nvfp4").linear, hp_last_blocks=-1)
    with pytest.raises(ValueError, match="hp_final_fraction"):
        get_recipe("nvfp4").replace(hp_final_fraction=1.5)
    with pytest.raises(ValueError, match="forward and backward are both False"):
        nvfp4_recipe(forward=False, backward=False)
    with pytest.raises(ValueError, match="only 4"):
        apply_recipe(fresh(), get_recipe("nvfp4").replace(hp_first_blocks=2, hp_last_blocks=3))
    model = fresh()
    apply_recipe(model, "nvfp4", backend="fused")
    with pytest.raises(ValueError, match="already has FP4Linear"):
        apply_recipe(model, "nvfp4")
    with pytest.raises(ValueError, match="block_prefix"):
        apply_recipe(nn.Sequential(nn.Linear(32, 32)), "nvfp4")
